"""Triton LSH hashing: bucket ids of every position, head and round in ONE kernel launch.

Same contract as ``reformer.kernels.hashing.hash_buckets`` (docs/lsh.md, "Hashing"):
plain hashing ``argmax([x R ; -x R])`` (ties to the lowest index) with ``R = rotations[h, :, r]``
of width ``n_buckets / 2``, or factorised hashing ``(n1, n2)`` / ``(n1, n2, n3)``:
``R = [R1 | R2 | R3]`` of widths ``n_i/2``, ``b_i = argmax([x R_i ; -x R_i])``, bucket
``b1 * n2 + b2`` (``(b1 * n2 + b2) * n3 + b3``).

One program per (block of positions, batch x head) computes ``x R`` for every round on the fly
(float32 dots, ``ieee`` precision, as the torch path's float32 einsum) and keeps only the
running signed argmax, so the rotated vectors never reach memory: the whole call is one launch
whatever N (the torch path runs ~8 ops per slab of positions), reading qk once and writing
``4 * B*H*R*N`` bytes of int32 bucket ids.

Limits: float32/float16/bfloat16 qk (hashed in float32), head dims 16..128, rotation width up to
``MAX_WIDTH``; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_configs import KernelConfig, Launcher, check_kernel_dtype, head_block
from .triton_tiles import program_id64

MAX_WIDTH = 1024  # rotation columns per round held in registers per block (power-of-two padded)


@triton.jit
def _signed_argmax(rot, cols, lo, hi):
    """argmax([r ; -r]) over columns lo..hi-1 of ``rot`` (BLOCK_N, W), ties to the lowest index."""
    inside = (cols >= lo) & (cols < hi)
    top = tl.where(inside[None, :], rot, float("-inf"))
    low = tl.where(inside[None, :], -rot, float("-inf"))
    top_v = tl.max(top, 1)
    low_v = tl.max(low, 1)
    top_i = tl.argmax(top, 1, tie_break_left=True) - lo
    low_i = tl.argmax(low, 1, tie_break_left=True) - lo
    return tl.where(top_v >= low_v, top_i, low_i + (hi - lo))


@triton.jit
def _hash_kernel(
    QK, Rot, Out,
    n, n_heads, head_dim, n_hashes, width, end1, end2, n2, n3,
    N_FACTORS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """Out[b, h, r, i] for positions i of one block of one (b, h) and every round r."""
    start = tl.program_id(0) * BLOCK_N
    g = program_id64(1)  # b * n_heads + h
    h = g % n_heads
    rows = start + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    cols = tl.arange(0, BLOCK_W)
    x = tl.load(QK + g * n * head_dim + rows[:, None] * head_dim + dims[None, :],
                mask=(rows[:, None] < n) & (dims[None, :] < head_dim), other=0.0).to(tl.float32)
    for r in range(0, n_hashes):
        # rotations (H, D, R, W): element (h, d, r, c) at ((h * D + d) * R + r) * W + c
        rot_ptrs = Rot + ((h * head_dim + dims[:, None]) * n_hashes + r) * width + cols[None, :]
        rot_t = tl.load(rot_ptrs, mask=(dims[:, None] < head_dim) & (cols[None, :] < width), other=0.0)
        rotated = tl.dot(x, rot_t, input_precision="ieee")  # (BLOCK_N, BLOCK_W) float32
        # factor i owns columns [end_{i-1}, end_i) (end_0 = 0, the last factor ends at width)
        ids = _signed_argmax(rotated, cols, 0, end1)
        if N_FACTORS >= 2:
            ids = ids * n2 + _signed_argmax(rotated, cols, end1, end2)
        if N_FACTORS >= 3:
            ids = ids * n3 + _signed_argmax(rotated, cols, end2, width)
        tl.store(Out + (g * n_hashes + r) * n + rows, ids.to(tl.int32), mask=rows < n)


_LAUNCHER = Launcher(_hash_kernel, {dt: (KernelConfig({"BLOCK_N": 64}, num_warps=4, num_stages=1),)
                                    for dt in (torch.float32, torch.float16, torch.bfloat16)},
                     ("n", "width", "BLOCK_D"), KernelConfig({"BLOCK_N": 32}))


def hash_buckets(qk: Tensor, rotations: Tensor, n_buckets: Optional[Union[int, tuple[int, ...]]] = None, *,
                 dtype: torch.dtype = torch.int64) -> Tensor:
    """Bucket ids ``(B, H, n_hashes, N)`` of ``dtype`` in one launch (see the module docstring).

    qk: ``(B, H, N, D)``; rotations: ``(H, D, n_hashes, W)``; n_buckets: int (plain, ``W = n/2``),
    tuple of 2 or 3 factors (factorised, ``W = sum(n_i)/2``) or None (plain with ``2 W`` buckets).
    """
    check_kernel_dtype("qk", qk.dtype)
    b, h, n, d = qk.shape
    if rotations.dim() != 4 or tuple(rotations.shape[:2]) != (h, d):
        raise ValueError(f"rotations must have shape (H, D, n_hashes, W) with (H, D) = {(h, d)}, "
                         f"got {tuple(rotations.shape)}")
    n_hashes, width = rotations.shape[2], rotations.shape[3]
    if width > MAX_WIDTH:
        raise ValueError(f"rotation width must be at most {MAX_WIDTH} for the Triton hashing kernel, got {width}")
    factors = n_buckets if isinstance(n_buckets, tuple) else (2 * width,)
    ends = [sum(f // 2 for f in factors[:i + 1]) for i in range(len(factors))] + [width, width]
    n2, n3 = (list(factors[1:]) + [1, 1])[:2]
    out = torch.empty(b, h, n_hashes, n, dtype=torch.int32, device=qk.device)
    if out.numel() == 0:
        return out.to(dtype)
    qk_c = qk.contiguous()
    rot = rotations.to(torch.float32).contiguous()
    block_w = max(16, triton.next_power_of_2(width))
    _LAUNCHER.run(qk.dtype, lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), b * h), qk_c, rot, out, n, h, d,
                  n_hashes, width, ends[0], ends[1], n2, n3, N_FACTORS=len(factors), BLOCK_D=head_block("qk", d),
                  BLOCK_W=block_w)
    return out if dtype == torch.int32 else out.to(dtype)
