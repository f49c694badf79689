"""Flash-attention-style Triton kernels for full softmax attention (forward and backward).

Limits:
- dtypes: float32, float16, bfloat16 (q, k, v share one). Scores, softmax and accumulators are
  float32; float32 uses 3xTF32 dots, float16/bfloat16 tensor-core dots with float32
  intermediates split into a head and a tail (about float32 accuracy; see triton_tiles).
- head dims: D (q, k) and Dv (v) each in 16..128, any value (padded to a power of two with masks).
- lengths: any Nq, Nk >= 1; blocks are masked at the edges. Nq may differ from Nk.
- masks: ``causal`` (top-left aligned: query i sees keys j <= i, as in the torch reference) and
  ``key_padding_mask``. No ``attn_mask``, no dropout. Rows with no permitted key give zeros and
  zero gradients.
- devices: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run it).
- backward: one key-centric kernel for dk/dv and one query-centric kernel for dq (no atomics);
  both recompute the probabilities from the forward's log-sum-exp, kept in float64 and split
  into float32 ``hi + lo`` (``p = exp((s - hi) - lo)``), so huge logits (1e7 and beyond, where a
  float32 lse has no fractional digits left) give the reference's gradients.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from einops import rearrange
from torch import Tensor

from .triton_configs import AotSpec, KernelConfig, Launcher, check_kernel_dtype, dot_dtype, head_block, storage_dtype
from .triton_lsh import lse64, lse_parts
from .triton_tiles import INT32_LIMIT, program_id64, dot, dot_hi_lo, finish_softmax, load_tile, online_softmax_step, store_tile


@triton.jit
def _permitted(offs_m, offs_n, n_k, kpm_row, causal):
    """(BLOCK_M, BLOCK_N) bool: key in range, not padding, and not in the future when causal."""
    padding = tl.load(kpm_row + offs_n, mask=offs_n < n_k, other=1)
    ok = (padding == 0)[None, :]
    return ok & ((offs_n[None, :] <= offs_m[:, None]) | (causal == 0))


@triton.jit(do_not_specialize=["n_heads", "causal"])
def _fwd_kernel(
    Q, K, V, KPM, Out, Lse,
    stride_qg, stride_qn, stride_kg, stride_kn, stride_vg, stride_vn, stride_og, stride_on,
    n_heads, n_q, n_k, head_dim, head_dim_v, scale, causal,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per query block: online softmax over the permitted key blocks."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_m = tl.program_id(0) * BLOCK_M
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kpm_row = KPM + (g // n_heads) * n_k
    q = load_tile(Q + g * stride_qg, offs_m, n_q, offs_d, head_dim, stride_qn)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = n_k
    if causal:  # keys after the block's last query are never permitted
        hi = tl.minimum(n_k, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K + g * stride_kg, offs_n, n_k, offs_d, head_dim, stride_kn)
        v = load_tile(V + g * stride_vg, offs_n, n_k, offs_d, head_dim_v, stride_vn)
        s = dot(q, tl.trans(k), DOT) * scale
        s = tl.where(_permitted(offs_m, offs_n, n_k, kpm_row, causal), s, float("-inf"))
        m_i, l_i, acc = online_softmax_step(m_i, l_i, acc, s, v, DOT)
    out, _ = finish_softmax(m_i, l_i, acc)
    store_tile(Out + g * stride_og, out, offs_m, n_q, offs_d, head_dim_v, stride_on)
    tl.store(Lse + g * n_q + offs_m, lse64(m_i, l_i), mask=offs_m < n_q)  # float64: huge logits keep their digits


@triton.jit(do_not_specialize=["n_heads", "causal"])
def _bwd_dkdv_kernel(
    Q, K, V, KPM, DO, Lse, Delta, DK, DV,
    stride_qg, stride_qn, stride_kg, stride_kn, stride_vg, stride_vn, stride_og, stride_on,
    n_heads, n_q, n_k, head_dim, head_dim_v, scale, causal,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per key block: dk, dv summed over every query block that sees it."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_n = tl.program_id(0) * BLOCK_N
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kpm_row = KPM + (g // n_heads) * n_k
    k = load_tile(K + g * stride_kg, offs_n, n_k, offs_d, head_dim, stride_kn)
    v = load_tile(V + g * stride_vg, offs_n, n_k, offs_d, head_dim_v, stride_vn)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if causal:  # queries before the block's first key never see it
        lo = (start_n // BLOCK_M) * BLOCK_M
    for start_m in range(lo, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = load_tile(Q + g * stride_qg, offs_m, n_q, offs_d, head_dim, stride_qn)
        do = load_tile(DO + g * stride_og, offs_m, n_q, offs_d, head_dim_v, stride_on)
        lse_hi, lse_lo = lse_parts(tl.load(Lse + g * n_q + offs_m, mask=offs_m < n_q, other=float("-inf")))
        delta = tl.load(Delta + g * n_q + offs_m, mask=offs_m < n_q, other=0.0)
        s = dot(q, tl.trans(k), DOT) * scale
        s = tl.where(_permitted(offs_m, offs_n, n_k, kpm_row, causal), s, float("-inf"))
        p = tl.exp((s - lse_hi[:, None]) - lse_lo[:, None])  # (BLOCK_M, BLOCK_N)
        dv += dot_hi_lo(tl.trans(p), do, DOT)
        ds = p * (dot(do, tl.trans(v), DOT) - delta[:, None])
        dk += dot_hi_lo(tl.trans(ds), q, DOT)
    store_tile(DK + g * stride_kg, dk * scale, offs_n, n_k, offs_d, head_dim, stride_kn)
    store_tile(DV + g * stride_vg, dv, offs_n, n_k, offs_d, head_dim_v, stride_vn)


@triton.jit(do_not_specialize=["n_heads", "causal"])
def _bwd_dq_kernel(
    Q, K, V, KPM, DO, Lse, Delta, DQ,
    stride_qg, stride_qn, stride_kg, stride_kn, stride_vg, stride_vn, stride_og, stride_on,
    n_heads, n_q, n_k, head_dim, head_dim_v, scale, causal,
    DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per query block: dq summed over every key block it sees."""
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_D >= 16)
    start_m = tl.program_id(0) * BLOCK_M
    g = program_id64(1)  # int64: g * stride_g can exceed 2**31
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    kpm_row = KPM + (g // n_heads) * n_k
    q = load_tile(Q + g * stride_qg, offs_m, n_q, offs_d, head_dim, stride_qn)
    do = load_tile(DO + g * stride_og, offs_m, n_q, offs_d, head_dim_v, stride_on)
    lse_hi, lse_lo = lse_parts(tl.load(Lse + g * n_q + offs_m, mask=offs_m < n_q, other=float("-inf")))
    delta = tl.load(Delta + g * n_q + offs_m, mask=offs_m < n_q, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = n_k
    if causal:
        hi = tl.minimum(n_k, start_m + BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K + g * stride_kg, offs_n, n_k, offs_d, head_dim, stride_kn)
        v = load_tile(V + g * stride_vg, offs_n, n_k, offs_d, head_dim_v, stride_vn)
        s = dot(q, tl.trans(k), DOT) * scale
        s = tl.where(_permitted(offs_m, offs_n, n_k, kpm_row, causal), s, float("-inf"))
        p = tl.exp((s - lse_hi[:, None]) - lse_lo[:, None])
        ds = p * (dot(do, tl.trans(v), DOT) - delta[:, None])
        dq += dot_hi_lo(ds, k, DOT)
    store_tile(DQ + g * stride_qg, dq * scale, offs_m, n_q, offs_d, head_dim, stride_qn)


# Block configs per (dtype, head block): the forward is autotuned on GPU over two configs; each
# backward kernel has one (dk/dv: few queries per step against a wide key block; dq: the
# transpose). Chosen so that no configuration spills registers on sm_80 / sm_90 with the JIT's
# specialisation for aligned inputs (``python -m reformer.kernels.triton_aot``; docs/triton.md):
# float32 (3xTF32 dots) and head dim 128 need smaller tiles or more warps. The interpreter runs
# one fixed config per kernel with unequal blocks (partial blocks, causal block bounds); the
# tests also run every GPU config under the interpreter.
def _cfg(m: int, n: int, warps: int = 4, stages: int = 2) -> KernelConfig:
    return KernelConfig({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _configs(half: dict, f32: dict) -> dict:
    """{(dtype, head block): configs} from {head block: configs} per precision."""
    table = {}
    for block_d in (16, 32, 64, 128):
        table[(torch.float16, block_d)] = table[(torch.bfloat16, block_d)] = tuple(half[block_d])
        table[(torch.float32, block_d)] = tuple(f32[block_d])
    return table


_HALF_FWD = (_cfg(64, 64), _cfg(128, 64, 8))
FWD_CONFIGS = _configs({16: _HALF_FWD, 32: _HALF_FWD, 64: _HALF_FWD, 128: (_cfg(64, 64, 8),)},
                       {d: (_cfg(32, 32),) for d in (16, 32, 64, 128)})
DKDV_CONFIGS = _configs({16: (_cfg(32, 64),), 32: (_cfg(32, 64),), 64: (_cfg(32, 32),), 128: (_cfg(32, 32, 8),)},
                        {16: (_cfg(32, 32),), 32: (_cfg(16, 32),), 64: (_cfg(16, 32),), 128: (_cfg(16, 16, 8),)})
DQ_CONFIGS = _configs({d: (_cfg(64, 32),) for d in (16, 32, 64, 128)},
                      {16: (_cfg(32, 32),), 32: (_cfg(32, 16),), 64: (_cfg(32, 32),), 128: (_cfg(16, 32),)})
_TUNE_KEY = ("n_q", "n_k", "causal", "BLOCK_D")
_FWD = Launcher(_fwd_kernel, FWD_CONFIGS, _TUNE_KEY, KernelConfig({"BLOCK_M": 64, "BLOCK_N": 32}))
_BWD_DKDV = Launcher(_bwd_dkdv_kernel, DKDV_CONFIGS, _TUNE_KEY, KernelConfig({"BLOCK_M": 32, "BLOCK_N": 64}))
_BWD_DQ = Launcher(_bwd_dq_kernel, DQ_CONFIGS, _TUNE_KEY, KernelConfig({"BLOCK_M": 64, "BLOCK_N": 32}))


def _common_args(q: Tensor, k: Tensor, v: Tensor, o: Tensor, n_heads: int, causal: bool) -> tuple:
    """Strides, sizes and flags shared by the three kernels; tensors are (G, N, D) contiguous."""
    return (
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        n_heads, q.shape[1], k.shape[1], q.shape[2], v.shape[2], 1.0 / math.sqrt(q.shape[2]), int(causal),
    )


def _constexprs(q: Tensor, v: Tensor, interpreted: bool) -> dict:
    block_d = max(head_block("q", q.shape[2]), head_block("v", v.shape[2]))
    return {"DOT": dot_dtype(q.dtype, interpreted), "BLOCK_D": block_d}


def _forward(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor, n_heads: int, causal: bool) -> tuple[Tensor, Tensor]:
    """q: (G, Nq, D), k: (G, Nk, D), v: (G, Nk, Dv), kpm: (B, Nk) int8 -> out (G, Nq, Dv), lse (G, Nq) float64."""
    g, n_q, _ = q.shape
    out = q.new_empty(g, n_q, v.shape[2], dtype=storage_dtype(q.dtype, _FWD.interpreted))
    lse = torch.empty(g, n_q, device=q.device, dtype=torch.float64)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), g)  # noqa: E731
    _FWD.run(q.dtype, grid, q, k, v, kpm, out, lse, *_common_args(q, k, v, out, n_heads, causal),
             **_constexprs(q, v, _FWD.interpreted))
    return out.to(q.dtype), lse


def _backward(q: Tensor, k: Tensor, v: Tensor, kpm: Tensor, out: Tensor, lse: Tensor, do: Tensor,
              n_heads: int, causal: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the loss w.r.t. q, k, v given dO: (G, Nq, Dv) and the forward's out and lse."""
    g, n_q, _ = q.shape
    do, lse = do.contiguous(), lse.double().contiguous()  # the kernels split the float64 lse (lse_parts)
    delta = (out.float() * do.float()).sum(-1)  # (G, Nq): rowsum(dO * O)
    grad_dtype = storage_dtype(q.dtype, _BWD_DQ.interpreted)
    dq, dk, dv = (torch.empty_like(x, dtype=grad_dtype) for x in (q, k, v))
    args = _common_args(q, k, v, do, n_heads, causal)
    consts = _constexprs(q, v, _BWD_DQ.interpreted)
    grid_k = lambda meta: (triton.cdiv(k.shape[1], meta["BLOCK_N"]), g)  # noqa: E731
    _BWD_DKDV.run(q.dtype, grid_k, q, k, v, kpm, do, lse, delta, dk, dv, *args, **consts)
    grid_q = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), g)  # noqa: E731
    _BWD_DQ.run(q.dtype, grid_q, q, k, v, kpm, do, lse, delta, dq, *args, **consts)
    return dq.to(q.dtype), dk.to(q.dtype), dv.to(q.dtype)


class _FullAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kpm: Tensor, n_heads: int, causal: bool) -> Tensor:
        out, lse = _forward(q, k, v, kpm, n_heads, causal)
        ctx.save_for_backward(q, k, v, kpm, out, lse)
        ctx.n_heads, ctx.causal = n_heads, causal
        return out

    @staticmethod
    def backward(ctx, do: Tensor):
        q, k, v, kpm, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(q, k, v, kpm, out, lse, do, ctx.n_heads, ctx.causal)
        return dq, dk, dv, None, None, None


def full_attention_triton(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None
) -> Tensor:
    """softmax(q k^T / sqrt(D)) v with the Triton kernels (differentiable in q, k, v).

    q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv) -> (B, H, Nq, Dv), same dtype.
    causal: query i attends only to keys j <= i. key_padding_mask: (B, Nk) bool, True = padding.
    Shapes are assumed validated by ``reformer.kernels.full_attention``; dtype and head dims are
    checked here (see the module docstring for the limits).
    """
    check_kernel_dtype("q", q.dtype)
    head_block("q", q.shape[-1])
    head_block("v", v.shape[-1])
    b, h, n_k = k.shape[0], k.shape[1], k.shape[2]
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[2] * x.shape[3] >= INT32_LIMIT:
            raise ValueError(f"one (batch, head) slab of {name} must hold fewer than 2**31 elements, got {x.shape[2] * x.shape[3]}")
    if key_padding_mask is None:
        kpm = torch.zeros(b, n_k, device=q.device, dtype=torch.int8)
    else:
        kpm = key_padding_mask.to(device=q.device, dtype=torch.int8).contiguous()
    flat = [rearrange(x, "b h n d -> (b h) n d").contiguous() for x in (q, k, v)]
    out = _FullAttention.apply(*flat, kpm, h, bool(causal))
    return rearrange(out, "(b h) n d -> b h n d", b=b)


def aot_specs() -> list[AotSpec]:
    """Every configuration the launchers can run (``causal`` is a runtime argument)."""
    types = {"Q": "*{dt}", "K": "*{dt}", "V": "*{dt}", "DO": "*{dt}", "Out": "*{dt}", "DQ": "*{dt}", "DK": "*{dt}",
             "DV": "*{dt}", "KPM": "*i8", "Lse": "*fp64", "Delta": "*fp32", "scale": "fp32"}
    return [spec for launcher in (_FWD, _BWD_DKDV, _BWD_DQ) for spec in launcher.aot_specs(types)]
