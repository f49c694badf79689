"""Triton core of shared-QK LSH attention: one hash round, forward and backward.

Two entry points over the same three kernels:

- the sorted per-round core, :func:`fwd` / :func:`bwd` (the signatures of the pure-PyTorch
  ``ref_lsh`` core): rows already sorted by (bucket, position) and padded to ``Np``;
- the round-level protocol, :func:`forward_round` / :func:`backward_round`: rows stay
  UNSORTED in memory; the kernels read each sorted slot's row through ``order`` (the row at
  sorted slot s of group g is ``order[g, s]``), merge the round's output and log-sum-exp
  straight into float32 running accumulators at the unsorted rows (running max + rescale), and
  add the gradients into float32 ``dqk``/``dv`` at the unsorted rows. No gather, sort, scatter
  or merge pass runs in torch; every row belongs to one program per round, so no atomics.
  The sorted core is the round-level kernels with ``order = arange(Np)`` and zeroed
  accumulators (exact: a single round merged into empty sums is that round's output).

Semantics of one round (``docs/lsh.md``): slots are cut into chunks of ``bucket_size``; key
slot j is permitted for query slot i when i != j, neither row is padding (pos -1, or a slot
past the N rows of the round) and

- ``causal_mode="chunk"``: j's chunk is i's chunk or the one before (wrap-around; a single
  chunk attends to itself once) and, when causal, ``pos[j] <= pos[i]``;
- ``causal_mode="bucket"`` (causal only, no look-ahead, no wrap-around):
  ``bkt[j] == bkt[i]`` and ``i - bucket_size < j < i``.

A row with no permitted key gets out 0 and lse -inf (in a merge it adds nothing).

Bucket mode takes the aligned layout (``lsh_function.align_buckets``; docs/lsh.md, "Causal
modes"): ``order``/``bkt`` may have ``S >= N`` slots per group (a multiple of bucket_size),
holes having order -1 (no row: masked loads, pos -1, nothing stored). Its tiles are aligned to
chunks (``cdiv(bucket_size, BLOCK)`` tiles per chunk) and stream the look-back chunk and the own
chunk (queries: the own and the next chunk) as separate segments in blocks at fixed offsets from
each chunk's start, so with the aligned layout every row's arithmetic is the same whatever later
positions hash to (bit-identical no-look-ahead). Chunk mode is unchanged.

Limits:
- dtypes: float32, float16, bfloat16. Logits, softmax and accumulators are float32; float32
  uses 3xTF32 dots, float16/bfloat16 tensor-core dots with float32 intermediates split into a
  head and a tail (about float32 accuracy). A score gradient is divided by a key norm (which
  may be as small as KEY_EPS) only inside an exact power-of-two rescaling of the key tile
  (:func:`_scaled_keys`), so nothing leaves the float16 range.
- range: any finite input. Key rows are scaled by the exact power of two of their largest entry
  before the norm is taken and before they enter a dot (:func:`_scaled_keys`), so the norm
  cannot overflow (a plain float32 sum of squares does above ~1.8e19) and a huge-norm query
  against a huge-norm key cannot overflow the dot; the round's lse is float64 in the forward merge and
  the combined lse is split into float32 ``hi + lo`` in the backward, so huge logits (1e7 and
  beyond, where float32 rounds ``log(sum)`` away) keep their probabilities exact.
- head dims 16..128 (any value, padded to a power of two with masks).
- bucket_size: any positive int (a runtime argument; blocks may span several chunks).
- offsets: the group index is int64; one group must hold fewer than 2**31 elements (checked).
- CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).

Design: forward, one program per (query block, group) streams the keys its rows may see
through an online softmax. Keys are normalised in the kernel: the raw key tile is scaled by an
exact power of two per key and the rest of ``1 / ||key||`` (a factor <= 1) is applied to the
logits as a per-key float32 scale, so no rounded normalised key enters a matmul.
Backward (flash-attention-2 style, no atomics): a query-centric kernel adds each row's
query-use gradient, then a key-centric kernel adds each row's key-use gradient (chained
through the normalisation) and dv.

Bytes moved per call (round level, compulsory traffic; E = element size of the inputs,
G groups of N rows, head dim D, Np = N rounded up to bucket_size, K = key slots a query block
streams, about 2 * bucket_size + BLOCK_N in chunk mode and bucket_size + BLOCK_M in bucket
mode, see :func:`model_bytes`; in bucket mode read N as the aligned layout's slot count S,
about 2N):

- forward_round: queries ``G*N*D*E`` + keys and values ``2 * G*Np/BLOCK_M * K * D*E`` (re-read
  per query block; mostly from L2) + order/bkt/pos ``12 * G*N`` + accumulators read and
  written ``2 * G*N*(D * 4 + 2 * 8)`` (out float32, top and total float64).
- backward_round: the dq kernel reads q, dO (``2 G*N*D*E``), lse (float64)/delta/order/pos/bkt
  (``24 G*N``), streams keys and values as the forward does and reads+writes dqk
  (``2 G*N*D*4``); the dk/dv kernel reads its keys and values (``2 G*N*D*E``), streams
  queries, dO, lse, delta (``G*Np/BLOCK_N * K * (2 D*E + 12)``) and reads+writes dqk and dv
  (``4 G*N*D*4``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .hashing import KEY_EPS
from .triton_configs import AotSpec, KernelConfig, Launcher, check_kernel_dtype, dot_dtype, head_block
from .triton_tiles import (
    INT32_LIMIT,
    dot,
    dot_hi_lo,
    finish_softmax,
    lse_for_probs,
    online_softmax_step,
    program_id64,
)

_KEY_EPS = tl.constexpr(KEY_EPS)
CAUSAL_MODES = {"chunk": 0, "bucket": 1}


@triton.jit
def _scaled_keys(x):
    """Normalised keys ``x / max(||x||_2, KEY_EPS)`` of a raw key tile as ``xs * c``, for any
    finite rows (norm 0 .. 3e38) without overflow or underflow.

    ``xs = x * 2**-e`` with ``2**e`` the power of two of the row's largest entry: exact in x's
    dtype (barring, in float16, entries more than 2**14 below the largest), its largest entry in
    [1, 2), so its sum of squares cannot overflow (a plain float32 sum of squares does for norms
    above ~1.8e19) and the norm is not lost to underflow; products with ``xs`` cannot overflow
    where products with the raw row could (a huge query against a huge key: ``q . x ~ ||x||^2``).
    ``c = 1 / max(||xs||, KEY_EPS * 2**-e) <= 1`` per row (float32). Returns ``(xs, c, inv,
    clamped)``: ``inv = c * 2**-e = 1 / max(||x||, KEY_EPS)`` and ``clamped = ||x|| <= KEY_EPS``.
    """
    xf = x.to(tl.float32)
    big = tl.max(tl.abs(xf), 1)
    field = (big.to(tl.int32, bitcast=True) >> 23) & 0xFF  # biased exponent (0 for 0 and subnormals)
    pw = ((254 - tl.minimum(field, 253)) << 23).to(tl.float32, bitcast=True)  # 2**-e, exact
    xs = xf * pw[:, None]
    norm_s = tl.sqrt(tl.sum(xs * xs, 1))  # ||x|| * 2**-e
    eps_s = _KEY_EPS * pw  # KEY_EPS * 2**-e, exact
    c = 1.0 / tl.maximum(norm_s, eps_s)
    return xs.to(x.dtype), c, c * pw, norm_s <= eps_s


@triton.jit
def lse64(m_i, l_i):
    """Log-sum-exp ``m_i + log(l_i)`` of an online softmax in float64 (-inf where ``l_i`` is 0):
    in float32 a huge max logit (1e7) would round the ``log(l_i)`` digits away."""
    has_key = l_i > 0.0
    return tl.where(has_key, m_i.to(tl.float64) + tl.log(tl.where(has_key, l_i, 1.0)).to(tl.float64),
                    float("-inf"))


@triton.jit
def lse_parts(lse):
    """A float64 log-sum-exp per row as float32 ``(hi, lo)``, ``hi + lo = lse``, for
    ``p = exp((s - hi) - lo)``: no digit of a huge lse is lost (float32 alone rounds an lse of
    1e7 to a whole number). Rows without keys (lse -inf) get hi = +inf and lo = 0, so p = 0."""
    hi = lse.to(tl.float32)
    finite = (hi > float("-inf")) & (hi < float("inf"))
    lo = tl.where(finite, (lse - tl.where(finite, hi, 0.0).to(tl.float64)).to(tl.float32), 0.0)
    return lse_for_probs(hi), lo


@triton.jit
def _slot_rows(Order, slots, in_range):
    """Memory rows of sorted ``slots`` (``Order`` already offset to the group), 0 outside."""
    return tl.load(Order + slots, mask=in_range, other=0)


@triton.jit
def _load_rows(base, rows, valid, cols, n_cols, stride_row):
    """(len(rows), len(cols)) tile of the rows ``rows`` (gathered), zeros where not ``valid``."""
    mask = valid[:, None] & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _add_rows(base, value, rows, valid, cols, n_cols, stride_row):
    """``base[rows] += value`` (float32) where ``valid``; rows are owned by this program."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :]
    mask = valid[:, None] & (cols[None, :] < n_cols)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + value, mask=mask)


@triton.jit
def _logits(q, xs_k, c_k, slot_q, slot_k, pos_q, pos_k, bkt_q, bkt_k, bucket_size, n_chunks, key_end, scale,
            causal, mode, DOT: tl.constexpr):
    """Masked logits (queries x keys) of raw queries ``q`` against keys ``xs_k * c_k`` (the
    normalised keys as :func:`_scaled_keys` gives them: the factor ``c_k`` is a float32 scale
    on the logits, so no rounded normalised key enters the dot).

    Keys at or past ``key_end`` (the end of the segment being streamed) are not permitted, nor
    the query's own slot, nor padding (pos -1). Chunk mode (``mode`` 0): the key's chunk is the
    query's or the one before (wrap-around) and, when causal, ``pos_k <= pos_q``. Bucket mode
    (1): same bucket and ``slot_q - bucket_size < slot_k < slot_q``.
    """
    s = dot(q, tl.trans(xs_k), DOT) * (c_k * scale)[None, :]
    sq, sk = slot_q[:, None], slot_k[None, :]
    ok = (sk < key_end) & (sq != sk) & (pos_q[:, None] >= 0) & (pos_k[None, :] >= 0)
    chunk_q, chunk_k = sq // bucket_size, sk // bucket_size
    look_back = (chunk_q + n_chunks - 1) % n_chunks
    chunk_ok = ((chunk_k == chunk_q) | (chunk_k == look_back)) & ((pos_k[None, :] <= pos_q[:, None]) | (causal == 0))
    bucket_ok = (bkt_q[:, None] == bkt_k[None, :]) & (sk < sq) & (sk > sq - bucket_size)
    ok = ok & tl.where(mode == 1, bucket_ok, chunk_ok)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _tile(pid, n_slots, bucket_size, mode, BLOCK: tl.constexpr):
    """First slot and end (exclusive) of the slots of tile ``pid``. Chunk mode: tiles of BLOCK
    slots from slot 0. Bucket mode: tiles aligned to chunks (``cdiv(bucket_size, BLOCK)`` tiles
    per chunk, the last one cut at the chunk's end), so every tile, and every block a tile
    streams, sits at the same offsets relative to its chunk whatever the chunk's index: with the
    aligned layout a row's arithmetic then depends only on its own bucket's history."""
    per_chunk = tl.where(mode == 1, (bucket_size + BLOCK - 1) // BLOCK, 1)
    chunk = pid // per_chunk
    start = tl.where(mode == 1, chunk * bucket_size + (pid % per_chunk) * BLOCK, pid * BLOCK)
    end = tl.where(mode == 1, tl.minimum(chunk * bucket_size + bucket_size, start + BLOCK),
                   tl.minimum(start + BLOCK, n_slots))
    return start, end


@triton.jit
def _key_segment(seg, first, last, bucket_size, n_chunks, mode, BLOCK_N: tl.constexpr):
    """Slots [lo, hi) of the keys seen by query slots first..last, in two segments.

    Chunk mode: 0 = their chunks and the chunk before the first one; 1 = the last chunk when
    they include chunk 0 and it is not already in segment 0 (wrap-around), else empty.
    Bucket mode (first..last inside one chunk starting at slot cs): 0 = the look-back chunk
    from the first BLOCK_N-aligned offset that holds a key of slot ``first`` (``first -
    bucket_size + 1``), empty for chunk 0; 1 = slots cs .. last - 1. Blocks of BLOCK_N keys are
    streamed from lo, so they sit at fixed offsets from their chunk's start, as the key tiles of
    the dk/dv kernel do.
    """
    c0, c1 = first // bucket_size, last // bucket_size
    wrap = (seg == 1) & (c0 == 0) & (c1 < n_chunks - 1)
    lo = tl.where(seg == 0, tl.maximum(c0 - 1, 0) * bucket_size, tl.where(wrap, (n_chunks - 1) * bucket_size, 0))
    hi = tl.where(seg == 0, (c1 + 1) * bucket_size, tl.where(wrap, n_chunks * bucket_size, 0))
    cs = c0 * bucket_size
    b_lo = tl.where(seg == 0, cs - bucket_size + ((first - cs + 1) // BLOCK_N) * BLOCK_N, cs)
    b_hi = tl.where(seg == 0, tl.where(c0 == 0, b_lo, cs), last)
    return tl.where(mode == 1, b_lo, lo), tl.where(mode == 1, b_hi, hi)


@triton.jit
def _query_segment(seg, first, last, bucket_size, n_chunks, mode, BLOCK_M: tl.constexpr):
    """Slots [lo, hi) of the queries that see key slots first..last, in two segments.

    Chunk mode: 0 = their chunks and the chunk after the last one; 1 = chunk 0 when they
    include the last chunk and chunk 0 is not already in segment 0 (wrap-around), else empty.
    Bucket mode (first..last inside one chunk starting at slot cs): 0 = their chunk from the
    first BLOCK_M-aligned offset that holds a query of slot ``first``; 1 = the next chunk up to
    slot last + bucket_size - 1. Blocks of BLOCK_M queries are streamed from lo, so they sit at
    fixed offsets from their chunk's start, as the query tiles of the other kernels do.
    """
    c0, c1 = first // bucket_size, last // bucket_size
    wrap = (seg == 1) & (c1 == n_chunks - 1) & (c0 > 0)
    lo = tl.where(seg == 0, c0 * bucket_size, 0)
    hi = tl.where(seg == 0, tl.minimum(c1 + 2, n_chunks) * bucket_size, tl.where(wrap, bucket_size, 0))
    cs = c0 * bucket_size
    b_lo = tl.where(seg == 0, cs + ((first + 1 - cs) // BLOCK_M) * BLOCK_M, cs + bucket_size)
    b_hi = tl.where(seg == 0, cs + bucket_size, tl.minimum(last + bucket_size, n_chunks * bucket_size))
    return tl.where(mode == 1, b_lo, lo), tl.where(mode == 1, b_hi, hi)


@triton.jit(do_not_specialize=["causal", "mode"])
def _lsh_fwd_kernel(
    QK, V, Pos, Order, Bkt, Out, Top, Total,
    stride_g, n_rows, n_order, n_slots, bucket_size, head_dim, scale, causal, mode,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query block, group): its queries against the keys their slots may see,
    streamed block by block through an online softmax, merged into (Out, Top, Total)."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_m, end_m = _tile(tl.program_id(0), n_slots, bucket_size, mode, BLOCK_M)
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    qk_g, v_g, pos_g = QK + g * stride_g, V + g * stride_g, Pos + g * n_rows
    order_g, bkt_g = Order + g * n_order, Bkt + g * n_order
    n_chunks = n_slots // bucket_size
    offs_d = tl.arange(0, BLOCK_D)
    slot_q = start_m + tl.arange(0, BLOCK_M)
    in_q = (slot_q < end_m) & (slot_q < n_order)
    row_q = _slot_rows(order_g, slot_q, in_q)
    in_q = in_q & (row_q >= 0)  # a hole of the aligned layout (order -1) is no row
    q = _load_rows(qk_g, row_q, in_q, offs_d, head_dim, head_dim)
    pos_q = tl.load(pos_g + row_q, mask=in_q, other=-1)
    bkt_q = tl.load(bkt_g + slot_q, mask=in_q, other=-1)
    last_q = end_m - 1

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for seg in range(0, 2):  # runtime loop: one copy of the body
        lo, hi = _key_segment(seg, start_m, last_q, bucket_size, n_chunks, mode, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            slot_k = start_n + tl.arange(0, BLOCK_N)
            in_k = (slot_k < hi) & (slot_k < n_order)
            # a hole of the aligned layout (order -1) reads row 0 and is masked by its bucket (-1)
            row_k = tl.maximum(_slot_rows(order_g, slot_k, in_k), 0)
            x_k = _load_rows(qk_g, row_k, in_k, offs_d, head_dim, head_dim)
            v = _load_rows(v_g, row_k, in_k, offs_d, head_dim, head_dim)
            pos_k = tl.load(pos_g + row_k, mask=in_k, other=-1)
            bkt_k = tl.load(bkt_g + slot_k, mask=in_k, other=-1)
            xs_k, c_k, _, _ = _scaled_keys(x_k)
            s = _logits(q, xs_k, c_k, slot_q, slot_k, pos_q, pos_k, bkt_q, bkt_k, bucket_size, n_chunks,
                        hi, scale, causal, mode, DOT)
            m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT)
    out, _ = finish_softmax(m_i, l_i, acc)
    lse = lse64(m_i, l_i)  # float64: the merge weights below keep every digit of a huge lse

    # merge (top and total in float64, as the Function keeps them): top' = max(top, lse);
    # out' = out e^(top - top') + o e^(lse - top'); total' = total e^(top - top') + e^(lse - top')
    top = tl.load(Top + g * n_rows + row_q, mask=in_q, other=float("-inf"))
    new_top = tl.maximum(top, lse)
    base = tl.where(new_top == float("-inf"), 0.0, new_top)
    w_old, w_new = tl.exp(top - base), tl.exp(lse - base)
    total = tl.load(Total + g * n_rows + row_q, mask=in_q, other=0.0)
    tl.store(Top + g * n_rows + row_q, new_top, mask=in_q)
    tl.store(Total + g * n_rows + row_q, total * w_old + w_new, mask=in_q)
    out_ptrs = Out + g * stride_g + row_q[:, None] * head_dim + offs_d[None, :]
    out_mask = in_q[:, None] & (offs_d[None, :] < head_dim)
    old = tl.load(out_ptrs, mask=out_mask, other=0.0)
    merged = old * w_old.to(tl.float32)[:, None] + out * w_new.to(tl.float32)[:, None]
    tl.store(out_ptrs, merged, mask=out_mask)


@triton.jit
def _tile_grads(q, xs_k, c_k, slot_q, slot_k, pos_q, pos_k, bkt_q, bkt_k, do, v_k, lse_hi, lse_lo, delta,
                bucket_size, n_chunks, key_end, scale, causal, mode, DOT: tl.constexpr):
    """Probabilities p and logit gradients ds of one tile (``lse_hi``, ``lse_lo``: :func:`lse_parts`)."""
    s = _logits(q, xs_k, c_k, slot_q, slot_k, pos_q, pos_k, bkt_q, bkt_k, bucket_size, n_chunks, key_end, scale,
                causal, mode, DOT)
    p = tl.exp((s - lse_hi[:, None]) - lse_lo[:, None])
    ds = p * (dot(do, tl.trans(v_k), DOT) - delta[:, None])
    return p, ds


@triton.jit(do_not_specialize=["causal", "mode"])
def _lsh_bwd_dq_kernel(
    QK, V, Pos, Order, Bkt, DO, Lse, Delta, DQK,
    stride_g, n_rows, n_order, n_slots, bucket_size, head_dim, scale, causal, mode,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query block, group): adds the query-use gradient of its rows to DQK."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_m, end_m = _tile(tl.program_id(0), n_slots, bucket_size, mode, BLOCK_M)
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    qk_g, v_g, pos_g = QK + g * stride_g, V + g * stride_g, Pos + g * n_rows
    order_g, bkt_g = Order + g * n_order, Bkt + g * n_order
    n_chunks = n_slots // bucket_size
    offs_d = tl.arange(0, BLOCK_D)
    slot_q = start_m + tl.arange(0, BLOCK_M)
    in_q = (slot_q < end_m) & (slot_q < n_order)
    row_q = _slot_rows(order_g, slot_q, in_q)
    in_q = in_q & (row_q >= 0)  # a hole of the aligned layout (order -1) is no row
    q = _load_rows(qk_g, row_q, in_q, offs_d, head_dim, head_dim)
    do = _load_rows(DO + g * stride_g, row_q, in_q, offs_d, head_dim, head_dim)
    pos_q = tl.load(pos_g + row_q, mask=in_q, other=-1)
    bkt_q = tl.load(bkt_g + slot_q, mask=in_q, other=-1)
    lse_hi, lse_lo = lse_parts(tl.load(Lse + g * n_rows + row_q, mask=in_q, other=float("-inf")))
    delta = tl.load(Delta + g * n_rows + row_q, mask=in_q, other=0.0)
    last_q = end_m - 1

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for seg in range(0, 2):  # runtime loop: one copy of the body
        lo, hi = _key_segment(seg, start_m, last_q, bucket_size, n_chunks, mode, BLOCK_N)
        for start_n in range(lo, hi, BLOCK_N):
            slot_k = start_n + tl.arange(0, BLOCK_N)
            in_k = (slot_k < hi) & (slot_k < n_order)
            # a hole of the aligned layout (order -1) reads row 0 and is masked by its bucket (-1)
            row_k = tl.maximum(_slot_rows(order_g, slot_k, in_k), 0)
            x_k = _load_rows(qk_g, row_k, in_k, offs_d, head_dim, head_dim)
            v = _load_rows(v_g, row_k, in_k, offs_d, head_dim, head_dim)
            pos_k = tl.load(pos_g + row_k, mask=in_k, other=-1)
            bkt_k = tl.load(bkt_g + slot_k, mask=in_k, other=-1)
            xs_k, c_k, _, _ = _scaled_keys(x_k)
            _, ds = _tile_grads(q, xs_k, c_k, slot_q, slot_k, pos_q, pos_k, bkt_q, bkt_k, do, v, lse_hi, lse_lo,
                                delta, bucket_size, n_chunks, hi, scale, causal, mode, DOT)
            # d logit / d q = scale * xs_k * c_k: 1 / ||x_k|| reaches 1 / KEY_EPS, so ds / ||x_k|| could
            # overflow float16; its power of two is in the exact xs_k, ds only gets c_k <= 1
            dq += dot_hi_lo(ds * (c_k * scale)[None, :], xs_k, DOT)
    _add_rows(DQK + g * stride_g, dq, row_q, in_q, offs_d, head_dim, head_dim)


@triton.jit(do_not_specialize=["causal", "mode"])
def _lsh_bwd_dkdv_kernel(
    QK, V, Pos, Order, Bkt, DO, Lse, Delta, DQK, DV,
    stride_g, n_rows, n_order, n_slots, bucket_size, head_dim, scale, causal, mode,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (key block, group): the key-use gradient and dv of its rows, summed over
    the queries that see them; the key-use gradient is chained through the normalisation and
    added to DQK, dv to DV."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_n, end_n = _tile(tl.program_id(0), n_slots, bucket_size, mode, BLOCK_N)
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    qk_g, do_g, pos_g = QK + g * stride_g, DO + g * stride_g, Pos + g * n_rows
    order_g, bkt_g = Order + g * n_order, Bkt + g * n_order
    n_chunks = n_slots // bucket_size
    offs_d = tl.arange(0, BLOCK_D)
    slot_k = start_n + tl.arange(0, BLOCK_N)
    in_k = (slot_k < end_n) & (slot_k < n_order)
    row_k = _slot_rows(order_g, slot_k, in_k)
    in_k = in_k & (row_k >= 0)  # a hole of the aligned layout (order -1) is no row
    x_k = _load_rows(qk_g, row_k, in_k, offs_d, head_dim, head_dim)
    v = _load_rows(V + g * stride_g, row_k, in_k, offs_d, head_dim, head_dim)
    pos_k = tl.load(pos_g + row_k, mask=in_k, other=-1)
    bkt_k = tl.load(bkt_g + slot_k, mask=in_k, other=-1)
    xs_k, c_k, inv_k, clamped = _scaled_keys(x_k)  # the raw tile is not needed any more
    last_k = end_n - 1

    dkey = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)  # w.r.t. the normalised keys, before * scale
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for seg in range(0, 2):  # runtime loop: one copy of the body
        lo, hi = _query_segment(seg, start_n, last_k, bucket_size, n_chunks, mode, BLOCK_M)
        for start_m in range(lo, hi, BLOCK_M):
            slot_q = start_m + tl.arange(0, BLOCK_M)
            in_q = (slot_q < hi) & (slot_q < n_order)
            # a hole of the aligned layout (order -1) reads row 0 and is masked by its bucket (-1)
            row_q = tl.maximum(_slot_rows(order_g, slot_q, in_q), 0)
            q = _load_rows(qk_g, row_q, in_q, offs_d, head_dim, head_dim)
            do = _load_rows(do_g, row_q, in_q, offs_d, head_dim, head_dim)
            pos_q = tl.load(pos_g + row_q, mask=in_q, other=-1)  # -1: row outside the segment
            bkt_q = tl.load(bkt_g + slot_q, mask=in_q, other=-1)
            lse_hi, lse_lo = lse_parts(tl.load(Lse + g * n_rows + row_q, mask=in_q, other=float("-inf")))
            delta = tl.load(Delta + g * n_rows + row_q, mask=in_q, other=0.0)
            p, ds = _tile_grads(q, xs_k, c_k, slot_q, slot_k, pos_q, pos_k, bkt_q, bkt_k, do, v, lse_hi, lse_lo,
                                delta, bucket_size, n_chunks, n_slots, scale, causal, mode, DOT)
            dv += dot_hi_lo(tl.trans(p), do, DOT)
            dkey += dot_hi_lo(tl.trans(ds), q, DOT)

    # chain through key = x / max(||x||, eps): dx = (dkey - key (key . dkey)) / ||x||, or dkey / eps
    dkey = dkey * scale
    key = xs_k.to(tl.float32) * c_k[:, None]  # x_k * inv_k
    radial = tl.where(clamped, 0.0, tl.sum(key * dkey, 1))
    dx = (dkey - key * radial[:, None]) * inv_k[:, None]
    _add_rows(DQK + g * stride_g, dx, row_k, in_k, offs_d, head_dim, head_dim)
    _add_rows(DV + g * stride_g, dv, row_k, in_k, offs_d, head_dim, head_dim)


# Block configs per (dtype, head block), independent of bucket_size: a block may span several
# chunks and pairs are masked by chunk. Chosen so that no configuration spills registers on
# sm_80 / sm_90 with the JIT's specialisation for aligned inputs (checked by
# ``python -m reformer.kernels.triton_aot`` and tests/test_triton_compile.py; docs/triton.md).
# The key-centric dk/dv kernel holds two float32 accumulators per key row, so it streams
# narrower query blocks with more warps; float32 needs smaller tiles (3xTF32 dots).
# The interpreter uses unequal blocks that straddle chunk boundaries in the tests.
def _cfg(m: int, n: int, warps: int = 4, stages: int = 2) -> KernelConfig:
    return KernelConfig({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _configs(half: dict[int, KernelConfig], f32: dict[int, KernelConfig]) -> dict:
    """{(dtype, head block): (config,)} from {head block: config} per precision."""
    table = {}
    for block_d in (16, 32, 64, 128):
        table[(torch.float16, block_d)] = table[(torch.bfloat16, block_d)] = (half[block_d],)
        table[(torch.float32, block_d)] = (f32[block_d],)
    return table


FWD_CONFIGS = _configs({16: _cfg(64, 64), 32: _cfg(64, 64), 64: _cfg(64, 32), 128: _cfg(32, 32)},
                       {16: _cfg(32, 32, 8), 32: _cfg(32, 16, 8), 64: _cfg(32, 32), 128: _cfg(16, 32)})
DQ_CONFIGS = _configs({16: _cfg(64, 64), 32: _cfg(64, 32), 64: _cfg(32, 64), 128: _cfg(32, 32, 8)},
                      {16: _cfg(32, 32), 32: _cfg(32, 32), 64: _cfg(32, 32), 128: _cfg(16, 32, 8)})
DKDV_CONFIGS = _configs({16: _cfg(32, 64, 8), 32: _cfg(32, 32, 8), 64: _cfg(32, 32, 8), 128: _cfg(32, 32, 8)},
                        {16: _cfg(32, 32), 32: _cfg(16, 32), 64: _cfg(16, 32), 128: _cfg(16, 16, 8, 1)})
_TUNE_KEY = ("n_slots", "bucket_size", "BLOCK_D")
_INTERPRETER_CONFIG = KernelConfig({"BLOCK_M": 64, "BLOCK_N": 32})
_FWD = Launcher(_lsh_fwd_kernel, FWD_CONFIGS, _TUNE_KEY, _INTERPRETER_CONFIG, restore=("Out", "Top", "Total"))
_BWD_DQ = Launcher(_lsh_bwd_dq_kernel, DQ_CONFIGS, _TUNE_KEY, _INTERPRETER_CONFIG, restore=("DQK",))
_BWD_DKDV = Launcher(_lsh_bwd_dkdv_kernel, DKDV_CONFIGS, _TUNE_KEY, _INTERPRETER_CONFIG, restore=("DQK", "DV"))


def _check_round(qk: Tensor, v: Tensor, pos: Tensor, bkt: Tensor, bucket_size: int, causal: bool,
                 causal_mode: str, order: Tensor | None = None) -> None:
    """Validate one round's inputs (see the module docstring for the limits)."""
    check_kernel_dtype("qk", qk.dtype)
    if isinstance(bucket_size, bool) or not isinstance(bucket_size, int):
        raise TypeError(f"bucket_size must be an int, got {bucket_size!r}")
    if bucket_size < 1:
        raise ValueError(f"bucket_size must be a positive int, got {bucket_size!r}")
    if causal_mode not in CAUSAL_MODES:
        raise ValueError(f"causal_mode must be 'chunk' or 'bucket', got {causal_mode!r}")
    if causal_mode == "bucket" and not causal:
        raise ValueError("causal_mode='bucket' needs causal=True")
    if qk.dim() != 3 or v.shape != qk.shape or v.dtype != qk.dtype:
        raise ValueError(f"qk and v must both be (G, N, D) of one dtype, got {tuple(qk.shape)} and {tuple(v.shape)}")
    if order is None and qk.shape[1] % bucket_size != 0:
        raise ValueError(f"Np = {qk.shape[1]} must be a multiple of bucket_size = {bucket_size}")
    if pos.shape != qk.shape[:2] or pos.dtype != torch.int32:
        raise ValueError(f"pos must be int32 of shape (G, N) = {tuple(qk.shape[:2])}, got {pos.dtype} {tuple(pos.shape)}")
    slots = qk.shape[:2]  # the sorted slots: one per row, or (bucket mode) the aligned layout's S >= N
    if order is not None and causal_mode == "bucket" and order.dim() == 2 and order.shape[0] == qk.shape[0] \
            and order.shape[1] >= qk.shape[1] and order.shape[1] % bucket_size == 0:
        slots = order.shape
    for name, x in (("bkt", bkt), ("order", order)):
        if x is not None and (x.shape != slots or x.dtype != torch.int32):
            raise ValueError(f"{name} must be int32 of shape (G, S) = {tuple(slots)} (S = N, or in bucket mode a "
                             f"multiple of bucket_size >= N), got {x.dtype} {tuple(x.shape)}")
    head_block("qk", qk.shape[2])
    if max(qk.shape[1], slots[1]) * qk.shape[2] >= INT32_LIMIT:
        raise ValueError(f"one group of qk must hold fewer than 2**31 elements, got N * D = {qk.shape[1] * qk.shape[2]}")


def _check_accumulator(name: str, x: Tensor, shape: tuple, dtype: torch.dtype = torch.float32) -> None:
    if x.shape != shape or x.dtype != dtype or not x.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {str(dtype).split('.')[-1]} tensor of shape {shape}, "
                         f"got {x.dtype} {tuple(x.shape)}")


def _launch(launcher: Launcher, block: str, qk: Tensor, n_order: int, bucket_size: int, causal: bool,
            causal_mode: str, scale: float, *tensors: Tensor) -> None:
    """Run one LSH kernel with one program per (tile of ``block`` slots, group); tensors are
    contiguous. ``n_order`` slots per group (more than the rows with the aligned layout's holes);
    bucket mode has ``cdiv(bucket_size, block)`` tiles per chunk (see :func:`_tile`)."""
    g, n_rows, d = qk.shape
    n_slots = -(-n_order // bucket_size) * bucket_size
    mode = CAUSAL_MODES[causal_mode]

    def grid(meta):
        tiles = (n_slots // bucket_size) * triton.cdiv(bucket_size, meta[block]) if mode == 1 else \
            triton.cdiv(n_slots, meta[block])
        return tiles, g

    launcher.run(
        qk.dtype, grid, *tensors, n_rows * d, n_rows, n_order, n_slots,
        bucket_size, d, float(scale), int(causal), mode,
        DOT=dot_dtype(qk.dtype, launcher.interpreted), BLOCK_D=head_block("qk", d),
    )


def forward_round(qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, out: Tensor, top: Tensor,
                  total: Tensor, *, bucket_size: int, causal: bool, causal_mode: str, scale: float) -> None:
    """One round, merged in place into running float32 sums (unsorted rows).

    qk, v: (G, N, D) unsorted rows; pos: (G, N) int32 original positions (-1 = padding);
    order: (G, N) int32, the row at sorted slot s; bkt: (G, N) int32 bucket of each sorted slot.
    With this round's (o_r, lse_r): ``top = max(top, lse_r)``, ``out = sum_r exp(lse_r - top) o_r``,
    ``total = sum_r exp(lse_r - top)`` (out (G, N, D) float32; top and total (G, N) float64, as
    the Function keeps them: a huge max logit keeps its digits).
    """
    _check_round(qk, v, pos, bkt, bucket_size, causal, causal_mode, order)
    _check_accumulator("out", out, tuple(qk.shape))
    _check_accumulator("top", top, tuple(qk.shape[:2]), torch.float64)
    _check_accumulator("total", total, tuple(qk.shape[:2]), torch.float64)
    qk, v, pos, order, bkt = (x.contiguous() for x in (qk, v, pos, order, bkt))
    _launch(_FWD, "BLOCK_M", qk, order.shape[1], bucket_size, causal, causal_mode, scale, qk, v, pos, order, bkt, out,
            top, total)


def backward_round(qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, do: Tensor, lse: Tensor,
                   delta: Tensor, dqk: Tensor, dv: Tensor, *, bucket_size: int, causal: bool, causal_mode: str,
                   scale: float) -> None:
    """Gradients of one round added in place into float32 dqk, dv (G, N, D) at unsorted rows.

    do: (G, N, D) (cast to qk's dtype); lse: (G, N) the COMBINED (all rounds) log-sum-exp
    (float32 or float64; passed as float64 and split in the kernels into float32 ``hi + lo``, so
    ``p = exp((s - hi) - lo)`` keeps every digit of a huge lse); delta: (G, N) rowsum(dO * O) minus
    the lse's incoming gradient; both unsorted. ``p = exp(s - lse)``.
    """
    _check_round(qk, v, pos, bkt, bucket_size, causal, causal_mode, order)
    for name, x in (("dqk", dqk), ("dv", dv)):
        _check_accumulator(name, x, tuple(qk.shape))
    qk, v, pos, order, bkt = (x.contiguous() for x in (qk, v, pos, order, bkt))
    do = do.to(qk.dtype).contiguous()
    lse, delta = lse.double().contiguous(), delta.float().contiguous()
    args = (qk, v, pos, order, bkt, do, lse, delta, dqk)
    _launch(_BWD_DQ, "BLOCK_M", qk, order.shape[1], bucket_size, causal, causal_mode, scale, *args)
    _launch(_BWD_DKDV, "BLOCK_N", qk, order.shape[1], bucket_size, causal, causal_mode, scale, *args, dv)


def _identity_order(qk: Tensor) -> Tensor:
    g, n, _ = qk.shape
    return torch.arange(n, device=qk.device, dtype=torch.int32).expand(g, n).contiguous()


def fwd(qk: Tensor, v: Tensor, pos: Tensor, bkt: Tensor, *, bucket_size: int, causal: bool, causal_mode: str,
        scale: float) -> tuple[Tensor, Tensor]:
    """One round's attention on sorted rows.

    qk, v: (G, Np, D) sorted rows padded to Np (a multiple of bucket_size); pos: (G, Np) int32
    original positions, -1 = padding; bkt: (G, Np) int32 bucket of each slot.
    Returns out (G, Np, D) in the input dtype and lse (G, Np) float64, as the torch sorted core
    (every digit of a huge lse kept; -inf where a row has no permitted key; its out is 0).
    """
    _check_round(qk, v, pos, bkt, bucket_size, causal, causal_mode)
    out = torch.zeros(qk.shape, device=qk.device, dtype=torch.float32)
    top = torch.full(qk.shape[:2], float("-inf"), device=qk.device, dtype=torch.float64)
    total = torch.zeros_like(top)
    forward_round(qk, v, pos, _identity_order(qk), bkt, out, top, total, bucket_size=bucket_size, causal=causal,
                  causal_mode=causal_mode, scale=scale)
    # one round merged into empty sums: total is 1 (or 0 without keys) and top its lse, exactly
    out = out.div_(total.masked_fill(total == 0, 1.0).unsqueeze(-1)).to(qk.dtype)
    return out, top.add_(total.log())


def bwd(qk: Tensor, v: Tensor, pos: Tensor, bkt: Tensor, do: Tensor, lse: Tensor, delta: Tensor, *,
        bucket_size: int, causal: bool, causal_mode: str, scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of one round given the COMBINED (all rounds) lse and delta = rowsum(dO * O).

    qk, v, do: (G, Np, D); pos, bkt: (G, Np) int32; lse (float32 or float64, used to full
    precision), delta (float32): (G, Np) in this round's order. p = exp(s - lse) (0 where lse = -inf). Returns dqk (through both the query and the
    normalised-key use of qk) and dv, both (G, Np, D) float32.
    """
    _check_round(qk, v, pos, bkt, bucket_size, causal, causal_mode)
    dqk = torch.zeros(qk.shape, device=qk.device, dtype=torch.float32)
    dv = torch.zeros_like(dqk)
    backward_round(qk, v, pos, _identity_order(qk), bkt, do, lse, delta, dqk, dv, bucket_size=bucket_size,
                   causal=causal, causal_mode=causal_mode, scale=scale)
    return dqk, dv


def model_bytes(groups: int, n: int, head_dim: int, *, bucket_size: int, element_size: int, n_hashes: int = 1,
                causal_mode: str = "chunk", backward: bool = True, block: int = 64) -> int:
    """Modelled DRAM-level bytes moved by ``n_hashes`` rounds of the round-level kernels.

    ``groups`` = batch * heads, ``n`` rows per group, ``element_size`` of qk/v/dO (2 for
    float16/bfloat16, 4 for float32), ``block`` the query/key block (64 for float16/bfloat16,
    32 for float32 with the default configs). Counts every tile a program loads or stores
    (re-reads of key blocks by neighbouring query blocks included, as if L2 missed), so it is
    an upper bound on DRAM traffic; ``backward=False`` for the forward only. Formula in the
    module docstring.
    """
    n_slots = -(-n // bucket_size) * bucket_size
    blocks = -(-n_slots // block)
    keys = (2 * bucket_size + block) if causal_mode == "chunk" else (bucket_size + block)
    keys = min(keys, n_slots) if causal_mode == "chunk" else keys  # chunk mode never streams more than Np
    gn, row = groups * n, head_dim * element_size
    fwd = gn * row + groups * blocks * keys * (2 * row + 8) + 12 * gn + 2 * gn * (head_dim * 4 + 16)
    total = fwd
    if backward:
        dq = 2 * gn * row + 24 * gn + groups * blocks * keys * (2 * row + 8) + 2 * gn * head_dim * 4
        dkdv = 2 * gn * row + 12 * gn + groups * blocks * keys * (2 * row + 24) + 4 * gn * head_dim * 4
        total += dq + dkdv
    return n_hashes * total


def aot_specs() -> list[AotSpec]:
    """Every configuration the launchers can run (``causal``, ``mode`` and ``bucket_size`` are
    runtime arguments)."""
    types = {"QK": "*{dt}", "V": "*{dt}", "DO": "*{dt}", "Pos": "*i32", "Order": "*i32", "Bkt": "*i32",
             "Out": "*fp32", "Top": "*fp64", "Total": "*fp64", "Lse": "*fp64", "Delta": "*fp32", "DQK": "*fp32",
             "DV": "*fp32", "scale": "fp32"}
    return [spec for launcher in (_FWD, _BWD_DQ, _BWD_DKDV) for spec in launcher.aot_specs(types)]
