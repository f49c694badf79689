"""Public functional ops of ``reformer.kernels`` with backend dispatch.

``backend="torch"`` runs the pure-PyTorch reference on any device; ``"triton"`` runs the
Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"auto"`` picks
Triton for CUDA tensors when Triton is installed and the reference otherwise (never the
interpreter).
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from torch import Tensor

from ._checks import check_attention_inputs, check_attn_mask, check_backend, check_key_padding_mask
from .ref_full import full_attention_torch


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, x: Tensor) -> str:
    """Map ``"auto"`` to ``"triton"`` (CUDA tensor and Triton installed) or ``"torch"``."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if (x.is_cuda and triton_available()) else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install 'reformer[triton]')")
    return backend


def full_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    backend: str = "torch",
) -> Tensor:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(D)) v``.

    Args:
        q: ``(B, H, Nq, D)`` queries. k: ``(B, H, Nk, D)`` keys. v: ``(B, H, Nk, Dv)`` values.
        causal: query i attends only to keys j <= i.
        key_padding_mask: ``(B, Nk)`` bool, True = padding (that key is ignored).
        attn_mask: bool ``(Nq, Nk)``/``(B, H, Nq, Nk)`` (True = not allowed, as in
            ``nn.MultiheadAttention``) or a float mask added to the logits.
        dropout_p: dropout on the attention probabilities (applied whenever > 0).
        backend: ``"torch"``, ``"triton"`` or ``"auto"``.

    Returns:
        ``(B, H, Nq, Dv)``. A query with no permitted key gets zeros, never NaN.
    """
    check_attention_inputs(q, k, v)
    b, h, nq, _ = q.shape
    nk = k.shape[2]
    key_padding_mask = check_key_padding_mask(key_padding_mask, b, nk, q.device)
    attn_mask = check_attn_mask(attn_mask, b, h, nq, nk)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if resolve_backend(backend, q) == "triton":
        from .triton_full import full_attention_triton

        if attn_mask is not None or dropout_p > 0.0:
            raise ValueError("backend='triton' supports causal and key_padding_mask only (no attn_mask, no dropout)")
        return full_attention_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    return full_attention_torch(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p
    )
