"""Argument checks for the ``torch.nn`` modules: errors name the argument and what was expected.

A value of the wrong type (a float or bool where an int is expected, a non-number, a
non-tensor) raises ``TypeError``; a value of the right type but out of range ``ValueError``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from reformer.kernels.checks import check_key_padding_mask, check_positive_int  # noqa: F401  (re-exported)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


check_positive = check_positive_int  # one rule for modules and ops: TypeError for non-ints, ValueError below 1


def check_non_negative(name: str, value: object) -> int:
    """``value`` is an int >= 0: ``TypeError`` for a non-int (bools included), ``ValueError`` below 0."""
    if not _is_int(value):
        raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def check_axes(name: str, axes: object, min_len: int = 2) -> tuple[int, ...]:
    """``axes`` is a tuple or list of at least ``min_len`` positive ints; returns it as a tuple."""
    if not isinstance(axes, (tuple, list)) or len(axes) < min_len:
        raise ValueError(f"{name} must be a tuple of at least {min_len} positive ints, got {axes!r}")
    for a in axes:
        check_positive(name + " entries", a)
    return tuple(axes)


def check_heads(d_model: int, n_heads: int) -> int:
    """Returns the head dim ``d_model // n_heads``."""
    check_positive("d_model", d_model)
    check_positive("n_heads", n_heads)
    if d_model % n_heads:
        raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
    return d_model // n_heads


def check_dropout(p: float, name: str = "dropout") -> float:
    """``p`` is a number in [0, 1)."""
    if not isinstance(p, (int, float)) or isinstance(p, bool):
        raise TypeError(f"{name} must be a number in [0, 1), got {p!r}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {p}")
    return p


def check_param_dtype(name: str, x: Tensor, param: Tensor) -> None:
    """Outside ``torch.autocast``, ``x`` must have the dtype of the module's parameter ``param``."""
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{name} has dtype {x.dtype} but the module's parameters are {param.dtype}: convert one "
                        f"(e.g. {name}.to({param.dtype}) or module.to({x.dtype})) or run under torch.autocast")


def check_features(name: str, x: object, d_model: int) -> Tensor:
    """``x`` is a floating ``(B, N, d_model)`` tensor."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, N, d_model), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have shape (B, N, d_model) (rank 3), got shape {tuple(x.shape)}")
    if x.shape[-1] != d_model:
        raise ValueError(f"{name} must have last dim d_model={d_model}, got {x.shape[-1]}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x


def check_feature_dim(name: str, x: object, d_model: int) -> Tensor:
    """``x`` is a floating ``(..., d_model)`` tensor (any leading dims, rank >= 1)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (..., d_model), got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(f"{name} must have shape (..., d_model={d_model}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x


def check_tokens(name: str, tokens: object, vocab_size: int, max_len: Optional[int] = None) -> Tensor:
    """``tokens`` is an integer ``(B, N)`` tensor with ids in ``[0, vocab_size)``."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a LongTensor of shape (B, N), got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape (B, N) (rank 2), got shape {tuple(tokens.shape)}")
    if tokens.shape[1] < 1:
        raise ValueError(f"{name} must have at least one position, got shape {tuple(tokens.shape)}")
    if max_len is not None and tokens.shape[1] > max_len:
        raise ValueError(f"{name} has length {tokens.shape[1]}, longer than max_len={max_len}")
    return check_ids(name, tokens, vocab_size, kind="token")


def check_ids(name: str, ids: object, num_classes: int, kind: str = "class") -> Tensor:
    """``ids`` is a tensor of an integer dtype (not bool) with values in ``[0, num_classes)``."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a tensor of integer {kind} ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer {kind} ids, got {ids.dtype}")
    if ids.numel():
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} ids must be in [0, {num_classes}), got range [{low}, {high}]")
    return ids


def check_seed(seed: object) -> Optional[int]:
    """``seed`` is an int or None."""
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return seed
