"""LSH hashing for shared-QK attention: rotations, plain and factorised buckets, the default rule.

Semantics in docs/lsh.md ("Hashing"). In short, for one head and one round with random
Gaussian rotations ``R``:

- plain, ``n_buckets = n`` (even >= 2): ``R`` is ``(D, n/2)`` and
  ``bucket = argmax([x R ; -x R])`` (ties go to the lowest index);
- factorised, ``n_buckets = (n1, n2)`` or ``(n1, n2, n3)`` (each even >= 2, ``n1 * n2 [* n3]``
  buckets): ``R = [R1 | R2 | R3]`` with ``R_i`` ``(D, n_i/2)``, ``b_i = argmax([x R_i ; -x R_i])``
  and ``bucket = b1 * n2 + b2`` (``(b1 * n2 + b2) * n3 + b3`` for three factors). Hashing costs
  ``O(D (n1 + n2 [+ n3]) / 2)`` per position and round instead of ``O(D n1 n2 [n3] / 2)``.

Rotations for all heads and rounds are one tensor ``(H, D, n_hashes, W)`` with ``W = n/2``
(plain) or ``W = sum(n_i) / 2`` (factorised, ``R1`` first).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

NBuckets = Union[int, tuple[int, ...]]  # plain: an int; factorised: 2 or 3 factors

KEY_EPS = 1e-6  # keys are qk / max(||qk||_2, KEY_EPS)
HASH_SLAB_BYTES = 8 * 2**20  # bound on the rotated-vector buffer while hashing
FACTORISE_ABOVE = 256  # default rule: plain hashing up to this many buckets, factorised beyond ...
THREE_FACTORS_ABOVE = 4096  # ... into two factors up to this many, into three beyond
MAX_FACTORS = 3


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
    """``n_buckets`` is an even int >= 2 (plain hashing) or a tuple/list of 2 or 3 even ints >= 2
    (factorised hashing). Returns an int or a tuple; a non-int count is a ``TypeError``, a bad
    value a ``ValueError``."""
    if isinstance(n_buckets, (tuple, list)):
        if not 2 <= len(n_buckets) <= MAX_FACTORS:
            raise ValueError(f"a factorised n_buckets must have 2 or 3 factors, (n1, n2) or (n1, n2, n3), "
                             f"got {n_buckets!r}")
        return tuple(_check_count(f"n_buckets[{i}]", f) for i, f in enumerate(n_buckets))
    if not isinstance(n_buckets, int) or isinstance(n_buckets, bool):
        raise TypeError(f"n_buckets must be None, an even int >= 2 or a tuple of 2 or 3 even ints, got {n_buckets!r}")
    return _check_count("n_buckets", n_buckets)


def total_buckets(n_buckets: NBuckets) -> int:
    """Number of distinct bucket ids: ``n`` or the product of the factors."""
    return math.prod(n_buckets) if isinstance(n_buckets, tuple) else n_buckets


def rotation_width(n_buckets: NBuckets) -> int:
    """Last dim of the rotations: ``n/2`` (plain) or ``sum(n_i)/2`` (factorised)."""
    return sum(n_buckets) // 2 if isinstance(n_buckets, tuple) else n_buckets // 2


def default_n_buckets(n: int, bucket_size: int) -> NBuckets:
    """The automatic bucket count for sequence length ``n`` (docs/lsh.md, "The default rule").

    ``m = 2 * ceil(n / bucket_size)`` buckets (about half a chunk per bucket, as in the paper).
    Up to ``FACTORISE_ABOVE`` (256) buckets this is plain hashing with ``m`` buckets; up to
    ``THREE_FACTORS_ABOVE`` (4096), two factors ``(n1, n2)`` with ``n1 = 2 * ceil(sqrt(m) / 2)``
    and ``n2 = 2 * ceil(m / (2 n1))``; beyond, three factors ``(n1, n2, n3)`` with
    ``n1 = 2 * ceil(cbrt(m) / 2)`` and ``(n2, n3)`` the two-factor rule for ``ceil(m / n1)``.
    Every factor is even, their product is at least ``m`` and each is close to ``sqrt(m)``
    (``cbrt(m)``), so hashing costs ``O(D sqrt(m))`` per position with two factors and
    ``O(D cbrt(m))`` with three.
    """
    m = 2 * max(1, -(-n // bucket_size))
    if m <= FACTORISE_ABOVE:
        return m
    if m <= THREE_FACTORS_ABOVE:
        return _two_factors(m)
    root = round(m ** (1 / 3))
    cbrt = root if root**3 == m else m ** (1 / 3)
    n1 = 2 * math.ceil(cbrt / 2)
    return (n1, *_two_factors(-(-m // n1)))


def _two_factors(m: int) -> tuple[int, int]:
    n1 = 2 * math.ceil(math.sqrt(m) / 2)
    return n1, 2 * math.ceil(m / (2 * n1))


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
    a tuple of 2 or 3 factors (factorised, ``W = sum(n_i)/2``) or None (plain with ``2 W`` buckets). Returns
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
        else:  # mixed radix: ((b1 * n2) + b2) * n3 + b3
            ids, col = None, 0
            for f in factors:
                b_i = _signed_argmax(rotated[..., col:col + f // 2])
                ids = b_i if ids is None else ids.mul_(f).add_(b_i)
                col += f // 2
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
