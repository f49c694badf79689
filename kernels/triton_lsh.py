"""Triton core of shared-QK LSH attention: one sorted hash round, forward and backward.

Implements the per-round core contract of ``reformer.kernels.lsh_common`` (same signatures as
the pure-PyTorch ``ref_lsh``; hashing, sorting and the round combination stay in torch there).

Limits:
- dtypes: float32, float16, bfloat16. Logits, softmax and accumulators are float32; float32
  uses 3xTF32 dots, float16/bfloat16 tensor-core dots with float32 intermediates split into a
  head and a tail (about float32 accuracy).
- head dims 16..128 (any value, padded to a power of two with masks).
- bucket_size: 16, 32, 64 or 128 (a kernel constexpr: one chunk is one block).
- any number of chunks C = Np / bucket_size >= 1; C == 1 attends to its chunk once.
- CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).

Design: forward, one program per (group, chunk) holds the chunk's queries and streams the keys
of the chunk and of the one before it (wrap-around) through an online softmax; keys are
normalised in the kernel and the normalisation is applied to the logits as a per-key float32
scale, so no rounded normalised key enters a matmul. Backward, one program per (group, chunk)
computes dqk and dv of its rows without atomics: dq from its queries against its chunk and
the previous one, and d(key) and dv from its keys against its own queries and the next chunk's
(which look back at it); d(key) is chained through the normalisation in the kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .lsh_common import KEY_EPS, SELF_LOGIT
from .triton_configs import (
    SIGNATURE_DTYPES,
    AotSpec,
    KernelConfig,
    Launcher,
    check_kernel_dtype,
    dot_dtype,
    head_block,
    head_blocks,
    storage_dtype,
)
from .triton_tiles import dot, dot_hi_lo, finish_softmax, load_tile, lse_for_probs, online_softmax_step, store_tile

BUCKET_SIZES = (16, 32, 64, 128)
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
def _logits(q, x_k, inv_k, pos_q, pos_k, scale, causal, DOT: tl.constexpr):
    """Masked logits (queries x keys) of raw queries ``q`` against keys ``x_k * inv_k``.

    Own position -> SELF_LOGIT; padding key or query (pos -1), or a future key when causal -> -inf.
    """
    s = dot(q, tl.trans(x_k), DOT) * (inv_k * scale)[None, :]
    s = tl.where(pos_q[:, None] == pos_k[None, :], _SELF_LOGIT, s)
    ok = (pos_q[:, None] >= 0) & (pos_k[None, :] >= 0)
    ok = ok & ((pos_k[None, :] <= pos_q[:, None]) | (causal == 0))
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _lsh_fwd_kernel(
    QK, V, Pos, Out, Lse,
    stride_g, stride_n, n_chunks, head_dim, scale, causal,
    DOT: tl.constexpr, BUCKET: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (chunk, group): the chunk's queries against its keys and the previous chunk's."""
    tl.static_assert(BUCKET >= 16 and BLOCK_D >= 16)
    c = tl.program_id(0)
    g = tl.program_id(1)
    n_rows = n_chunks * BUCKET
    offs_d = tl.arange(0, BLOCK_D)
    rows_q = c * BUCKET + tl.arange(0, BUCKET)
    q = load_tile(QK + g * stride_g, rows_q, n_rows, offs_d, head_dim, stride_n)
    pos_q = tl.load(Pos + g * n_rows + rows_q)

    m_i = tl.full([BUCKET], float("-inf"), tl.float32)
    l_i = tl.zeros([BUCKET], tl.float32)
    acc = tl.zeros([BUCKET, BLOCK_D], tl.float32)
    for step in range(0, tl.minimum(n_chunks, 2)):  # own chunk, then the look-back (none if C == 1)
        rows_k = ((c - step + n_chunks) % n_chunks) * BUCKET + tl.arange(0, BUCKET)
        x_k = load_tile(QK + g * stride_g, rows_k, n_rows, offs_d, head_dim, stride_n)
        v = load_tile(V + g * stride_g, rows_k, n_rows, offs_d, head_dim, stride_n)
        pos_k = tl.load(Pos + g * n_rows + rows_k)
        s = _logits(q, x_k, _inv_norm(x_k), pos_q, pos_k, scale, causal, DOT)
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT)
    out, lse = finish_softmax(m_i, l_i, acc)
    store_tile(Out + g * stride_g, out, rows_q, n_rows, offs_d, head_dim, stride_n)
    tl.store(Lse + g * n_rows + rows_q, lse)


@triton.jit
def _tile_grads(q, x_k, inv_k, pos_q, pos_k, do, v_k, lse, delta, scale, causal, DOT: tl.constexpr):
    """Probabilities p and logit gradients ds (0 at the constant self logit) of one chunk pair."""
    s = _logits(q, x_k, inv_k, pos_q, pos_k, scale, causal, DOT)
    p = tl.exp(s - lse_for_probs(lse)[:, None])
    ds = p * (dot(do, tl.trans(v_k), DOT) - delta[:, None])
    return p, tl.where(pos_q[:, None] == pos_k[None, :], 0.0, ds)


@triton.jit
def _lsh_bwd_kernel(
    QK, V, Pos, DO, Lse, Delta, DQK, DV,
    stride_g, stride_n, n_chunks, head_dim, scale, causal,
    DOT: tl.constexpr, BUCKET: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (chunk, group) writes dqk and dv of the chunk's rows.

    Pairs (query chunk, key chunk): (c, c) feeds both uses of the rows; (c, c-1) their query use;
    (c+1, c) their key use and dv. Chunk indices wrap around; with C == 1 only (c, c) exists.
    """
    tl.static_assert(BUCKET >= 16 and BLOCK_D >= 16)
    c = tl.program_id(0)
    g = tl.program_id(1)
    n_rows = n_chunks * BUCKET
    offs_d = tl.arange(0, BLOCK_D)
    base, rows_g = g * stride_g, g * n_rows
    rows = c * BUCKET + tl.arange(0, BUCKET)
    x = load_tile(QK + base, rows, n_rows, offs_d, head_dim, stride_n)
    v = load_tile(V + base, rows, n_rows, offs_d, head_dim, stride_n)
    do = load_tile(DO + base, rows, n_rows, offs_d, head_dim, stride_n)
    pos = tl.load(Pos + rows_g + rows)
    lse = tl.load(Lse + rows_g + rows)
    delta = tl.load(Delta + rows_g + rows)
    inv = _inv_norm(x)

    # (c, c): dq over keys of c, dkey and dv over queries of c
    p, ds = _tile_grads(x, x, inv, pos, pos, do, v, lse, delta, scale, causal, DOT)
    dq = dot_hi_lo(ds * (inv * scale)[None, :], x, DOT)
    dkey = dot_hi_lo(tl.trans(ds), x, DOT)  # w.r.t. the normalised keys, before * scale
    dv = dot_hi_lo(tl.trans(p), do, DOT)
    if n_chunks > 1:
        # (c, c-1): this chunk's queries look back at the previous chunk's keys
        rows_p = ((c - 1 + n_chunks) % n_chunks) * BUCKET + tl.arange(0, BUCKET)
        x_p = load_tile(QK + base, rows_p, n_rows, offs_d, head_dim, stride_n)
        v_p = load_tile(V + base, rows_p, n_rows, offs_d, head_dim, stride_n)
        inv_p = _inv_norm(x_p)
        p, ds = _tile_grads(x, x_p, inv_p, pos, tl.load(Pos + rows_g + rows_p), do, v_p, lse, delta, scale,
                            causal, DOT)
        dq += dot_hi_lo(ds * (inv_p * scale)[None, :], x_p, DOT)
        # (c+1, c): the next chunk's queries look back at this chunk's keys
        rows_n = ((c + 1) % n_chunks) * BUCKET + tl.arange(0, BUCKET)
        x_n = load_tile(QK + base, rows_n, n_rows, offs_d, head_dim, stride_n)
        do_n = load_tile(DO + base, rows_n, n_rows, offs_d, head_dim, stride_n)
        p, ds = _tile_grads(x_n, x, inv, tl.load(Pos + rows_g + rows_n), pos, do_n, v,
                            tl.load(Lse + rows_g + rows_n), tl.load(Delta + rows_g + rows_n), scale, causal, DOT)
        dkey += dot_hi_lo(tl.trans(ds), x_n, DOT)
        dv += dot_hi_lo(tl.trans(p), do_n, DOT)

    # chain the key gradient through key = x / max(||x||, eps): (dkey - key (key . dkey)) / ||x||
    dkey = dkey * scale
    key = x.to(tl.float32) * inv[:, None]
    radial = tl.where(_norm(x) > _KEY_EPS, tl.sum(key * dkey, 1), 0.0)  # 0 where the norm was clamped
    dqk = dq + (dkey - key * radial[:, None]) * inv[:, None]
    store_tile(DQK + base, dqk, rows, n_rows, offs_d, head_dim, stride_n)
    store_tile(DV + base, dv, rows, n_rows, offs_d, head_dim, stride_n)


# One block is one chunk, so only warps are tuned (on GPU), per bucket size.
CONFIGS = {
    16: (KernelConfig({}, num_warps=4, num_stages=1),),
    32: (KernelConfig({}, num_warps=4, num_stages=1),),
    64: (KernelConfig({}, num_warps=4, num_stages=1), KernelConfig({}, num_warps=8, num_stages=1)),
    128: (KernelConfig({}, num_warps=4, num_stages=1), KernelConfig({}, num_warps=8, num_stages=1)),
}
_TUNE_KEY = ("n_chunks", "BLOCK_D")
_FWD = Launcher(_lsh_fwd_kernel, CONFIGS, _TUNE_KEY, KernelConfig({}))
_BWD = Launcher(_lsh_bwd_kernel, CONFIGS, _TUNE_KEY, KernelConfig({}))


def _check(qk: Tensor, v: Tensor, pos: Tensor, bucket_size: int) -> int:
    """Validate one round's inputs; returns the power-of-two head block."""
    check_kernel_dtype("qk", qk.dtype)
    if bucket_size not in BUCKET_SIZES:
        raise ValueError(f"bucket_size must be one of {BUCKET_SIZES} for the Triton backend, got {bucket_size}")
    if qk.dim() != 3 or v.shape != qk.shape or v.dtype != qk.dtype:
        raise ValueError(f"qk and v must both be (G, Np, D) of one dtype, got {tuple(qk.shape)} and {tuple(v.shape)}")
    if qk.shape[1] % bucket_size != 0:
        raise ValueError(f"Np = {qk.shape[1]} must be a multiple of bucket_size = {bucket_size}")
    if pos.shape != qk.shape[:2] or pos.dtype != torch.int32:
        raise ValueError(f"pos must be int32 of shape (G, Np) = {tuple(qk.shape[:2])}, got {pos.dtype} {tuple(pos.shape)}")
    return head_block("qk", qk.shape[2])


def _launch(launcher: Launcher, qk: Tensor, bucket_size: int, *tensors: Tensor, causal: bool, scale: float) -> None:
    """Run one LSH kernel over the (chunk, group) grid; all tensors are contiguous (G, Np, ...)."""
    g, n_pad, d = qk.shape
    n_chunks = n_pad // bucket_size
    launcher.run(
        bucket_size, lambda meta: (n_chunks, g), *tensors, qk.stride(0), qk.stride(1), n_chunks, d, scale,
        int(causal), DOT=dot_dtype(qk.dtype, launcher.interpreted), BUCKET=bucket_size,
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
    _launch(_FWD, qk, bucket_size, qk, v, pos, out, lse, causal=causal, scale=scale)
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
    _launch(_BWD, qk, bucket_size, qk, v, pos, do, lse, delta, dqk, dv, causal=causal, scale=scale)
    return dqk, dv


def aot_specs() -> list[AotSpec]:
    """Every configuration the launchers can run: kernel x dtype x head block x bucket size x warps.

    ``causal`` is a runtime argument, so each compiled kernel serves both settings.
    """
    specs = []
    for dtype, name in SIGNATURE_DTYPES.items():
        for launcher, data_ptrs in ((_FWD, "QK V Out"), (_BWD, "QK V DO")):
            types = {p: f"*{name}" for p in data_ptrs.split()}
            types.update(Pos="*i32", Lse="*fp32", Delta="*fp32", DQK="*fp32", DV="*fp32", scale="fp32")
            for block_d in head_blocks():
                for bucket, configs in launcher.configs.items():
                    for cfg in configs:
                        consts = {"DOT": dot_dtype(dtype, False), "BUCKET": bucket, "BLOCK_D": block_d}
                        label = f"{launcher.kernel.__name__}-{name}-D{block_d}-bucket{bucket}-{cfg.label()}"
                        specs.append(AotSpec(launcher.kernel, types, consts, cfg, label))
    return specs
