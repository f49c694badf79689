"""Full shared-QK attention written densely: the oracle that LSH attention is checked against.

``dense_shared_qk_attention`` is what ``lsh_attention`` equals when every query sees every key
(one chunk, docs/lsh.md "Exactness"), and what the quality benchmark measures LSH against. It
follows docs/lsh.md:

- **Shared QK**: queries are the rows of ``qk``, keys the same rows normalised,
  ``k = qk / max(||qk||_2, KEY_EPS)``; logits ``s_ij = q_i . k_j * scale`` with
  ``scale = 1 / sqrt(D)`` unless given.
- **Permitted keys** of query ``i``: every ``j != i`` that is not padding and, when ``causal``,
  ``j <= i``.
- **The self rule**: a non-padding query with no permitted key outputs its own value ``v_i``
  (weight 1 on itself, lse ``SELF_ONLY_LSE``); its own position is never a key otherwise.
- **Padding** (``key_padding_mask`` ``(B, N)``, True = padding): padded rows of ``qk`` and ``v``
  are replaced by zeros first (so NaN/Inf there cannot leak), padded positions are never keys,
  and padded queries output 0 with lse ``-inf``.

It materialises the ``(B, H, N, N)`` weights, is differentiable with ordinary autograd (use
float64 inputs for ``gradcheck``) and computes half-precision inputs in float32.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .hashing import KEY_EPS
from .lsh_function import SELF_ONLY_LSE

__all__ = ["dense_shared_qk_attention", "dense_shared_qk_weights", "KEY_EPS", "SELF_ONLY_LSE"]


def _logits(qk: Tensor, causal: bool, key_padding_mask: Optional[Tensor], scale: Optional[float]) -> Tensor:
    """Logits ``(B, H, N, N)`` in the compute dtype, ``-inf`` where a key is not permitted."""
    if qk.dim() != 4:
        raise ValueError(f"qk must be (B, H, N, D), got shape {tuple(qk.shape)}")
    compute = torch.float32 if qk.dtype in (torch.float16, torch.bfloat16) else qk.dtype
    x = qk.to(compute)
    n, d = x.shape[-2:]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (x.shape[0], n):
            raise ValueError(f"key_padding_mask must be a bool (B, N) = {(x.shape[0], n)} tensor, got "
                             f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
        x = x.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    keys = x / x.norm(dim=-1, keepdim=True).clamp_min(KEY_EPS)
    s = torch.matmul(x, keys.transpose(-1, -2)) * (1.0 / math.sqrt(d) if scale is None else scale)
    forbidden = torch.eye(n, dtype=torch.bool, device=x.device)
    if causal:
        forbidden = forbidden | torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)
    s = s.masked_fill(forbidden, float("-inf"))
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return s


def _weights(qk: Tensor, causal: bool, key_padding_mask: Optional[Tensor],
             scale: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """``(weights (B, H, N, N), logits (B, H, N, N), has_key (B, H, N, 1))``."""
    s = _logits(qk, causal, key_padding_mask, scale)
    has_key = (s > float("-inf")).any(dim=-1, keepdim=True)
    probs = torch.softmax(s.masked_fill(~has_key, 0.0), dim=-1) * has_key
    weights = probs + ~has_key * torch.eye(s.shape[-1], dtype=s.dtype, device=s.device)  # the self rule
    if key_padding_mask is not None:
        weights = weights.masked_fill(key_padding_mask[:, None, :, None], 0.0)  # padded queries: 0
    return weights, s, has_key


def dense_shared_qk_weights(qk: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
                            scale: Optional[float] = None) -> Tensor:
    """The attention weights ``(B, H, N, N)`` of full shared-QK attention (module docstring):
    row ``i`` is the softmax over ``i``'s permitted keys, or one-hot on ``i`` itself when it has
    none (the self rule); padded rows are 0, so ``weights @ v`` is
    :func:`dense_shared_qk_attention`'s output. ``qk`` ``(B, H, N, D)``. Float32 for half
    inputs, else ``qk``'s dtype."""
    return _weights(qk, causal, key_padding_mask, scale)[0]


def dense_shared_qk_attention(qk: Tensor, v: Tensor, *, causal: bool = False,
                              key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                              return_lse: bool = False) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Full shared-QK attention with the rules of docs/lsh.md (module docstring).

    qk: ``(B, H, N, D)``; v: ``(B, H, N, Dv)``; key_padding_mask: ``(B, N)`` bool, True =
    padding; scale: logit scale (default ``1 / sqrt(D)``). Returns the output ``(B, H, N, Dv)``
    in ``v``'s dtype, and with ``return_lse`` also the log-sum-exp of each row's permitted
    logits ``(B, H, N)`` (``SELF_ONLY_LSE`` for a row with no permitted key, ``-inf`` for
    padding rows) in the compute dtype. ``lsh_attention`` with ``n_hashes`` rounds that each see
    every key reports this lse plus ``log(n_hashes)``.
    """
    weights, s, has_key = _weights(qk, causal, key_padding_mask, scale)
    values = v.to(weights.dtype)
    if key_padding_mask is not None:
        values = values.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    out = torch.matmul(weights, values).to(v.dtype)
    if not return_lse:
        return out
    has_key = has_key[..., 0]
    lse = torch.logsumexp(s.masked_fill(~has_key[..., None], 0.0), dim=-1)
    lse = torch.where(has_key, lse, torch.full_like(lse, SELF_ONLY_LSE))
    if key_padding_mask is not None:
        lse = lse.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    return out, lse
