"""Triton LSH attention (kernels/triton_lsh.py) under TRITON_INTERPRET=1.

1. The per-round core (fwd/bwd, LSH_CORE_CONTRACT) against a dense float64 evaluation of the
   contract written here (an (Np x Np) logit matrix with the chunk mask; autograd for dqk).
2. ``lsh_attention(backend="triton")`` against ``backend="torch"``, outputs and gradients:
   float32 within 1e-4; float16/bfloat16 error at most 2x the torch backend's own error in that
   dtype, both against a float64 run.
"""
from __future__ import annotations

import pytest
import torch

from reformer.kernels import lsh_attention
from reformer.kernels import triton_lsh
from reformer.kernels.lsh_common import KEY_EPS, SELF_LOGIT

pytestmark = pytest.mark.triton

FP32_TOL = 1e-4
LOW_PRECISION_FLOOR = 1e-5  # both errors are vs float64; covers a torch error of exactly 0
LAUNCHERS = ("_FWD", "_BWD_DQ", "_BWD_DKDV")


# ---------------------------------------------------------------- dense reference of one round
def _dense_logits(qk, pos, bucket_size, causal, scale):
    """(G, Np, Np) logits [query, key] of one sorted round, -inf where not permitted."""
    n = qk.shape[1]
    chunk = torch.arange(n) // bucket_size
    look_back = (chunk - 1) % (n // bucket_size)
    pair = (chunk[None, :] == chunk[:, None]) | (chunk[None, :] == look_back[:, None])
    keys = qk / qk.norm(dim=-1, keepdim=True).clamp_min(KEY_EPS)
    s = qk @ keys.transpose(-1, -2) * scale
    pq, pk = pos[:, :, None], pos[:, None, :]
    s = torch.where(pq == pk, torch.full_like(s, SELF_LOGIT), s)  # a constant: no gradient
    ok = pair & (pq >= 0) & (pk >= 0)
    if causal:
        ok = ok & (pk <= pq)
    return s.masked_fill(~ok, float("-inf"))


def _dense_fwd(qk, v, pos, bucket_size, causal, scale):
    s = _dense_logits(qk, pos, bucket_size, causal, scale)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.masked_fill(lse == float("-inf"), 0.0)[..., None])
    return p @ v, lse


def _dense_bwd(qk, v, pos, do, lse, delta, bucket_size, causal, scale):
    qk = qk.detach().requires_grad_()
    s = _dense_logits(qk, pos, bucket_size, causal, scale)
    p = torch.exp(s.detach() - lse.masked_fill(lse == float("-inf"), float("inf"))[..., None])
    ds = p * (do @ v.transpose(-1, -2) - delta[..., None])
    (dqk,) = torch.autograd.grad(s, qk, ds)
    return dqk, p.transpose(-1, -2) @ do


def _round_inputs(g, n_pad, d, n_valid, seed=0):
    """A sorted round: random rows, positions a permutation (first n_valid rows), -1 after."""
    gen = torch.Generator().manual_seed(seed)
    qk, v, do = (torch.randn(g, n_pad, d, generator=gen) for _ in range(3))
    qk[0, 3] *= 0.5 * KEY_EPS / qk[0, 3].norm()  # norm below KEY_EPS: the key norm is clamped
    pos = torch.full((g, n_pad), -1, dtype=torch.int32)
    for i in range(g):
        pos[i, :n_valid] = torch.randperm(n_pad, generator=gen)[:n_valid].int()
    return qk, v, do, pos


def _check_core(qk, v, do, pos, bucket_size, causal):
    scale = qk.shape[-1] ** -0.5
    out, lse = triton_lsh.fwd(qk, v, pos, bucket_size=bucket_size, causal=causal, scale=scale)
    q64, v64, do64 = qk.double(), v.double(), do.double()
    out_ref, lse_ref = _dense_fwd(q64, v64, pos, bucket_size, causal, scale)
    assert (out.double() - out_ref).abs().max().item() <= FP32_TOL
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert (lse.double()[finite] - lse_ref[finite]).abs().max().item() <= FP32_TOL
    # backward with a "combined" lse (other rounds add mass) and an arbitrary delta
    gen = torch.Generator().manual_seed(1)
    # float32-representable values: a self-only row's lse (about SELF_LOGIT) is coarse in float32
    lse_all = (lse_ref + torch.rand(lse_ref.shape, generator=gen, dtype=torch.float64)).float().double()
    delta = torch.randn(lse_ref.shape, generator=gen, dtype=torch.float64).float().double()
    dqk, dv = triton_lsh.bwd(qk, v, pos, do, lse_all.float(), delta.float(), bucket_size=bucket_size,
                             causal=causal, scale=scale)
    dqk_ref, dv_ref = _dense_bwd(q64, v64, pos, do64, lse_all, delta, bucket_size, causal, scale)
    for got, want in ((dqk, dqk_ref), (dv, dv_ref)):
        # the clamped key's row is ~1/KEY_EPS: each row relative to its own magnitude
        row_err = (got.double() - want).abs().amax(-1)
        assert (row_err <= FP32_TOL * want.abs().amax(-1).clamp_min(1.0)).all()


def test_kernels_are_interpreted():
    assert all(getattr(triton_lsh, name).interpreted for name in LAUNCHERS)


# (G, Np, D, bucket_size, n_valid, causal): one chunk (attended once), two chunks (each other's
# look-back), many chunks with wrap-around, buckets smaller than / equal to / not dividing the
# interpreter blocks (64 x 32), padding rows, a non-power-of-two head dim.
CORE_CASES = [
    (2, 16, 16, 16, 16, False),
    (2, 32, 64, 32, 30, True),
    (2, 32, 16, 16, 32, True),
    (1, 96, 48, 16, 90, False),
    (2, 72, 16, 24, 70, True),
    (1, 60, 32, 5, 50, False),
    (2, 96, 32, 32, 90, False),  # the first block holds chunks 0..C-2: its look-back wraps alone
]


@pytest.mark.parametrize("g,n_pad,d,bucket_size,n_valid,causal", CORE_CASES)
def test_core_matches_dense_reference(g, n_pad, d, bucket_size, n_valid, causal):
    qk, v, do, pos = _round_inputs(g, n_pad, d, n_valid)
    _check_core(qk, v, do, pos, bucket_size, causal)


def test_every_gpu_block_config_is_correct(monkeypatch):
    """The GPU block configs (blocks of whole chunks and blocks spanning chunks) are exact too."""
    configs = {c.label(): c for cfgs in triton_lsh.CONFIGS.values() for c in cfgs}
    for label, cfg in sorted(configs.items()):
        for name in LAUNCHERS:
            monkeypatch.setattr(getattr(triton_lsh, name), "interpreter_config", cfg)
        for bucket_size, n_pad in ((16, 160), (64, 192)):
            qk, v, do, pos = _round_inputs(1, n_pad, 32, n_pad - 7)
            _check_core(qk, v, do, pos, bucket_size, causal=True)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(bucket_size=0), ValueError, "bucket_size"),
        (dict(d=8), ValueError, "head dim"),
        (dict(d=160), ValueError, "head dim"),
        (dict(dtype=torch.float64), TypeError, "float32, float16 or bfloat16"),
        (dict(n_pad=20), ValueError, "multiple of bucket_size"),
    ],
)
def test_core_rejects_unsupported_inputs(kwargs, error, match):
    args = dict(n_pad=32, d=16, bucket_size=16, dtype=torch.float32) | kwargs
    qk = torch.randn(1, args["n_pad"], args["d"], dtype=args["dtype"])
    pos = torch.arange(args["n_pad"], dtype=torch.int32)[None]
    with pytest.raises(error, match=match):
        triton_lsh.fwd(qk, qk, pos, bucket_size=args["bucket_size"], causal=False, scale=1.0)


# ------------------------------------------------------------------ lsh_attention end to end
def _lsh_inputs(b, h, n, d, dtype, pad, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qk, v, do = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3))
    mask = torch.rand(b, n, generator=gen) < 0.3 if pad else None
    return qk, v, do, mask


def _lsh_run(qk, v, do, mask, backend, dtype=None, **kw):
    """[out, dqk, dv] of lsh_attention in ``dtype`` (default: the inputs' dtype)."""
    qk, v = (x.to(dtype or x.dtype).detach().requires_grad_() for x in (qk, v))
    out = lsh_attention(qk, v, key_padding_mask=mask, backend=backend, seed=1234, **kw)
    return [out, *torch.autograd.grad(out, (qk, v), do.to(out.dtype))]


# (B, H, N, D, bucket_size, n_hashes, causal, pad): every N in {1, 7, 100, 257}, bucket_size in
# {16, 32}, n_hashes in {1, 3}, D in {16, 64}, causal and padding both ways.
FP32_CASES = [
    (1, 2, 1, 16, 16, 1, False, False),
    (2, 1, 7, 64, 16, 3, True, True),
    (1, 2, 100, 16, 32, 3, False, True),
    (2, 1, 257, 64, 16, 1, True, True),
    (1, 2, 257, 16, 32, 1, True, False),
    (2, 1, 100, 64, 16, 1, False, False),
]


@pytest.mark.parametrize("b,h,n,d,bucket_size,n_hashes,causal,pad", FP32_CASES)
def test_lsh_attention_float32_matches_torch_backend(b, h, n, d, bucket_size, n_hashes, causal, pad):
    qk, v, do, mask = _lsh_inputs(b, h, n, d, torch.float32, pad)
    kw = dict(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal)
    got = _lsh_run(qk, v, do, mask, "triton", **kw)
    want = _lsh_run(qk, v, do, mask, "torch", **kw)
    for name, x, y in zip(("out", "dqk", "dv"), got, want):
        assert torch.isfinite(x).all(), name
        assert (x - y).abs().max().item() <= FP32_TOL, name


LOW_PRECISION_CASES = [
    (torch.float16, 2, 1, 100, 64, 32, 3, True, True),
    (torch.float16, 1, 2, 7, 16, 16, 3, False, False),
    (torch.bfloat16, 1, 2, 257, 16, 16, 1, False, True),
    (torch.bfloat16, 2, 1, 100, 64, 16, 3, True, False),
]


@pytest.mark.parametrize("dtype,b,h,n,d,bucket_size,n_hashes,causal,pad", LOW_PRECISION_CASES)
def test_lsh_attention_low_precision_error_within_twice_torch_error(dtype, b, h, n, d, bucket_size, n_hashes,
                                                                    causal, pad):
    qk, v, do, mask = _lsh_inputs(b, h, n, d, dtype, pad)
    kw = dict(bucket_size=bucket_size, n_hashes=n_hashes, causal=causal)
    ref = _lsh_run(qk, v, do, mask, "torch", torch.float64, **kw)
    torch_err = [(x.double() - r).abs().max().item() for x, r in zip(_lsh_run(qk, v, do, mask, "torch", **kw), ref)]
    got = _lsh_run(qk, v, do, mask, "triton", **kw)
    for name, x, r, bound in zip(("out", "dqk", "dv"), got, ref, torch_err):
        assert x.dtype == dtype, name
        assert (x.double() - r).abs().max().item() <= 2 * bound + LOW_PRECISION_FLOOR, name


def test_lsh_attention_fully_padded_sequence_gives_zeros():
    qk, v, do, mask = _lsh_inputs(2, 2, 40, 16, torch.float32, pad=True)
    mask[1] = True
    out, dqk, dv = _lsh_run(qk, v, do, mask, "triton", bucket_size=16, n_hashes=2)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert (out[0][:, mask[0]] == 0).all()  # padded positions of the other sequence
    for grad in (dqk, dv):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
        assert (grad[0][:, mask[0]] == 0).all()


# ------------------------------------------------------------------ 64-bit offsets, half precision
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from reformer.kernels.triton_tiles import program_id64  # noqa: E402


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
    with pytest.raises(ValueError, match="2\\*\\*31"):
        triton_lsh._check(qk, qk, torch.zeros(1, 2**25, dtype=torch.int32), 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_near_zero_and_huge_norm_rows_stay_finite_and_accurate_in_half_precision(dtype):
    """Keys with norm 1e-7 (1 / norm clamped to 1 / KEY_EPS = 1e6) and with norm ~1e4: the
    query-use gradient multiplies score gradients by 1 / norm, which must not overflow or
    underflow in half precision."""
    g, n_pad, d, bucket_size = 1, 64, 32, 16
    qk, v, do, pos = _round_inputs(g, n_pad, d, n_pad)
    qk[0, 5] *= 1e-7 / qk[0, 5].norm()
    qk[0, 20] *= 1e-6 / qk[0, 20].norm()
    qk[0, 9] *= 1e4 / qk[0, 9].norm()
    qk[0, 30] *= 3e3 / qk[0, 30].norm()
    qk, v, do = qk.to(dtype), v.to(dtype), do.to(dtype)
    scale = d**-0.5
    q64, v64, do64 = qk.double(), v.double(), do.double()
    out_ref, lse_ref = _dense_fwd(q64, v64, pos, bucket_size, False, scale)
    out, lse = triton_lsh.fwd(qk, v, pos, bucket_size=bucket_size, causal=False, scale=scale)
    out_tol = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10  # one output rounding
    assert torch.isfinite(out).all() and (out.double() - out_ref).abs().max().item() <= out_tol
    delta = (out_ref * do64).sum(-1)
    dqk, dv = triton_lsh.bwd(qk, v, pos, do, lse_ref.float(), delta.float(), bucket_size=bucket_size,
                             causal=False, scale=scale)
    dqk_ref, dv_ref = _dense_bwd(q64, v64, pos, do64, lse_ref, delta, bucket_size, False, scale)
    for got, want in ((dqk, dqk_ref), (dv, dv_ref)):
        assert torch.isfinite(got).all()
        row_err = (got.double() - want).abs().amax(-1)
        assert (row_err <= 1e-3 * want.abs().amax(-1).clamp_min(1.0)).all()
