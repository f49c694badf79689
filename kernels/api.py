"""Public functional ops of ``reformer.kernels`` with backend dispatch.

``backend="torch"`` runs the pure-PyTorch reference on any device; ``"triton"`` runs the
Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"auto"`` picks
Triton for CUDA tensors when Triton is installed and the reference otherwise (never the
interpreter).
"""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Optional, Union

import torch
from torch import Tensor

from ._checks import (
    check_attention_inputs,
    check_attn_mask,
    check_backend,
    check_key_padding_mask,
    check_lsh_inputs,
    check_positive_int,
    check_rotations,
    check_tensor,
)
from .lsh_common import default_n_buckets, hash_buckets, lsh_attention_rounds, make_rotations
from .ref_full import full_attention_torch


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (16, 128)  # inclusive range of head dims the Triton kernels take


def triton_supports(dtype: torch.dtype, *head_dims: int) -> bool:
    """True when the Triton kernels take this dtype and these head dims."""
    lo, hi = TRITON_HEAD_DIMS
    return dtype in TRITON_DTYPES and all(lo <= d <= hi for d in head_dims)


def resolve_backend(backend: str, x: Tensor, *, triton_ok: bool = True) -> str:
    """Map ``"auto"`` to ``"triton"`` (CUDA tensor, Triton installed and ``triton_ok``: the call
    is within the kernels' limits) or ``"torch"``. An explicit ``"triton"`` needs Triton and a
    CUDA tensor, or ``TRITON_INTERPRET=1`` for CPU tensors."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if (x.is_cuda and triton_ok and triton_available()) else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install 'reformer[triton]')")
        if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got device {x.device}"
            )
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
    backend: str = "auto",
) -> Tensor:
    """Scaled dot-product attention, ``softmax(q k^T / sqrt(D)) v``.

    Args:
        q: ``(B, H, Nq, D)`` queries. k: ``(B, H, Nk, D)`` keys. v: ``(B, H, Nk, Dv)`` values.
        causal: query i attends only to keys j <= i.
        key_padding_mask: ``(B, Nk)`` bool, True = padding (that key is ignored).
        attn_mask: bool ``(Nq, Nk)``/``(B, H, Nq, Nk)`` (True = not allowed, as in
            ``nn.MultiheadAttention``) or a float mask added to the logits.
        dropout_p: dropout on the attention probabilities (applied whenever > 0).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton for CUDA tensors when the call
            is within the kernels' limits: float32/float16/bfloat16, head dims 16..128; the
            reference otherwise).

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
    triton_ok = attn_mask is None and dropout_p == 0.0 and triton_supports(q.dtype, q.shape[-1], v.shape[-1])
    if resolve_backend(backend, q, triton_ok=triton_ok) == "triton":
        from .triton_full import full_attention_triton

        if attn_mask is not None or dropout_p > 0.0:
            raise ValueError("backend='triton' supports causal and key_padding_mask only (no attn_mask, no dropout)")
        return full_attention_triton(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
    return full_attention_torch(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=dropout_p
    )


def lsh_attention(
    qk: Tensor,
    v: Tensor,
    *,
    bucket_size: int = 64,
    n_hashes: int = 4,
    causal: bool = False,
    key_padding_mask: Optional[Tensor] = None,
    rotations: Optional[Tensor] = None,
    seed: Optional[int] = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Shared-QK LSH attention (Reformer), O(N * bucket_size * n_hashes) time and memory.

    Each hash round sorts the positions by (bucket, position), cuts them into chunks of
    ``bucket_size`` and lets every chunk attend to itself and the chunk before it; rounds are
    combined by their log-sum-exp. Semantics: DESIGN.md rules 1-7 (keys are ``qk`` normalised
    to unit norm; a position attends to itself only when it has no other permitted key; with
    ``bucket_size >= N`` this equals full shared-QK attention). Rounds are NOT de-duplicated: a
    key found in k rounds is counted k times (the paper's basic scheme, as in trax and HF).

    Args:
        qk: ``(B, H, N, D)`` shared queries/keys. v: ``(B, H, N, D)`` values. Any N >= 1.
        bucket_size: chunk length; ``n_buckets`` defaults to ``2 * ceil(N / bucket_size)``.
        n_hashes: number of hash rounds.
        causal: position i attends only to positions <= i.
        key_padding_mask: ``(B, N)`` bool, True = padding: ignored as a key, output 0.
        rotations: ``(H, D, n_hashes, n_buckets // 2)`` random rotations (sets ``n_buckets``).
        seed: without ``rotations``, draw them from a CPU generator seeded with ``seed``;
            with neither, from the global RNG of qk's device.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton for CUDA tensors when the call
            is within the kernels' limits: float32/float16/bfloat16, head dims 16..128; the
            reference otherwise).
        return_lse: also return the per-position log-sum-exp ``(B, H, N)`` of the combined
            softmax (float32, float64 for float64 inputs; -inf at padded positions).

    Returns:
        ``(B, H, N, D)`` in qk's dtype (and the lse when ``return_lse``). Rows with no
        permitted key (padded positions) are 0, never NaN.
    """
    check_lsh_inputs(qk, v)
    b, _, n, _ = qk.shape
    bucket_size = check_positive_int("bucket_size", bucket_size)
    n_hashes = check_positive_int("n_hashes", n_hashes)
    key_padding_mask = check_key_padding_mask(key_padding_mask, b, n, qk.device)
    rotations = _lsh_rotations(qk, rotations, seed, bucket_size, n_hashes)
    if qk.numel() == 0:  # an empty batch or no heads: nothing to hash
        out, lse = torch.zeros_like(v), qk.new_full(qk.shape[:3], float("-inf"), dtype=torch.float32)
        return (out, lse) if return_lse else out
    out, lse = lsh_attention_rounds(
        qk, v, core=_lsh_core(resolve_backend(backend, qk, triton_ok=triton_supports(qk.dtype, qk.shape[-1]))),
        bucket_size=bucket_size, causal=bool(causal), key_padding_mask=key_padding_mask, rotations=rotations,
    )
    return (out, lse) if return_lse else out


def _lsh_rotations(qk: Tensor, rotations: Optional[Tensor], seed: Optional[int], bucket_size: int,
                   n_hashes: int) -> Tensor:
    """The given ``rotations`` (checked), or new ones from ``seed`` / the global RNG (rule 2)."""
    _, h, n, d = qk.shape
    if rotations is not None:
        if seed is not None:
            raise ValueError("give either rotations or seed, not both")
        return check_rotations(rotations, h, d, n_hashes, qk)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return make_rotations(h, d, n_hashes, default_n_buckets(n, bucket_size), seed=seed, device=qk.device)


def lsh_buckets(qk: Tensor, *, n_buckets: int, n_hashes: int, rotations: Tensor) -> Tensor:
    """LSH bucket of every position, head and round: ``argmax([x R ; -x R])`` with
    ``R = rotations[h, :, r]`` (ties go to the lowest index).

    qk: ``(B, H, N, D)``; rotations: ``(H, D, n_hashes, n_buckets // 2)``; n_buckets even >= 2.
    Returns a LongTensor ``(B, H, n_hashes, N)`` with values in ``[0, n_buckets)``. Computed in
    float32 for float16/bfloat16 inputs.
    """
    check_tensor("qk", qk, 4, "(B, H, N, D)")
    n_hashes = check_positive_int("n_hashes", n_hashes)
    if check_positive_int("n_buckets", n_buckets) % 2:
        raise ValueError(f"n_buckets must be even (buckets come in +/- pairs), got {n_buckets}")
    _, h, _, d = qk.shape
    rotations = check_rotations(rotations, h, d, n_hashes, qk, n_buckets=n_buckets)
    return hash_buckets(qk, rotations)


def _lsh_core(backend: str) -> ModuleType:
    """The module providing the per-round ``fwd``/``bwd`` core for a resolved backend."""
    if backend == "triton":
        from . import triton_lsh

        return triton_lsh
    from . import ref_lsh

    return ref_lsh
