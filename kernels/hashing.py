"""LSH hashing for shared-QK attention: rotations, plain and factorised buckets, the default rule.

Semantics in docs/lsh.md ("Hashing"). In short, for one head and one round with random
Gaussian rotations ``R``:

- plain, ``n_buckets = n`` (even >= 2): ``R`` is ``(D, n/2)`` and
  ``bucket = argmax([x R ; -x R])`` (ties go to the lowest index);
- factorised, ``n_buckets = (n1, n2)`` (each even >= 2, ``n1 * n2`` buckets): ``R = [R1 | R2]``
  with ``R1`` ``(D, n1/2)`` and ``R2`` ``(D, n2/2)``, ``b_i = argmax([x R_i ; -x R_i])`` and
  ``bucket = b1 * n2 + b2``. Hashing costs ``O(D (n1 + n2) / 2)`` per position and round
  instead of ``O(D n1 n2 / 2)``.

Rotations for all heads and rounds are one tensor ``(H, D, n_hashes, W)`` with ``W = n/2``
(plain) or ``W = n1/2 + n2/2`` (factorised, ``R1`` first).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

NBuckets = Union[int, tuple[int, int]]

KEY_EPS = 1e-6  # keys are qk / max(||qk||_2, KEY_EPS)
HASH_SLAB_BYTES = 8 * 2**20  # bound on the rotated-vector buffer while hashing
FACTORISE_ABOVE = 256  # default rule: plain hashing up to this many buckets, factorised beyond


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Hashing, logits and round combination run in float32 for float16/bfloat16 inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def padded_length(n: int, bucket_size: int) -> int:
    """``n`` rounded up to a multiple of ``bucket_size``."""
    return -(-n // bucket_size) * bucket_size


def _check_count(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an even int >= 2, got {value!r}")
    if value < 2 or value % 2:
        raise ValueError(f"{name} must be an even int >= 2 (buckets come in +/- pairs), got {value}")
    return value


def check_n_buckets(n_buckets: object) -> NBuckets:
    """``n_buckets`` is an even int >= 2 (plain hashing) or a pair ``(n1, n2)`` of even ints >= 2
    (factorised hashing). Returns an int or a tuple; a non-int count is a ``TypeError``, a bad
    value a ``ValueError``."""
    if isinstance(n_buckets, (tuple, list)):
        if len(n_buckets) != 2:
            raise ValueError(f"a factorised n_buckets must be a pair (n1, n2), got {n_buckets!r}")
        return (_check_count("n_buckets[0]", n_buckets[0]), _check_count("n_buckets[1]", n_buckets[1]))
    if not isinstance(n_buckets, int) or isinstance(n_buckets, bool):
        raise TypeError(f"n_buckets must be None, an even int >= 2 or a pair (n1, n2), got {n_buckets!r}")
    return _check_count("n_buckets", n_buckets)


def total_buckets(n_buckets: NBuckets) -> int:
    """Number of distinct bucket ids: ``n`` or ``n1 * n2``."""
    return n_buckets[0] * n_buckets[1] if isinstance(n_buckets, tuple) else n_buckets


def rotation_width(n_buckets: NBuckets) -> int:
    """Last dim of the rotations: ``n/2`` (plain) or ``n1/2 + n2/2`` (factorised)."""
    return (n_buckets[0] + n_buckets[1]) // 2 if isinstance(n_buckets, tuple) else n_buckets // 2


def default_n_buckets(n: int, bucket_size: int) -> NBuckets:
    """The automatic bucket count for sequence length ``n`` (docs/lsh.md, "The default rule").

    ``m = 2 * ceil(n / bucket_size)`` buckets (about half a chunk per bucket, as in the paper).
    Up to ``FACTORISE_ABOVE`` (256) buckets this is plain hashing with ``m`` buckets; beyond,
    factorised ``(n1, n2)`` with ``n1 = 2 * ceil(sqrt(m) / 2)`` and ``n2 = 2 * ceil(m / (2 n1))``
    (both even, ``n1 * n2 >= m``, ``n1 <= n2`` and close to ``sqrt(m)``), which keeps hashing at
    ``O(D sqrt(m))`` per position.
    """
    m = 2 * max(1, -(-n // bucket_size))
    if m <= FACTORISE_ABOVE:
        return m
    n1 = 2 * math.ceil(math.sqrt(m) / 2)
    n2 = 2 * math.ceil(m / (2 * n1))
    return (n1, n2)


def make_rotations(heads: int, dim: int, n_hashes: int, n_buckets: NBuckets, *, seed: Optional[int],
                   device: torch.device) -> Tensor:
    """Random Gaussian rotations ``(H, D, n_hashes, W)`` in float32 (``W`` from :func:`rotation_width`).

    From a CPU ``torch.Generator`` seeded with ``seed`` (then moved to ``device``), or from the
    global RNG of ``device`` when ``seed`` is None (so that saving and restoring the RNG state
    replays the draw exactly).
    """
    shape = (heads, dim, n_hashes, rotation_width(n_buckets))
    if seed is None:
        return torch.randn(shape, device=device)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device)


def _signed_argmax(rotated: Tensor) -> Tensor:
    """``argmax([r ; -r])`` over the last dim (ties to the lowest index), as int64."""
    half = rotated.shape[-1]
    top, top_idx = rotated.max(dim=-1)
    low, low_idx = rotated.min(dim=-1)
    return torch.where(top >= -low, top_idx, low_idx + half)


def hash_buckets(qk: Tensor, rotations: Tensor, n_buckets: Optional[NBuckets] = None, *,
                 dtype: torch.dtype = torch.int64) -> Tensor:
    """Bucket ids for every head and round.

    qk: ``(B, H, N, D)``; rotations: ``(H, D, n_hashes, W)``; n_buckets: an int (plain, ``W = n/2``),
    a pair (factorised, ``W = n1/2 + n2/2``) or None (plain with ``2 W`` buckets). Returns
    ``(B, H, n_hashes, N)`` of ``dtype`` with values in ``[0, total_buckets)``. Computed in float32
    for float16/bfloat16 inputs; positions are processed in slabs (one batched matmul each) so
    the rotated vectors never take more than about ``HASH_SLAB_BYTES``.
    """
    b, h, n, d = qk.shape
    work = compute_dtype(qk.dtype)
    n_hashes, width = rotations.shape[2], rotations.shape[3]
    factors = n_buckets if isinstance(n_buckets, tuple) else None
    rot = rotations.to(work).reshape(h, d, n_hashes * width)
    per_position = b * h * n_hashes * width * torch.finfo(work).bits // 8
    step = max(1, HASH_SLAB_BYTES // per_position)
    buckets = torch.empty(b, h, n_hashes, n, dtype=dtype, device=qk.device)
    for start in range(0, n, step):
        x = qk[:, :, start:start + step].to(work)
        rotated = torch.einsum("bhnd,hdk->bhnk", x, rot).view(b, h, -1, n_hashes, width)
        if factors is None:
            ids = _signed_argmax(rotated)
        else:
            half1 = factors[0] // 2
            ids = _signed_argmax(rotated[..., :half1]) * factors[1] + _signed_argmax(rotated[..., half1:])
        buckets[..., start:start + step] = ids.transpose(-1, -2)
    return buckets


def neighbour_recall(x: Tensor, n_buckets: NBuckets, *, n_hashes: int = 1, k: int = 8,
                     seed: int = 0) -> float:
    """Bucket quality: the chance that one of a point's ``k`` nearest neighbours shares its bucket.

    x: ``(N, D)`` vectors. Neighbours are ranked as attention ranks keys for a query: by
    ``x_i . x_j / ||x_j||`` (``j != i``). Averaged over points, their ``k`` neighbours and
    ``n_hashes`` independent rounds (rotations from ``seed``). Dense ``(N, N)``: for small N.
    """
    n, d = x.shape
    x = x.to(compute_dtype(x.dtype))
    keys = x / x.norm(dim=-1, keepdim=True).clamp_min(KEY_EPS)
    s = (x @ keys.T).fill_diagonal_(float("-inf"))
    nearest = s.topk(min(k, n - 1), dim=-1).indices  # (N, k)
    rotations = make_rotations(1, d, n_hashes, n_buckets, seed=seed, device=x.device)
    buckets = hash_buckets(x.view(1, 1, n, d), rotations, n_buckets)[0, 0]  # (R, N)
    same = buckets[:, nearest] == buckets[:, :, None]  # (R, N, k)
    return same.double().mean().item()
