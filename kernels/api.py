"""Public functional ops of ``reformer.kernels`` with backend dispatch.

``backend="torch"`` runs the pure-PyTorch reference on any device; ``"triton"`` runs the
Triton kernels (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``); ``"auto"`` picks
Triton for CUDA tensors when Triton is installed and the reference otherwise (never the
interpreter).
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .checks import (
    check_attention_inputs,
    check_attn_mask,
    check_backend,
    check_key_padding_mask,
    check_lsh_inputs,
    check_positive_int,
    check_rotations,
    check_tensor,
)
from .hashing import (
    NBuckets,
    check_n_buckets,
    default_n_buckets,
    hash_buckets,
    make_rotations,
    rotation_width,
)
from .limits import TRITON_DTYPES, TRITON_HEAD_DIMS, triton_supports  # noqa: F401  (re-exported)
from .lsh_function import CAUSAL_MODES, LSHCore, lsh_attention_rounds
from .ref_full import full_attention_torch


def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


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
        key_padding_mask: ``(B, Nk)`` bool, True = padding: that key is ignored, and whatever
            its k and v hold (NaN and Inf included) cannot affect any output or gradient (they
            are replaced by zeros before any product; their gradients are 0).
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
    if key_padding_mask is not None:  # selection, not multiplication: NaN/Inf at padded keys cannot leak
        pad = key_padding_mask[:, None, :, None]
        k, v = k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    triton_ok = attn_mask is None and dropout_p == 0.0 and triton_supports(q.dtype, q.shape[-1], v.shape[-1])
    if resolve_backend(backend, q, triton_ok=triton_ok) == "triton":
        from .triton_full import full_attention_triton

        if attn_mask is not None or dropout_p > 0.0:
            raise ValueError("backend='triton' supports causal and key_padding_mask only (no attn_mask, no dropout)")
        if torch.compiler.is_compiling():  # one opaque custom op: no graph break (kernels/ops.py)
            from .ops import full_attention_op

            return full_attention_op(q, k, v, key_padding_mask, bool(causal), "triton")
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
    n_buckets: Optional[NBuckets] = None,
    causal: bool = False,
    causal_mode: str = "chunk",
    key_padding_mask: Optional[Tensor] = None,
    rotations: Optional[Tensor] = None,
    seed: Optional[int] = None,
    backend: str = "auto",
    return_lse: bool = False,
) -> Union[Tensor, tuple[Tensor, Tensor]]:
    """Shared-QK LSH attention (Reformer) in time and memory linear in N (semantics: docs/lsh.md).

    Each hash round sorts the positions by (bucket, position), cuts them into chunks of
    ``bucket_size`` and lets every chunk attend to itself and the chunk before it; rounds are
    combined by their log-sum-exp and are NOT de-duplicated (a key found in k rounds is counted
    k times, the paper's basic scheme, as in trax and HF). Keys are ``qk`` normalised to unit
    norm, logits ``q.k / sqrt(D)``; a position never attends to itself, and a position with no
    permitted key in any round outputs its own value (lse ``-1e5``, docs/lsh.md "The self rule").
    With one bucket and ``bucket_size >= N`` this equals full shared-QK attention.

    Args:
        qk: ``(B, H, N, D)`` shared queries/keys. v: ``(B, H, N, D)`` values. Any N >= 1.
        bucket_size: chunk length.
        n_hashes: number of hash rounds.
        n_buckets: None (the automatic rule :func:`default_n_buckets`: plain up to 256 buckets,
            two factors up to 4096, three beyond; or, with ``rotations``, plain with ``2 * rotations.shape[-1]``
            buckets), an even int >= 2 (plain hashing) or a tuple of 2 or 3 even ints >= 2,
            ``(n1, n2)`` or ``(n1, n2, n3)`` (factorised hashing, their product of buckets).
        causal: position i attends only to positions <= i (never to a later one).
        causal_mode: with ``causal=True``: ``"chunk"`` (default: the chunked look-back restricted
            to positions <= i; a later token's bucket can move an earlier position's chunk, so
            earlier outputs can depend on later tokens) or ``"bucket"`` (per round a query
            attends to the most recent ``bucket_size`` positions of its own bucket up to itself;
            no output depends on a later token). Ignored when ``causal=False``.
        key_padding_mask: ``(B, N)`` bool, True = padding: such a position is no key, outputs 0
            (lse -inf), and whatever its qk and v hold (NaN and Inf included) cannot affect any
            other output or gradient (its gradients are 0).
        rotations: ``(H, D, n_hashes, W)`` random rotations, ``W = n_buckets/2`` (plain) or
            ``sum(n_i)/2`` (factorised: the n1 columns first, then n2, n3).
        seed: without ``rotations``, draw them from a CPU generator seeded with ``seed``;
            with neither, from the global RNG of qk's device.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (Triton for CUDA tensors when the call
            is within the kernels' limits: float32/float16/bfloat16, head dims 16..128; the
            reference otherwise).
        return_lse: also return the per-position log-sum-exp ``(B, H, N)`` of the combined
            softmax (float32, float64 for float64 inputs; -inf at padded positions, ``-1e5``
            with gradient 0 at positions with no permitted key).

    Returns:
        ``(B, H, N, D)`` in qk's dtype (and the lse when ``return_lse``). Padded positions are 0,
        never NaN.
    """
    check_lsh_inputs(qk, v)
    b, _, n, _ = qk.shape
    bucket_size = check_positive_int("bucket_size", bucket_size)
    n_hashes = check_positive_int("n_hashes", n_hashes)
    if not isinstance(causal_mode, str) or causal_mode not in CAUSAL_MODES:
        raise ValueError(f"causal_mode must be one of {CAUSAL_MODES}, got {causal_mode!r}")
    key_padding_mask = check_key_padding_mask(key_padding_mask, b, n, qk.device)
    rotations, n_buckets = _lsh_rotations(qk, rotations, seed, bucket_size, n_hashes, n_buckets)
    backend = resolve_backend(backend, qk, triton_ok=triton_supports(qk.dtype, qk.shape[-1]))
    if qk.numel() == 0:  # an empty batch or no heads: nothing to hash
        out, lse = torch.zeros_like(v), qk.new_full(qk.shape[:3], float("-inf"), dtype=torch.float32)
        return (out, lse) if return_lse else out
    if key_padding_mask is not None:  # selection, not multiplication: NaN/Inf at padding cannot leak
        pad = key_padding_mask[:, None, :, None]
        qk, v = qk.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0)
    if torch.compiler.is_compiling():  # one opaque custom op: no graph break (kernels/ops.py)
        from .ops import lsh_attention_op, n_buckets_arg

        out, lse = lsh_attention_op(qk, v, rotations, key_padding_mask, n_buckets_arg(n_buckets), bucket_size,
                                    bool(causal), causal_mode, backend)
        return (out, lse) if return_lse else out
    out, lse = lsh_attention_rounds(
        qk, v, core=_lsh_core(backend), bucket_size=bucket_size, causal=bool(causal), causal_mode=causal_mode,
        key_padding_mask=key_padding_mask, rotations=rotations, n_buckets=n_buckets,
        hasher=_lsh_hasher(backend, qk),
    )
    return (out, lse) if return_lse else out


def _lsh_rotations(qk: Tensor, rotations: Optional[Tensor], seed: Optional[int], bucket_size: int,
                   n_hashes: int, n_buckets: Any) -> tuple[Tensor, NBuckets]:
    """The given ``rotations`` (checked) or new ones from ``seed`` / the global RNG, and the
    resolved ``n_buckets`` (docs/lsh.md, "Hashing")."""
    _, h, n, d = qk.shape
    if n_buckets is not None:
        n_buckets = check_n_buckets(n_buckets)
    if rotations is not None:
        if seed is not None:
            raise ValueError("give either rotations or seed, not both")
        width = None if n_buckets is None else rotation_width(n_buckets)
        rotations = check_rotations(rotations, h, d, n_hashes, qk, width)
        return rotations, (2 * rotations.shape[-1] if n_buckets is None else n_buckets)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    if n_buckets is None:
        n_buckets = default_n_buckets(n, bucket_size)
    if seed is not None and torch.compiler.is_compiling():  # no torch.Generator inside a compiled region
        from .ops import seeded_rotations_op

        return seeded_rotations_op(seed, h, d, n_hashes, rotation_width(n_buckets), qk.device), n_buckets
    return make_rotations(h, d, n_hashes, n_buckets, seed=seed, device=qk.device), n_buckets


def lsh_buckets(qk: Tensor, *, n_buckets: NBuckets, n_hashes: int, rotations: Tensor) -> Tensor:
    """LSH bucket of every position, head and round (docs/lsh.md, "Hashing").

    Plain (``n_buckets`` an even int >= 2): ``argmax([x R ; -x R])`` with
    ``R = rotations[h, :, r]`` of width ``n_buckets/2`` (ties go to the lowest index).
    Factorised (``n_buckets = (n1, n2)`` or ``(n1, n2, n3)``, each even >= 2): ``R = [R1 | R2 | R3]``
    of widths ``n_i/2``, ``b_i = argmax([x R_i ; -x R_i])`` and bucket ``b1 * n2 + b2``
    (``(b1 * n2 + b2) * n3 + b3``).

    qk: ``(B, H, N, D)``; rotations: ``(H, D, n_hashes, W)`` with ``W = n_buckets/2`` or
    ``sum(n_i)/2``. Returns a LongTensor ``(B, H, n_hashes, N)`` with values in
    ``[0, n_buckets)`` (``[0, n1 * n2 [* n3])``). Computed in float32 for float16/bfloat16 inputs.
    """
    check_tensor("qk", qk, 4, "(B, H, N, D)")
    n_hashes = check_positive_int("n_hashes", n_hashes)
    n_buckets = check_n_buckets(n_buckets)
    _, h, _, d = qk.shape
    rotations = check_rotations(rotations, h, d, n_hashes, qk, rotation_width(n_buckets))
    return hash_buckets(qk, rotations, n_buckets)


def _lsh_hasher(backend: str, qk: Tensor) -> Optional[Callable[..., Tensor]]:
    """The one-launch Triton hashing kernel for CUDA tensors on the Triton backend; None (the
    torch hashing) otherwise, including the interpreter, where both give the same buckets."""
    if backend == "triton" and qk.is_cuda:
        from .triton_hash import hash_buckets as triton_hash_buckets

        return triton_hash_buckets
    return None


def _lsh_core(backend: str) -> LSHCore:
    """The round-level core (:class:`~reformer.kernels.lsh_function.LSHCore`) for a resolved
    backend: ``triton_lsh`` or ``ref_lsh`` itself (both read each slab's rows through the sort
    order and merge rounds in place; ``SortedCoreAdapter`` stays the generic adapter for a core
    that only works on sorted rows)."""
    if backend == "triton":
        from . import triton_lsh

        return triton_lsh
    from . import ref_lsh

    return ref_lsh
