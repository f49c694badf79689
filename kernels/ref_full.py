"""Pure-PyTorch reference for full (softmax) attention.

Materialises the ``(B, H, Nq, Nk)`` score matrix: it defines correctness for the Triton
kernel and is the "naive full attention" of the benchmarks. Any dtype torch supports;
scores are computed in float32 for float16/bfloat16 inputs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def full_attention_torch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    scale: Optional[float] = None,
) -> Tensor:
    """softmax(q k^T * scale + masks) v on already-validated inputs.

    q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv) -> (B, H, Nq, Dv).
    key_padding_mask: (B, Nk) bool, True = padding. attn_mask: bool (True = masked) or
    additive float, broadcastable to (B, H, Nq, Nk). causal: query i sees keys j <= i.
    Rows with no permitted key return zeros (and zero gradient), never NaN.
    """
    out_dtype = q.dtype
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    nq, nk = scores.shape[-2:]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(compute)
    if causal:
        future = torch.ones(nq, nk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    has_key = (scores > float("-inf")).any(dim=-1, keepdim=True)  # (B, H, Nq, 1)
    probs = torch.softmax(scores.masked_fill(~has_key, 0.0), dim=-1) * has_key
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    return torch.matmul(probs, v).to(out_dtype)
