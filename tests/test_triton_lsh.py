"""Triton LSH attention (kernels/triton_lsh.py) under TRITON_INTERPRET=1.

1. The sorted per-round core (fwd/bwd) against a dense float64 evaluation of one round written
   here (an (Np x Np) logit matrix with the chunk / bucket mask; autograd for dqk), in both
   causal modes, with padding, in float32, float16 and bfloat16.
2. The round-level protocol (forward_round/backward_round: unsorted rows read through
   ``order``, merged into running sums / added into gradients in place) against the same
   oracle applied to the gathered rows, scattered and merged in torch.
3. 64-bit group offsets and the half-precision rules.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from reformer.kernels import triton_lsh
from reformer.kernels.hashing import KEY_EPS
from reformer.kernels.triton_tiles import program_id64

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_thread")]

FP32_TOL = 1e-4
LAUNCHERS = ("_FWD", "_BWD_DQ", "_BWD_DKDV")
# output tolerance by dtype: one rounding of a value of magnitude <= ~2 (out is stored in the
# input dtype); gradients are float32 from exact half inputs: about float32 accuracy
OUT_TOL = {torch.float32: FP32_TOL, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
GRAD_TOL = {torch.float32: FP32_TOL, torch.float16: 2e-4, torch.bfloat16: 2e-4}


# ---------------------------------------------------------------- dense reference of one round
def _dense_logits(qk, pos, bkt, bucket_size, causal, mode, scale):
    """(G, Np, Np) logits [query slot, key slot] of one sorted round, -inf where not permitted."""
    n = qk.shape[1]
    slot = torch.arange(n)
    si, sj = slot[:, None], slot[None, :]
    keys = qk / qk.norm(dim=-1, keepdim=True).clamp_min(KEY_EPS)
    s = qk @ keys.transpose(-1, -2) * scale
    pq, pk = pos[:, :, None], pos[:, None, :]
    ok = (si != sj) & (pq >= 0) & (pk >= 0)
    if mode == "chunk":
        chunk = slot // bucket_size
        look_back = (chunk - 1) % (n // bucket_size)
        ok = ok & ((chunk[None, :] == chunk[:, None]) | (chunk[None, :] == look_back[:, None]))
        if causal:
            ok = ok & (pk <= pq)
    else:
        ok = ok & (bkt[:, :, None] == bkt[:, None, :]) & (sj < si) & (sj > si - bucket_size)
    return s.masked_fill(~ok, float("-inf"))


def _dense_fwd(qk, v, pos, bkt, bucket_size, causal, mode, scale):
    s = _dense_logits(qk, pos, bkt, bucket_size, causal, mode, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return p @ v, lse


def _dense_bwd(qk, v, pos, bkt, do, lse, delta, bucket_size, causal, mode, scale):
    qk = qk.detach().requires_grad_()
    s = _dense_logits(qk, pos, bkt, bucket_size, causal, mode, scale)
    p = torch.exp(s.detach() - lse.masked_fill(lse == float("-inf"), float("inf"))[..., None])
    ds = p * (do @ v.transpose(-1, -2) - delta[..., None])
    (dqk,) = torch.autograd.grad(s, qk, ds)
    return dqk, p.transpose(-1, -2) @ do


def _round_inputs(g, n_pad, d, n_valid, n_buckets=3, seed=0):
    """A sorted round: random rows, positions a permutation (first n_valid rows), -1 after;
    non-decreasing bucket ids (the sort key) per group."""
    gen = torch.Generator().manual_seed(seed)
    qk, v, do = (torch.randn(g, n_pad, d, generator=gen) for _ in range(3))
    qk[0, 3] *= 0.5 * KEY_EPS / qk[0, 3].norm()  # norm below KEY_EPS: the key norm is clamped
    pos = torch.full((g, n_pad), -1, dtype=torch.int32)
    for i in range(g):
        pos[i, :n_valid] = torch.randperm(n_pad, generator=gen)[:n_valid].int()
    bkt = torch.randint(0, n_buckets, (g, n_pad), generator=gen).sort(dim=-1).values.int()
    return qk, v, do, pos, bkt


def _backward_seeds(lse_ref):
    """A "combined" lse (other rounds add mass) and an arbitrary delta, float32-representable."""
    gen = torch.Generator().manual_seed(1)
    lse_all = (lse_ref + torch.rand(lse_ref.shape, generator=gen, dtype=torch.float64)).float().double()
    delta = torch.randn(lse_ref.shape, generator=gen, dtype=torch.float64).float().double()
    return lse_all, delta


def _max_abs(x):
    return x.abs().max().item() if x.numel() else 0.0


def _assert_rows_close(got, want, tol):
    """Each row within ``tol`` relative to its own magnitude (the clamped key's row is ~1/KEY_EPS)."""
    row_err = (got.double() - want).abs().amax(-1)
    assert (row_err <= tol * want.abs().amax(-1).clamp_min(1.0)).all(), row_err.max().item()


def _check_core(qk, v, do, pos, bkt, bucket_size, causal, mode="chunk"):
    dtype = qk.dtype
    scale = qk.shape[-1] ** -0.5
    kw = dict(bucket_size=bucket_size, causal=causal, causal_mode=mode, scale=scale)
    out, lse = triton_lsh.fwd(qk, v, pos, bkt, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float64
    q64, v64, do64 = qk.double(), v.double(), do.double()
    out_ref, lse_ref = _dense_fwd(q64, v64, pos, bkt, bucket_size, causal, mode, scale)
    assert (out.double() - out_ref).abs().max().item() <= OUT_TOL[dtype]
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert _max_abs(lse.double()[finite] - lse_ref[finite]) <= FP32_TOL
    assert torch.equal(out[~finite], torch.zeros_like(out[~finite]))  # no permitted key: out 0
    lse_all, delta = _backward_seeds(lse_ref)
    dqk, dv = triton_lsh.bwd(qk, v, pos, bkt, do, lse_all.float(), delta.float(), **kw)
    dqk_ref, dv_ref = _dense_bwd(q64, v64, pos, bkt, do64, lse_all, delta, bucket_size, causal, mode, scale)
    for got, want in ((dqk, dqk_ref), (dv, dv_ref)):
        assert got.dtype == torch.float32
        _assert_rows_close(got, want, GRAD_TOL[dtype])


def test_kernels_are_interpreted():
    assert all(getattr(triton_lsh, name).interpreted for name in LAUNCHERS)


# (G, Np, D, bucket_size, n_valid, causal, mode): one chunk (attended once), two chunks (each
# other's look-back), many chunks with wrap-around, buckets smaller than / equal to / not
# dividing the interpreter blocks (64 x 32), padding rows, a non-power-of-two head dim; the
# bucket mode with one slot per chunk (no key at all), small and large chunks.
CORE_CASES = [
    (2, 16, 16, 16, 16, False, "chunk"),
    (2, 32, 64, 32, 30, True, "chunk"),
    (2, 32, 16, 16, 32, True, "chunk"),
    (1, 96, 48, 16, 90, False, "chunk"),
    (2, 72, 16, 24, 70, True, "chunk"),
    (1, 60, 32, 5, 50, False, "chunk"),
    (2, 96, 32, 32, 90, False, "chunk"),  # the first block holds chunks 0..C-2: its look-back wraps alone
    (2, 7, 16, 1, 7, True, "bucket"),
    (2, 100, 16, 20, 93, True, "bucket"),
    (1, 96, 48, 48, 96, True, "bucket"),
    (2, 60, 32, 5, 60, True, "bucket"),
]


@pytest.mark.parametrize("g,n_pad,d,bucket_size,n_valid,causal,mode", CORE_CASES)
def test_core_matches_dense_reference(g, n_pad, d, bucket_size, n_valid, causal, mode):
    qk, v, do, pos, bkt = _round_inputs(g, n_pad, d, n_valid)
    _check_core(qk, v, do, pos, bkt, bucket_size, causal, mode)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["chunk", "bucket"])
def test_core_half_precision_matches_dense_reference(dtype, mode):
    qk, v, do, pos, bkt = _round_inputs(2, 80, 32, 75)
    _check_core(qk.to(dtype), v.to(dtype), do.to(dtype), pos, bkt, 16, True, mode)


def test_own_position_is_never_a_key():
    """A round where every query's only candidate key is itself: no key, out 0, lse -inf."""
    qk, v, do, pos, _ = _round_inputs(1, 16, 16, 16)
    bkt = torch.arange(16, dtype=torch.int32)[None]  # one slot per bucket
    for mode, bucket_size in (("bucket", 4), ("chunk", 1)):
        out, lse = triton_lsh.fwd(qk, v, pos if mode == "bucket" else pos.sort(-1).values, bkt,
                                  bucket_size=bucket_size, causal=True, causal_mode=mode, scale=0.25)
        if mode == "chunk":  # chunk c sees chunk c - 1 (earlier position) except chunk 0 (wraps to the last)
            assert torch.isinf(lse[0, 0]) and torch.isfinite(lse[0, 1:]).all()
        else:
            assert torch.isinf(lse).all() and torch.equal(out, torch.zeros_like(out))


def test_every_gpu_block_config_is_correct(monkeypatch):
    """The GPU block configs (blocks of whole chunks and blocks spanning chunks) are exact too."""
    configs = {c.label(): c for name in LAUNCHERS for cfgs in getattr(triton_lsh, name).configs.values()
               for c in cfgs}
    for label, cfg in sorted(configs.items()):
        for name in LAUNCHERS:
            monkeypatch.setattr(getattr(triton_lsh, name), "interpreter_config", cfg)
        for bucket_size, n_pad, mode in ((16, 160, "chunk"), (64, 192, "chunk"), (24, 144, "bucket")):
            qk, v, do, pos, bkt = _round_inputs(1, n_pad, 32, n_pad - 7)
            _check_core(qk, v, do, pos, bkt, bucket_size, True, mode)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bucket_size=0), ValueError, "bucket_size"),
        (dict(bucket_size=2.0), TypeError, "bucket_size"),
        (dict(d=8), ValueError, "head dim"),
        (dict(d=160), ValueError, "head dim"),
        (dict(dtype=torch.float64), TypeError, "float32, float16 or bfloat16"),
        (dict(n_pad=20), ValueError, "multiple of bucket_size"),
        (dict(causal_mode="future"), ValueError, "causal_mode"),
        (dict(causal_mode="bucket", causal=False), ValueError, "causal=True"),
        (dict(bkt_dtype=torch.int64), ValueError, "bkt must be int32"),
    ],
)
def test_core_rejects_unsupported_inputs(kwargs, error, match):
    args = dict(n_pad=32, d=16, bucket_size=16, dtype=torch.float32, causal_mode="chunk", causal=True,
                bkt_dtype=torch.int32) | kwargs
    qk = torch.randn(1, args["n_pad"], args["d"], dtype=args["dtype"])
    pos = torch.arange(args["n_pad"], dtype=torch.int32)[None]
    with pytest.raises(error, match=match):
        triton_lsh.fwd(qk, qk, pos, pos.to(args["bkt_dtype"]), bucket_size=args["bucket_size"],
                       causal=args["causal"], causal_mode=args["causal_mode"], scale=1.0)


# ------------------------------------------------------------------ round-level protocol
def _unsorted_round(g, n, d, bucket_size, n_pad_rows, dtype, seed=0):
    """Unsorted rows, a random order, per-slot buckets (non-decreasing), padding positions."""
    gen = torch.Generator().manual_seed(seed)
    qk, v, do = (torch.randn(g, n, d, generator=gen).to(dtype) for _ in range(3))
    pos = torch.arange(n, dtype=torch.int32).repeat(g, 1)
    pos[:, torch.randperm(n, generator=gen)[:n_pad_rows]] = -1
    order = torch.stack([torch.randperm(n, generator=gen) for _ in range(g)]).int()
    bkt = torch.randint(0, 3, (g, n), generator=gen).sort(dim=-1).values.int()
    return qk, v, do, pos, order, bkt


def _gathered(x, order, n_pad, fill):
    """Rows of ``x`` (G, N, ...) at the sorted slots, padded to n_pad slots with ``fill``."""
    idx = order.long().view(*order.shape, *([1] * (x.dim() - 2))).expand(*order.shape, *x.shape[2:])
    s = torch.gather(x, 1, idx)
    pad = s.new_full((s.shape[0], n_pad - s.shape[1], *s.shape[2:]), fill)
    return torch.cat([s, pad], 1)


def _scattered(x_sorted, order):
    """Inverse of _gathered (slots < N only)."""
    n = order.shape[1]
    out = torch.empty_like(x_sorted[:, :n])
    idx = order.long().view(*order.shape, *([1] * (x_sorted.dim() - 2))).expand(*order.shape, *x_sorted.shape[2:])
    return out.scatter_(1, idx, x_sorted[:, :n])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,bucket_size,mode", [(1, 4, "chunk"), (7, 4, "bucket"), (100, 16, "chunk"),
                                                  (100, 32, "bucket")])
def test_round_level_kernels_match_gather_core_merge(dtype, n, bucket_size, mode):
    g, d = 2, 32
    causal = mode == "bucket" or n == 100 and bucket_size == 16
    qk, v, do, pos, order, bkt = _unsorted_round(g, n, d, bucket_size, n // 5, dtype)
    n_pad = -(-n // bucket_size) * bucket_size
    scale = d**-0.5
    kw = dict(bucket_size=bucket_size, causal=causal, causal_mode=mode, scale=scale)
    # running sums from an earlier round (random), merged into in place
    gen = torch.Generator().manual_seed(2)
    out_acc = torch.randn(g, n, d, generator=gen)
    top = torch.randn(g, n, generator=gen, dtype=torch.float64)
    top[0, 0] = float("-inf")  # no key in any earlier round
    total = torch.rand(g, n, generator=gen, dtype=torch.float64) + 0.5
    total[0, 0], out_acc[0, 0] = 0.0, 0.0
    want = [x.double().clone() for x in (out_acc, top, total)]
    triton_lsh.forward_round(qk, v, pos, order, bkt, out_acc, top, total, **kw)

    sq, sv, sdo = (_gathered(x.double(), order, n_pad, 0.0) for x in (qk, v, do))
    spos = _gathered(pos, order, n_pad, -1)
    sbkt = torch.cat([bkt, bkt.new_full((g, n_pad - n), -1)], 1)  # bkt is per slot already
    out_r, lse_r = _dense_fwd(sq, sv, spos, sbkt, bucket_size, causal, mode, scale)
    out_r, lse_r = _scattered(out_r, order), _scattered(lse_r, order)
    w_out, w_top, w_total = want
    new_top = torch.maximum(w_top, lse_r)
    base = new_top.masked_fill(new_top == float("-inf"), 0.0)
    a, b = torch.exp(w_top - base), torch.exp(lse_r - base)
    w_out = w_out * a[..., None] + out_r * b[..., None]
    w_total = w_total * a + b
    assert torch.equal(torch.isinf(top), torch.isinf(new_top))
    fin = torch.isfinite(new_top)
    assert _max_abs(top.double()[fin] - new_top[fin]) <= FP32_TOL
    assert (total.double() - w_total).abs().max().item() <= FP32_TOL
    assert (out_acc.double() - w_out).abs().max().item() <= OUT_TOL[torch.float32] * 10

    # backward: combined lse and delta per unsorted row, added into existing gradients
    lse_all, delta = _backward_seeds(torch.where(fin, new_top + w_total.log(), new_top))
    dqk0, dv0 = torch.randn(g, n, d, generator=gen), torch.randn(g, n, d, generator=gen)
    dqk, dv = dqk0.clone(), dv0.clone()
    triton_lsh.backward_round(qk, v, pos, order, bkt, do, lse_all.float(), delta.float(), dqk, dv, **kw)
    slse, sdelta = _gathered(lse_all, order, n_pad, float("-inf")), _gathered(delta, order, n_pad, 0.0)
    dqk_r, dv_r = _dense_bwd(sq, sv, spos, sbkt, sdo, slse, sdelta, bucket_size, causal, mode, scale)
    _assert_rows_close(dqk - dqk0, _scattered(dqk_r, order), GRAD_TOL[dtype] * 10)
    _assert_rows_close(dv - dv0, _scattered(dv_r, order), GRAD_TOL[dtype] * 10)


def test_round_level_rejects_bad_accumulators():
    qk, v, _, pos, order, bkt = _unsorted_round(1, 10, 16, 4, 0, torch.float32)
    out, top, total = torch.zeros(1, 10, 16), torch.zeros(1, 10, dtype=torch.float64), torch.zeros(1, 10, dtype=torch.float64)
    kw = dict(bucket_size=4, causal=False, causal_mode="chunk", scale=0.25)
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        triton_lsh.forward_round(qk, v, pos, order, bkt, out.half(), top, total, **kw)
    with pytest.raises(ValueError, match="top must be a contiguous float64"):
        triton_lsh.forward_round(qk, v, pos, order, bkt, out, top.float(), total, **kw)
    with pytest.raises(ValueError, match="order must be int32"):
        triton_lsh.forward_round(qk, v, pos, order.long(), bkt, out, top, total, **kw)


def test_model_bytes_grows_linearly_with_rounds_and_rows():
    one = triton_lsh.model_bytes(8, 4096, 64, bucket_size=64, element_size=2)
    assert triton_lsh.model_bytes(8, 4096, 64, bucket_size=64, element_size=2, n_hashes=4) == 4 * one
    assert 1.9 * one < triton_lsh.model_bytes(8, 8192, 64, bucket_size=64, element_size=2) < 2.1 * one
    assert triton_lsh.model_bytes(8, 4096, 64, bucket_size=64, element_size=2, backward=False) < one / 2
    # at least the compulsory traffic: read qk and v, read and write the output sums
    assert one > 8 * 4096 * (64 * (2 * 2 + 2 * 4) + 2 * 16)


# ------------------------------------------------------------------ 64-bit offsets, half precision
@triton.jit
def _offset_probe(Out, stride, WIDE: tl.constexpr):
    """Out[g] = g * stride, with g widened to int64 (the kernels' way) or left int32."""
    if WIDE:
        g = program_id64(0)
    else:
        g = tl.program_id(0)
    tl.store(Out + g, (g * stride).to(tl.int64))


def test_group_offsets_are_computed_in_64_bits():
    """g * stride_g for G = 4 groups of 2**30 elements: 2**31 and 3 * 2**30 wrap in int32."""
    stride = 2**30
    want = torch.arange(4, dtype=torch.int64) * stride
    out = torch.zeros(4, dtype=torch.int64)
    _offset_probe[(4,)](out, stride, WIDE=True)
    assert torch.equal(out, want)
    _offset_probe[(4,)](out, stride, WIDE=False)  # the int32 product wraps: the probe can tell
    assert not torch.equal(out, want)


def test_group_too_large_for_int32_offsets_raises():
    qk = torch.empty(1, 1, 64).expand(1, 2**25, 64)  # 2**31 elements, never read: rejected first
    pos = torch.zeros(1, 2**25, dtype=torch.int32)
    with pytest.raises(ValueError, match="2\\*\\*31"):
        triton_lsh.fwd(qk, qk, pos, pos, bucket_size=16, causal=False, causal_mode="chunk", scale=1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["chunk", "bucket"])
def test_near_zero_and_huge_norm_rows_stay_finite_and_accurate_in_half_precision(dtype, mode):
    """Keys with norm 1e-7 (1 / norm clamped to 1 / KEY_EPS = 1e6) and with norm ~1e4: the
    query-use gradient multiplies score gradients by 1 / norm, which must not overflow or
    underflow in half precision."""
    g, n_pad, d, bucket_size = 1, 64, 32, 16
    qk, v, do, pos, bkt = _round_inputs(g, n_pad, d, n_pad, n_buckets=1)
    for row, norm in ((5, 1e-7), (20, 1e-6), (9, 1e4), (30, 3e3), (6, 1e-7)):
        qk[0, row] *= norm / qk[0, row].norm()
    qk, v, do = qk.to(dtype), v.to(dtype), do.to(dtype)
    scale = d**-0.5
    q64, v64, do64 = qk.double(), v.double(), do.double()
    kw = dict(bucket_size=bucket_size, causal=True, causal_mode=mode, scale=scale)
    out_ref, lse_ref = _dense_fwd(q64, v64, pos, bkt, bucket_size, True, mode, scale)
    out, lse = triton_lsh.fwd(qk, v, pos, bkt, **kw)
    assert torch.isfinite(out).all() and (out.double() - out_ref).abs().max().item() <= OUT_TOL[dtype]
    delta = (out_ref * do64).sum(-1)
    dqk, dv = triton_lsh.bwd(qk, v, pos, bkt, do, lse_ref.float(), delta.float(), **kw)
    dqk_ref, dv_ref = _dense_bwd(q64, v64, pos, bkt, do64, lse_ref, delta, bucket_size, True, mode, scale)
    for got, want in ((dqk, dqk_ref), (dv, dv_ref)):
        assert torch.isfinite(got).all()
        _assert_rows_close(got, want, 1e-3)


# ------------------------------------------------------------------ lsh_attention end to end
from reformer.kernels import lsh_attention  # noqa: E402
from reformer.kernels import ref_lsh  # noqa: E402
from reformer.kernels.hashing import make_rotations  # noqa: E402
from reformer.kernels.lsh_function import SortedCoreAdapter, lsh_attention_rounds  # noqa: E402

LOW_PRECISION_FLOOR = 1e-5  # both errors are vs float64; covers a torch error of exactly 0


def _lsh_inputs(b, h, n, d, dtype, pad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qk, v, do = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3))
    mask = torch.rand(b, n, generator=gen) < 0.3 if pad else None
    return qk, v, do, mask


def _lsh_run(qk, v, do, mask, core, dtype=None, **kw):
    """[out, dqk, dv] of LSH attention in ``dtype`` (default: the inputs' dtype) with ``core``:
    "torch" / "triton" (``lsh_attention``'s backends: the Triton sorted core behind the generic
    adapter) or "triton-rounds" (the Triton round-level kernels as the Function's core)."""
    qk, v = (x.to(dtype or x.dtype).detach().requires_grad_() for x in (qk, v))
    if core == "triton-rounds":
        b, h, n, d = qk.shape
        rot = make_rotations(h, d, kw.pop("n_hashes"), kw["n_buckets"], seed=1234, device=qk.device)
        x, y = qk, v
        if mask is not None:
            x, y = (t.masked_fill(mask[:, None, :, None], 0.0) for t in (qk, v))
        out, _ = lsh_attention_rounds(x, y, core=triton_lsh, key_padding_mask=mask, rotations=rot, **kw)
    else:
        out = lsh_attention(qk, v, key_padding_mask=mask, backend=core, seed=1234, **kw)
    return [out, *torch.autograd.grad(out, (qk, v), do.to(out.dtype))]


# (B, H, N, D, bucket_size, n_hashes, causal, causal_mode, pad): every N in {1, 7, 100, 257},
# both causal modes and non-causal, padding both ways
E2E_CASES = [
    (1, 2, 1, 16, 16, 1, False, "chunk", False),
    (2, 1, 7, 64, 4, 3, True, "bucket", True),
    (1, 2, 100, 16, 32, 3, False, "chunk", True),
    (2, 1, 257, 32, 16, 1, True, "chunk", True),
    (1, 2, 100, 16, 16, 2, True, "bucket", False),
    (2, 1, 7, 16, 4, 2, True, "chunk", False),
    (1, 1, 70, 16, 68, 1, True, "bucket", True),  # bucket mode: chunks wider than the interpreter's blocks
]
CORES = ["triton", "triton-rounds"]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("b,h,n,d,bucket_size,n_hashes,causal,mode,pad", E2E_CASES)
def test_lsh_attention_float32_matches_torch_backend(core, b, h, n, d, bucket_size, n_hashes, causal, mode, pad):
    qk, v, do, mask = _lsh_inputs(b, h, n, d, torch.float32, pad)
    kw = dict(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal, causal_mode=mode,
              n_buckets=2 * max(1, -(-n // bucket_size)))
    got = _lsh_run(qk, v, do, mask, core, **kw)
    want = _lsh_run(qk, v, do, mask, "torch", **kw)
    for name, x, y in zip(("out", "dqk", "dv"), got, want):
        assert torch.isfinite(x).all(), name
        assert (x - y).abs().max().item() <= FP32_TOL, name


@pytest.mark.parametrize("n,bucket_size,padded,times", [(24, 4, False, (7, 15)), (45, 40, True, (3, 41))])
def test_bucket_mode_no_look_ahead_is_bit_identical(n, bucket_size, padded, times):
    """The Triton backend in bucket mode (aligned layout, chunk-aligned tiles, blocks at fixed
    offsets from their chunk): outputs and gradients at positions <= t are torch.equal whatever
    the inputs at positions > t are (docs/lsh.md, "Causal modes"); chunks narrower and wider than
    the interpreter's blocks."""
    from test_lsh_causal import later_changes_leave_earlier_bits

    assert later_changes_leave_earlier_bits(n, bucket_size, 2, 4, torch.float32, padded=padded, backend="triton",
                                            times=times, d=16, changes=(10,))


LOW_PRECISION_CASES = [
    (torch.float16, 2, 1, 100, 64, 32, 3, True, "bucket", True),
    (torch.float16, 1, 2, 7, 16, 4, 3, False, "chunk", False),
    (torch.bfloat16, 1, 2, 257, 16, 16, 1, True, "chunk", True),
    (torch.bfloat16, 2, 1, 100, 32, 16, 2, True, "bucket", False),
]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("dtype,b,h,n,d,bucket_size,n_hashes,causal,mode,pad", LOW_PRECISION_CASES)
def test_lsh_attention_low_precision_error_within_twice_torch_error(core, dtype, b, h, n, d, bucket_size, n_hashes,
                                                                    causal, mode, pad):
    qk, v, do, mask = _lsh_inputs(b, h, n, d, dtype, pad)
    kw = dict(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal, causal_mode=mode,
              n_buckets=2 * max(1, -(-n // bucket_size)))
    ref = _lsh_run(qk, v, do, mask, "torch", torch.float64, **kw)
    torch_err = [(x.double() - r).abs().max().item() for x, r in zip(_lsh_run(qk, v, do, mask, "torch", **kw), ref)]
    got = _lsh_run(qk, v, do, mask, core, **kw)
    for name, x, r, bound in zip(("out", "dqk", "dv"), got, ref, torch_err):
        assert x.dtype == dtype, name
        assert (x.double() - r).abs().max().item() <= 2 * bound + LOW_PRECISION_FLOOR, name


@pytest.mark.parametrize("core", CORES)
def test_lsh_attention_fully_padded_sequence_gives_zeros(core):
    qk, v, do, mask = _lsh_inputs(2, 2, 40, 16, torch.float32, pad=True)
    mask[1] = True
    out, dqk, dv = _lsh_run(qk, v, do, mask, core, bucket_size=16, n_hashes=2, n_buckets=6, causal=False,
                            causal_mode="chunk")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert (out[0][:, mask[0]] == 0).all()  # padded positions of the other sequence
    for grad in (dqk, dv):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
        assert (grad[0][:, mask[0]] == 0).all()


def test_round_level_core_equals_the_adapter_around_the_reference():
    """The Function's round-level seam: Triton's forward_round/backward_round and the generic
    adapter around the torch sorted core give the same out, lse and gradients."""
    qk, v, do, mask = _lsh_inputs(2, 2, 50, 16, torch.float32, pad=True)
    rot = make_rotations(2, 16, 3, 8, seed=7, device=torch.device("cpu"))
    res = []
    for core in (triton_lsh, SortedCoreAdapter(ref_lsh)):
        x, y = (t.detach().masked_fill(mask[:, None, :, None], 0.0).requires_grad_() for t in (qk, v))
        out, lse = lsh_attention_rounds(x, y, core=core, bucket_size=8, causal=True, causal_mode="bucket",
                                        key_padding_mask=mask, rotations=rot, n_buckets=8)
        res.append([out, lse, *torch.autograd.grad((out, lse), (x, y), (do, torch.ones_like(lse).masked_fill(
            ~torch.isfinite(lse), 0.0)))])
    for name, x, y in zip(("out", "lse", "dqk", "dv"), *res):
        assert torch.equal(torch.isfinite(x), torch.isfinite(y)), name
        assert (x[torch.isfinite(x)] - y[torch.isfinite(y)]).abs().max().item() <= FP32_TOL, name


# ------------------------------------------------------------- huge logits and extreme key norms
def _sign_pattern_rows(b, h, n, d, n_patterns, magnitude, seed=0):
    """Rows ``magnitude * p`` for sign vectors p drawn from ``n_patterns`` patterns: with D = 16 the
    key norm is ``4 * magnitude`` and the normalised keys are +-1/4, so every logit
    ``q . k / 4 = magnitude * (1 - hamming(p_q, p_k) / 8)`` is exact in float32 in both backends;
    equal patterns tie (the softmax spreads over them) and any other pattern is 2**20 below
    (probability 0) for ``magnitude = 2**23``."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n_patterns, d), generator=gen).float() * 2 - 1
    return signs[torch.randint(0, n_patterns, (b, h, n), generator=gen)] * magnitude


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("causal,mode", [(False, "chunk"), (True, "chunk"), (True, "bucket")])
def test_huge_logits_match_torch_backend(core, causal, mode):
    """Logits of 2**23 (~8e6, where float32 has no fractional digit left): a round's lse
    ``2**23 + log(count)`` must keep its digits (float64) in the merge of the rounds, and the
    backward must use the combined lse to full precision (float32 would round ``log(count)``
    away and scale the probabilities by up to e**0.5)."""
    b, h, n, d = 1, 2, 40, 16
    qk = _sign_pattern_rows(b, h, n, d, 4, 2.0**23)
    _, v, do, _ = _lsh_inputs(b, h, n, d, torch.float32, pad=False)
    kw = dict(bucket_size=8, n_hashes=3, causal=causal, causal_mode=mode, n_buckets=4)
    got = _lsh_run(qk, v, do, None, core, **kw)
    want = _lsh_run(qk, v, do, None, "torch", **kw)
    for name, x, y in zip(("out", "dqk", "dv"), got, want):
        assert torch.isfinite(x).all(), name
        assert (x - y).abs().max().item() <= FP32_TOL, name


def test_core_backward_uses_a_float64_lse_to_full_precision():
    """The sorted core's backward given a combined float64 lse ``2**23 + fraction`` (ties at
    logit 2**23): p = exp(s - lse) must keep the fraction (a float32 lse drops it)."""
    g, n_pad, d, bucket_size = 2, 32, 16, 8
    qk = _sign_pattern_rows(1, g, n_pad, d, 3, 2.0**23, seed=3)[0]
    _, v, do, pos, bkt = _round_inputs(g, n_pad, d, n_pad, n_buckets=1)
    scale = d**-0.5
    kw = dict(bucket_size=bucket_size, causal=True, causal_mode="chunk", scale=scale)
    q64, v64, do64 = qk.double(), v.double(), do.double()
    _, lse_ref = _dense_fwd(q64, v64, pos, bkt, bucket_size, True, "chunk", scale)
    _, delta = _backward_seeds(lse_ref)
    gen = torch.Generator().manual_seed(2)
    lse_all = lse_ref + torch.rand(lse_ref.shape, generator=gen, dtype=torch.float64)  # other rounds' mass
    assert (lse_all > 2.0**23).sum() > n_pad  # most rows: a tie at 2**23 plus a fraction
    dqk, dv = triton_lsh.bwd(qk, v, pos, bkt, do, lse_all, delta.float(), **kw)
    dqk_ref, dv_ref = _dense_bwd(q64, v64, pos, bkt, do64, lse_all, delta, bucket_size, True, "chunk", scale)
    for got, want in ((dqk, dqk_ref), (dv, dv_ref)):
        _assert_rows_close(got, want, FP32_TOL)


def _quantised(x):
    """Multiples of 1/8: dot products of such rows are exact in float32 (and the values exact in
    float16/bfloat16), so a one-hot softmax row has a score gradient of exactly 0 in both backends."""
    return (x * 8).round() / 8


# (dtype, huge row norm): float32 and bfloat16 rows past ~1.8e19 overflow a plain float32 sum of
# squares; float16 cannot hold such rows (rows of norm 6e4, entries up to its largest, instead). Near-zero rows
# (norm clamped to KEY_EPS) and an all-zero row in every dtype.
EXTREME_NORMS = [(torch.float32, 4e19, 1e-30), (torch.bfloat16, 4e19, 1e-30), (torch.float16, 6e4, 1e-7)]


@pytest.mark.parametrize("core", CORES)
@pytest.mark.parametrize("dtype,huge,tiny", EXTREME_NORMS)
@pytest.mark.parametrize("causal,mode", [(False, "chunk"), (True, "bucket")])
def test_near_zero_and_huge_norm_keys_match_torch_backend(core, dtype, huge, tiny, causal, mode):
    """Rows with norms from 0 and ``tiny`` to ``huge`` next to ordinary rows: the key norm must not
    overflow (huge-norm keys normalise to unit keys, as in the torch reference) and a huge query
    against a huge key must not overflow the logit's dot product; outputs and gradients equal
    the torch backend's (per row, relative to the row's size)."""
    b, h, n, d = 1, 2, 40, 16
    qk, v, do, _ = _lsh_inputs(b, h, n, d, torch.float32, pad=False)
    v, do = _quantised(v), _quantised(do)
    # head 0: huge rows; head 1: near-zero rows (a huge query against a clamped key is
    # ill-conditioned: the key's gradient ~ |q| / KEY_EPS times a float32 cancellation)
    for head, row, norm in ((0, 3, huge), (0, 4, huge), (0, 9, huge), (0, 17, huge), (0, 30, huge), (1, 10, tiny),
                            (1, 22, tiny), (1, 23, 0.0)):
        qk[:, head, row] *= norm / qk[:, head, row].norm(dim=-1, keepdim=True)
    qk, v, do = qk.to(dtype), v.to(dtype), do.to(dtype)
    assert torch.isfinite(qk).all()
    kw = dict(bucket_size=8, n_hashes=2, causal=causal, causal_mode=mode, n_buckets=4)
    got = _lsh_run(qk, v, do, None, core, **kw)
    want = _lsh_run(qk, v, do, None, "torch", **kw)
    ref = _lsh_run(qk, v, do, None, "torch", torch.float64, **kw)  # the same (rounded) inputs in float64
    for name, x, y, r in zip(("out", "dqk", "dv"), got, want, ref):
        # float16 only: the gradient of a row clamped to KEY_EPS (dk / KEY_EPS, ~5e5 here) is
        # past the float16 range in both backends (inf at the same entries)
        finite = torch.isfinite(y)
        assert finite.all() or (dtype == torch.float16 and name == "dqk"), name
        assert torch.equal(torch.isfinite(x), finite), name
        x, y, r = (t.double().masked_fill(~finite, 0.0).reshape(-1, d) for t in (x, y, r))
        # per row: the Triton error at most twice the torch backend's own error (the gradient
        # of a clamped key is dk / KEY_EPS: a float32 cancellation in dk, amplified 1e6 times)
        torch_err = (y - r).abs().amax(-1)
        bound = 2 * torch_err + LOW_PRECISION_FLOOR * r.abs().amax(-1).clamp_min(1.0)
        assert ((x - r).abs().amax(-1) <= bound).all(), name
