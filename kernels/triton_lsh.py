"""Triton core of shared-QK LSH attention: one sorted hash round, forward and backward.

Implements the per-round core contract of ``reformer.kernels.lsh_common`` (same signatures as
the pure-PyTorch ``ref_lsh``; hashing, sorting and the round combination stay in torch there).

Limits:
- dtypes: float32, float16, bfloat16. Logits, softmax and accumulators are float32; float32
  uses 3xTF32 dots, float16/bfloat16 tensor-core dots with float32 intermediates split into a
  head and a tail (about float32 accuracy).
- head dims 16..128 (any value, padded to a power of two with masks).
- bucket_size: any positive int (a runtime argument; blocks may span several chunks). Blocks
  are 64 x 64 (float16/bfloat16) or 32 x 32 (float32) rows, so buckets much smaller than a
  block compute logits that the chunk mask then discards.
- any number of chunks C = Np / bucket_size >= 1; with C == 1 a chunk attends to itself once.
- CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).

Design: forward, one program per (query block, group) streams the keys of its rows' chunks and
of the chunks before them (wrap-around) through an online softmax; a (query, key) pair is kept
when the key's chunk is the query's or the one before. Keys are normalised in the kernel and
the normalisation is applied to the logits as a per-key float32 scale, so no rounded
normalised key enters a matmul. Backward (flash-attention-2 style, no atomics): a query-centric
kernel writes each row's query-use gradient, then a key-centric kernel adds each row's
key-use gradient (over the queries of its chunk and of the next chunk, which looks back at
it), chained through the normalisation, and writes dv.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lsh_common import KEY_EPS, SELF_LOGIT
from .triton_configs import AotSpec, KernelConfig, Launcher, check_kernel_dtype, dot_dtype, head_block, storage_dtype
from .triton_tiles import INT32_LIMIT, pow2_split, program_id64, dot, dot_hi_lo, finish_softmax, load_tile, lse_for_probs, online_softmax_step, store_tile

_KEY_EPS = tl.constexpr(KEY_EPS)
_SELF_LOGIT = tl.constexpr(SELF_LOGIT)


@triton.jit
def _norm(x):
    """Per-row L2 norm (float32) of a raw key tile."""
    xf = x.to(tl.float32)
    return tl.sqrt(tl.sum(xf * xf, 1))


@triton.jit
def _inv_norm(x):
    """Per-row 1 / max(||x||_2, KEY_EPS): keys are x * _inv_norm(x)."""
    return 1.0 / tl.maximum(_norm(x), _KEY_EPS)


@triton.jit
def _logits(q, x_k, inv_k, rows_q, rows_k, pos_q, pos_k, bucket_size, n_chunks, key_end, scale, causal,
            DOT: tl.constexpr):
    """Masked logits (queries x keys) of raw queries ``q`` against keys ``x_k * inv_k``.

    A key is permitted when it lies before ``key_end`` (the end of the segment being streamed),
    its chunk is the query's chunk or the one before it (wrap-around), neither is padding
    (pos -1) and, when causal, it is not in the query's future. Own position -> SELF_LOGIT.
    """
    s = dot(q, tl.trans(x_k), DOT) * (inv_k * scale)[None, :]
    s = tl.where(pos_q[:, None] == pos_k[None, :], _SELF_LOGIT, s)
    chunk_q, chunk_k = rows_q // bucket_size, rows_k // bucket_size
    look_back = (chunk_q + n_chunks - 1) % n_chunks
    ok = (chunk_k[None, :] == chunk_q[:, None]) | (chunk_k[None, :] == look_back[:, None])
    ok = ok & (rows_k < key_end)[None, :] & (pos_q[:, None] >= 0) & (pos_k[None, :] >= 0)
    ok = ok & ((pos_k[None, :] <= pos_q[:, None]) | (causal == 0))
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _key_segment(seg, first_row, last_row, bucket_size, n_chunks):
    """Rows [lo, hi) of the keys seen by query rows first_row..last_row, in two segments:
    0 = their chunks and the chunk before the first one; 1 = the last chunk when they include
    chunk 0 and it is not already in segment 0 (wrap-around), else empty."""
    c0, c1 = first_row // bucket_size, last_row // bucket_size
    wrap = (seg == 1) & (c0 == 0) & (c1 < n_chunks - 1)
    lo = tl.where(seg == 0, tl.maximum(c0 - 1, 0) * bucket_size, tl.where(wrap, (n_chunks - 1) * bucket_size, 0))
    hi = tl.where(seg == 0, (c1 + 1) * bucket_size, tl.where(wrap, n_chunks * bucket_size, 0))
    return lo, hi


@triton.jit
def _query_segment(seg, first_row, last_row, bucket_size, n_chunks):
    """Rows [lo, hi) of the queries that see key rows first_row..last_row, in two segments:
    0 = their chunks and the chunk after the last one; 1 = chunk 0 when they include the last
    chunk and chunk 0 is not already in segment 0 (wrap-around), else empty."""
    c0, c1 = first_row // bucket_size, last_row // bucket_size
    wrap = (seg == 1) & (c1 == n_chunks - 1) & (c0 > 0)
    lo = tl.where(seg == 0, c0 * bucket_size, 0)
    hi = tl.where(seg == 0, tl.minimum(c1 + 2, n_chunks) * bucket_size, tl.where(wrap, bucket_size, 0))
    return lo, hi


@triton.jit
def _lsh_fwd_kernel(
    QK, V, Pos, Out, Lse,
    stride_g, stride_n, n_rows, bucket_size, head_dim, scale, causal,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query block, group): its queries against the keys of their chunks and
    of the chunks before them, streamed block by block through an online softmax."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_m = tl.program_id(0) * BLOCK_M
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    n_chunks = n_rows // bucket_size
    offs_d = tl.arange(0, BLOCK_D)
    rows_q = start_m + tl.arange(0, BLOCK_M)
    q = load_tile(QK + g * stride_g, rows_q, n_rows, offs_d, head_dim, stride_n)
    pos_q = tl.load(Pos + g * n_rows + rows_q, mask=rows_q < n_rows, other=-1)
    last_q = tl.minimum(start_m + BLOCK_M, n_rows) - 1

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for seg in range(0, 2):  # runtime loop: one copy of the body
        lo, hi = _key_segment(seg, start_m, last_q, bucket_size, n_chunks)
        for start_n in range(lo, hi, BLOCK_N):
            rows_k = start_n + tl.arange(0, BLOCK_N)
            x_k = load_tile(QK + g * stride_g, rows_k, hi, offs_d, head_dim, stride_n)
            v = load_tile(V + g * stride_g, rows_k, hi, offs_d, head_dim, stride_n)
            pos_k = tl.load(Pos + g * n_rows + rows_k, mask=rows_k < hi, other=-1)
            s = _logits(q, x_k, _inv_norm(x_k), rows_q, rows_k, pos_q, pos_k, bucket_size, n_chunks, hi, scale,
                        causal, DOT)
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT)
    out, lse = finish_softmax(m_i, l_i, acc)
    store_tile(Out + g * stride_g, out, rows_q, n_rows, offs_d, head_dim, stride_n)
    tl.store(Lse + g * n_rows + rows_q, lse, mask=rows_q < n_rows)


@triton.jit
def _tile_grads(q, x_k, inv_k, rows_q, rows_k, pos_q, pos_k, do, v_k, lse, delta, bucket_size, n_chunks, key_end,
                scale, causal, DOT: tl.constexpr):
    """Probabilities p and logit gradients ds (0 at the constant self logit) of one tile."""
    s = _logits(q, x_k, inv_k, rows_q, rows_k, pos_q, pos_k, bucket_size, n_chunks, key_end, scale, causal, DOT)
    p = tl.exp(s - lse_for_probs(lse)[:, None])
    ds = p * (dot(do, tl.trans(v_k), DOT) - delta[:, None])
    return p, tl.where(pos_q[:, None] == pos_k[None, :], 0.0, ds)


@triton.jit
def _lsh_bwd_dq_kernel(
    QK, V, Pos, DO, Lse, Delta, DQK,
    stride_g, stride_n, n_rows, bucket_size, head_dim, scale, causal,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query block, group): writes the query-use gradient of its rows to DQK."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_m = tl.program_id(0) * BLOCK_M
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    n_chunks = n_rows // bucket_size
    offs_d = tl.arange(0, BLOCK_D)
    rows_q = start_m + tl.arange(0, BLOCK_M)
    in_q = rows_q < n_rows
    q = load_tile(QK + g * stride_g, rows_q, n_rows, offs_d, head_dim, stride_n)
    do = load_tile(DO + g * stride_g, rows_q, n_rows, offs_d, head_dim, stride_n)
    pos_q = tl.load(Pos + g * n_rows + rows_q, mask=in_q, other=-1)
    lse = tl.load(Lse + g * n_rows + rows_q, mask=in_q, other=float("-inf"))
    delta = tl.load(Delta + g * n_rows + rows_q, mask=in_q, other=0.0)
    last_q = tl.minimum(start_m + BLOCK_M, n_rows) - 1

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for seg in range(0, 2):  # runtime loop: one copy of the body
        lo, hi = _key_segment(seg, start_m, last_q, bucket_size, n_chunks)
        for start_n in range(lo, hi, BLOCK_N):
            rows_k = start_n + tl.arange(0, BLOCK_N)
            x_k = load_tile(QK + g * stride_g, rows_k, hi, offs_d, head_dim, stride_n)
            v = load_tile(V + g * stride_g, rows_k, hi, offs_d, head_dim, stride_n)
            pos_k = tl.load(Pos + g * n_rows + rows_k, mask=rows_k < hi, other=-1)
            inv_k = _inv_norm(x_k)
            _, ds = _tile_grads(q, x_k, inv_k, rows_q, rows_k, pos_q, pos_k, do, v, lse, delta, bucket_size,
                                n_chunks, hi, scale, causal, DOT)
            # d logit / d q = scale * x_k * inv_k; inv_k reaches 1 / KEY_EPS, so ds * inv_k could
            # overflow float16: scale the raw keys by an exact power of two instead
            pw, c = pow2_split(inv_k)
            dq += dot_hi_lo(ds * (c * scale)[None, :], (x_k.to(tl.float32) * pw[:, None]).to(x_k.dtype), DOT)
    store_tile(DQK + g * stride_g, dq, rows_q, n_rows, offs_d, head_dim, stride_n)


@triton.jit
def _lsh_bwd_dkdv_kernel(
    QK, V, Pos, DO, Lse, Delta, DQK, DV,
    stride_g, stride_n, n_rows, bucket_size, head_dim, scale, causal,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (key block, group): the key-use gradient and dv of its rows, summed over
    the queries of their chunks and of the chunks after them (which look back at them); the
    key-use gradient is chained through the normalisation and added to DQK (from the dq kernel)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_n = tl.program_id(0) * BLOCK_N
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    n_chunks = n_rows // bucket_size
    offs_d = tl.arange(0, BLOCK_D)
    rows_k = start_n + tl.arange(0, BLOCK_N)
    x_k = load_tile(QK + g * stride_g, rows_k, n_rows, offs_d, head_dim, stride_n)
    v = load_tile(V + g * stride_g, rows_k, n_rows, offs_d, head_dim, stride_n)
    pos_k = tl.load(Pos + g * n_rows + rows_k, mask=rows_k < n_rows, other=-1)
    norm = _norm(x_k)
    inv_k = 1.0 / tl.maximum(norm, _KEY_EPS)
    last_k = tl.minimum(start_n + BLOCK_N, n_rows) - 1

    dkey = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # w.r.t. the normalised keys, before * scale
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for seg in range(0, 2):  # runtime loop: one copy of the body
        lo, hi = _query_segment(seg, start_n, last_k, bucket_size, n_chunks)
        for start_m in range(lo, hi, BLOCK_M):
            rows_q = start_m + tl.arange(0, BLOCK_M)
            in_q = rows_q < hi
            q = load_tile(QK + g * stride_g, rows_q, hi, offs_d, head_dim, stride_n)
            do = load_tile(DO + g * stride_g, rows_q, hi, offs_d, head_dim, stride_n)
            pos_q = tl.load(Pos + g * n_rows + rows_q, mask=in_q, other=-1)  # -1: row outside the segment
            lse = tl.load(Lse + g * n_rows + rows_q, mask=in_q, other=float("-inf"))
            delta = tl.load(Delta + g * n_rows + rows_q, mask=in_q, other=0.0)
            p, ds = _tile_grads(q, x_k, inv_k, rows_q, rows_k, pos_q, pos_k, do, v, lse, delta, bucket_size,
                                n_chunks, n_rows, scale, causal, DOT)
            dv += dot_hi_lo(tl.trans(p), do, DOT)
            dkey += dot_hi_lo(tl.trans(ds), q, DOT)

    # chain through key = x / max(||x||, eps): dx = (dkey - key (key . dkey)) / ||x||, or dkey / eps
    dkey = dkey * scale
    key = x_k.to(tl.float32) * inv_k[:, None]
    radial = tl.where(norm > _KEY_EPS, tl.sum(key * dkey, 1), 0.0)
    dx = (dkey - key * radial[:, None]) * inv_k[:, None]
    dq = load_tile(DQK + g * stride_g, rows_k, n_rows, offs_d, head_dim, stride_n)
    store_tile(DQK + g * stride_g, dq + dx, rows_k, n_rows, offs_d, head_dim, stride_n)
    store_tile(DV + g * stride_g, dv, rows_k, n_rows, offs_d, head_dim, stride_n)


# Block configs (autotuned on GPU), independent of bucket_size: a block may span several chunks
# and pairs are masked by chunk. float32 uses smaller tiles (3xTF32 dots need more shared
# memory). The interpreter uses unequal blocks that straddle chunk boundaries in the tests.
_HALF = (KernelConfig({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),)
_F32 = (KernelConfig({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=2),)
CONFIGS = {torch.float32: _F32, torch.float16: _HALF, torch.bfloat16: _HALF}
_TUNE_KEY = ("n_rows", "bucket_size", "BLOCK_D")
_INTERPRETER_CONFIG = KernelConfig({"BLOCK_M": 64, "BLOCK_N": 32})
_FWD = Launcher(_lsh_fwd_kernel, CONFIGS, _TUNE_KEY, _INTERPRETER_CONFIG)
_BWD_DQ = Launcher(_lsh_bwd_dq_kernel, CONFIGS, _TUNE_KEY, _INTERPRETER_CONFIG)
_BWD_DKDV = Launcher(_lsh_bwd_dkdv_kernel, CONFIGS, _TUNE_KEY, _INTERPRETER_CONFIG, restore=("DQK",))


def _check(qk: Tensor, v: Tensor, pos: Tensor, bucket_size: int) -> None:
    """Validate one round's inputs (see the module docstring for the limits)."""
    check_kernel_dtype("qk", qk.dtype)
    if not isinstance(bucket_size, int) or bucket_size < 1:
        raise ValueError(f"bucket_size must be a positive int, got {bucket_size!r}")
    if qk.dim() != 3 or v.shape != qk.shape or v.dtype != qk.dtype:
        raise ValueError(f"qk and v must both be (G, Np, D) of one dtype, got {tuple(qk.shape)} and {tuple(v.shape)}")
    if qk.shape[1] % bucket_size != 0:
        raise ValueError(f"Np = {qk.shape[1]} must be a multiple of bucket_size = {bucket_size}")
    if pos.shape != qk.shape[:2] or pos.dtype != torch.int32:
        raise ValueError(
            f"pos must be int32 of shape (G, Np) = {tuple(qk.shape[:2])}, got {pos.dtype} {tuple(pos.shape)}"
        )
    head_block("qk", qk.shape[2])
    if qk.shape[1] * qk.shape[2] >= INT32_LIMIT:
        raise ValueError(f"one group of qk must hold fewer than 2**31 elements, got Np * D = {qk.shape[1] * qk.shape[2]}")


def _launch(launcher: Launcher, block: str, qk: Tensor, bucket_size: int, *tensors: Tensor, causal: bool,
            scale: float) -> None:
    """Run one LSH kernel with one program per (``block`` of rows, group); tensors are contiguous."""
    g, n_rows, d = qk.shape
    launcher.run(
        qk.dtype, lambda meta: (triton.cdiv(n_rows, meta[block]), g), *tensors, qk.stride(0), qk.stride(1),
        n_rows, bucket_size, d, scale, int(causal), DOT=dot_dtype(qk.dtype, launcher.interpreted),
        BLOCK_D=head_block("qk", d),
    )


def fwd(qk: Tensor, v: Tensor, pos: Tensor, *, bucket_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """One round's chunked look-back attention on sorted rows.

    qk, v: (G, Np, D); pos: (G, Np) int32 original positions, -1 = padding.
    Returns out (G, Np, D) in the input dtype and lse (G, Np) float32 (-inf where a row has no
    permitted key; its out is 0).
    """
    _check(qk, v, pos, bucket_size)
    qk, v, pos = qk.contiguous(), v.contiguous(), pos.contiguous()
    out = torch.empty(qk.shape, device=qk.device, dtype=storage_dtype(qk.dtype, _FWD.interpreted))
    lse = torch.empty(qk.shape[:2], device=qk.device, dtype=torch.float32)
    _launch(_FWD, "BLOCK_M", qk, bucket_size, qk, v, pos, out, lse, causal=causal, scale=scale)
    return out.to(qk.dtype), lse


def bwd(qk: Tensor, v: Tensor, pos: Tensor, do: Tensor, lse: Tensor, delta: Tensor, *,
        bucket_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of one round given the COMBINED (all rounds) lse and delta = rowsum(dO * O).

    qk, v, do: (G, Np, D); pos: (G, Np) int32; lse, delta: (G, Np) float32 in this round's order.
    p = exp(s - lse) (0 where lse = -inf). Returns dqk (through both the query and the
    normalised-key use of qk) and dv, both (G, Np, D) float32.
    """
    _check(qk, v, pos, bucket_size)
    qk, v, pos, do = qk.contiguous(), v.contiguous(), pos.contiguous(), do.to(qk.dtype).contiguous()
    lse, delta = lse.float().contiguous(), delta.float().contiguous()
    dqk = torch.empty(qk.shape, device=qk.device, dtype=torch.float32)
    dv = torch.empty_like(dqk)
    args = (qk, v, pos, do, lse, delta, dqk)
    _launch(_BWD_DQ, "BLOCK_M", qk, bucket_size, *args, causal=causal, scale=scale)
    _launch(_BWD_DKDV, "BLOCK_N", qk, bucket_size, *args, dv, causal=causal, scale=scale)  # adds into dqk
    return dqk, dv


def aot_specs() -> list[AotSpec]:
    """Every configuration the launchers can run (``causal`` and ``bucket_size`` are runtime arguments)."""
    types = {"QK": "*{dt}", "V": "*{dt}", "DO": "*{dt}", "Out": "*{dt}", "Pos": "*i32", "Lse": "*fp32",
             "Delta": "*fp32", "DQK": "*fp32", "DV": "*fp32", "scale": "fp32"}
    return [spec for launcher in (_FWD, _BWD_DQ, _BWD_DKDV) for spec in launcher.aot_specs(types)]
