"""Input validation shared by the functional ops and the ``reformer`` modules (public:
``reformer.kernels.checks``).

Every public op checks its arguments here first, so that a wrong rank, a mismatched head
count or a mask of the wrong shape raises a ``ValueError``/``TypeError`` that names the
argument, instead of a shape error from deep inside a matmul or a kernel.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def check_tensor(name: str, x: object, ndim: int, layout: str) -> Tensor:
    """``x`` is a floating-point tensor of rank ``ndim`` (``layout`` names the dims)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} (rank {ndim}), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_same(names: str, *tensors: Tensor) -> None:
    """All tensors share dtype and device."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"{names} must share one dtype, got {sorted(map(str, dtypes))}")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{names} must be on one device, got {sorted(map(str, devices))}")


def check_key_padding_mask(mask: Optional[Tensor], batch: int, n: int, device: torch.device) -> Optional[Tensor]:
    """``key_padding_mask`` is ``(B, N)`` bool, True = padding. Returns it on ``device``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"key_padding_mask must be a bool tensor of shape (B, N), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True = padding), got {mask.dtype}")
    if tuple(mask.shape) != (batch, n):
        raise ValueError(f"key_padding_mask must have shape (B, N) = {(batch, n)}, got {tuple(mask.shape)}")
    return mask.to(device)


def check_attn_mask(mask: Optional[Tensor], batch: int, heads: int, nq: int, nk: int) -> Optional[Tensor]:
    """``attn_mask`` is bool (True = not allowed) or float (added to the logits), broadcastable
    to ``(B, H, Nq, Nk)`` and with exactly ``(Nq, Nk)`` as its last two dims."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = masked) or floating point (additive), got {mask.dtype}")
    if mask.dim() not in (2, 3, 4) or tuple(mask.shape[-2:]) != (nq, nk):
        raise ValueError(
            f"attn_mask must have shape (Nq, Nk), (B*H or 1, Nq, Nk) or (B or 1, H or 1, Nq, Nk) with "
            f"(Nq, Nk) = {(nq, nk)}, got {tuple(mask.shape)}"
        )
    if mask.dim() == 3:
        if mask.shape[0] not in (1, batch * heads):
            raise ValueError(f"a 3-D attn_mask must have B*H = {batch * heads} or 1 as its first dim, got {mask.shape[0]}")
        mask = mask.reshape(-1, heads if mask.shape[0] > 1 else 1, nq, nk)
    elif mask.dim() == 4:
        if mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads):
            raise ValueError(f"a 4-D attn_mask must broadcast to (B, H) = {(batch, heads)}, got {tuple(mask.shape[:2])}")
    return mask


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_attention_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """``q`` is ``(B, H, Nq, D)``, ``k`` is ``(B, H, Nk, D)``, ``v`` is ``(B, H, Nk, Dv)``."""
    check_tensor("q", q, 4, "(B, H, Nq, D)")
    check_tensor("k", k, 4, "(B, H, Nk, D)")
    check_tensor("v", v, 4, "(B, H, Nk, Dv)")
    check_same("q, k and v", q, k, v)
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            f"q, k and v must agree on (B, H), got {tuple(q.shape[:2])}, {tuple(k.shape[:2])}, {tuple(v.shape[:2])}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim D, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length Nk, got {k.shape[2]} and {v.shape[2]}")
    if q.shape[2] < 1 or k.shape[2] < 1:
        raise ValueError(f"sequence lengths must be >= 1, got Nq={q.shape[2]}, Nk={k.shape[2]}")


def check_positive_int(name: str, value: object) -> int:
    """``value`` is an int >= 1: a non-int (bools included) is a ``TypeError``, a value < 1 a ``ValueError``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be a positive int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_lsh_inputs(qk: Tensor, v: Tensor) -> None:
    """``qk`` and ``v`` are ``(B, H, N, D)`` tensors of one shape, dtype and device, N, D >= 1."""
    check_tensor("qk", qk, 4, "(B, H, N, D)")
    check_tensor("v", v, 4, "(B, H, N, D)")
    check_same("qk and v", qk, v)
    if qk.shape != v.shape:
        raise ValueError(f"qk and v must have the same shape (B, H, N, D), got {tuple(qk.shape)} and {tuple(v.shape)}")
    if qk.shape[2] < 1 or qk.shape[3] < 1:
        raise ValueError(f"qk must have N >= 1 and D >= 1, got shape {tuple(qk.shape)}")


def check_rotations(rotations: object, heads: int, dim: int, n_hashes: int, qk: Tensor,
                    width: Optional[int] = None) -> Tensor:
    """``rotations`` is a floating ``(H, D, n_hashes, W)`` tensor on ``qk``'s device, with
    ``W = width`` when given (``n_buckets/2`` plain, ``sum(n_i)/2`` factorised), any ``W >= 1``
    otherwise."""
    layout = "(H, D, n_hashes, W) with W = n_buckets/2 (plain) or sum(n_i)/2 (factorised)"
    if not isinstance(rotations, Tensor):
        raise TypeError(f"rotations must be a tensor of shape {layout}, got {type(rotations).__name__}")
    if not rotations.is_floating_point():
        raise TypeError(f"rotations must be floating point, got {rotations.dtype}")
    w = width if width is not None else (rotations.shape[-1] if rotations.dim() == 4 else "W")
    expected = (heads, dim, n_hashes, w)
    if tuple(rotations.shape) != expected or rotations.shape[3] < 1:
        raise ValueError(f"rotations must have shape {layout} = {expected}, got {tuple(rotations.shape)}")
    if rotations.device != qk.device:
        raise ValueError(f"rotations must be on qk's device {qk.device}, got {rotations.device}")
    return rotations
