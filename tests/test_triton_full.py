"""Triton full attention (kernels/triton_full.py) vs the torch backend, under TRITON_INTERPRET=1.

float32: outputs and gradients within 1e-4 of the torch backend. float16/bfloat16: the Triton
error is at most 2x the torch backend's own error in that dtype, both against a float64 run.
"""
from __future__ import annotations

import pytest
import torch

from reformer.kernels import full_attention
from reformer.kernels import triton_full

pytestmark = pytest.mark.triton

FP32_TOL = 1e-4
# Both errors are measured against float64; this floor only covers a torch error of exactly 0.
LOW_PRECISION_FLOOR = 1e-5


def _inputs(b, h, nq, nk, d, dv, dtype, pad, seed=0):
    """q, k, v, dO and a key padding mask (batch 0: some keys padded; batch 1: all padded)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, h, n, e, generator=gen).to(dtype) for n, e in ((nq, d), (nk, d), (nk, dv), (nq, dv)))
    mask = None
    if pad:
        mask = torch.rand(b, nk, generator=gen) < 0.3
        mask[-1] = True  # a fully padded batch element: every row has no key
    return q, k, v, do, mask


def _run(q, k, v, do, mask, causal, backend, dtype=None):
    """[out, dq, dk, dv] of full_attention in ``dtype`` (default: the inputs' dtype)."""
    q, k, v = (x.to(dtype or x.dtype).detach().requires_grad_() for x in (q, k, v))
    out = full_attention(q, k, v, causal=causal, key_padding_mask=mask, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do.to(out.dtype))
    return [out, *grads]


def test_kernels_are_interpreted():
    assert triton_full._FWD.interpreted and triton_full._BWD_DQ.interpreted and triton_full._BWD_DKDV.interpreted


# (B, H, Nq, Nk, D, Dv, causal, pad): every N in {1, 7, 100, 257}, Nq != Nk both ways,
# D in {16, 64} plus a non-power-of-two head dim and Dv != D.
FP32_CASES = [
    (1, 2, 1, 1, 16, 16, True, False),
    (2, 1, 7, 7, 64, 64, False, True),
    (2, 1, 100, 100, 16, 16, True, True),
    (1, 2, 257, 257, 64, 64, False, False),
    (2, 1, 100, 257, 48, 48, True, True),
    (2, 1, 257, 7, 16, 32, False, True),
    (1, 2, 7, 100, 64, 64, True, False),
]


@pytest.mark.parametrize("b,h,nq,nk,d,dv,causal,pad", FP32_CASES)
def test_float32_matches_torch_backend(b, h, nq, nk, d, dv, causal, pad):
    q, k, v, do, mask = _inputs(b, h, nq, nk, d, dv, torch.float32, pad)
    got = _run(q, k, v, do, mask, causal, "triton")
    want = _run(q, k, v, do, mask, causal, "torch")
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert torch.isfinite(x).all(), name
        assert (x - y).abs().max().item() <= FP32_TOL, name


LOW_PRECISION_CASES = [
    (torch.float16, 2, 1, 100, 100, 64, True, True),
    (torch.float16, 1, 2, 7, 257, 16, False, False),
    (torch.bfloat16, 2, 1, 257, 100, 16, False, True),
    (torch.bfloat16, 1, 2, 1, 7, 64, True, False),
]


@pytest.mark.parametrize("dtype,b,h,nq,nk,d,causal,pad", LOW_PRECISION_CASES)
def test_low_precision_error_within_twice_torch_error(dtype, b, h, nq, nk, d, causal, pad):
    q, k, v, do, mask = _inputs(b, h, nq, nk, d, d, dtype, pad)
    ref = _run(q, k, v, do, mask, causal, "torch", torch.float64)
    torch_err = [(x.double() - r).abs().max().item() for x, r in zip(_run(q, k, v, do, mask, causal, "torch"), ref)]
    got = _run(q, k, v, do, mask, causal, "triton")
    for name, x, r, bound in zip(("out", "dq", "dk", "dv"), got, ref, torch_err):
        assert x.dtype == dtype, name
        assert (x.double() - r).abs().max().item() <= 2 * bound + LOW_PRECISION_FLOOR, name


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    q, k, v, do, mask = _inputs(2, 2, 20, 20, 16, 16, torch.float32, pad=True)
    out, dq, dk, dv = _run(q, k, v, do, mask, False, "triton")
    assert mask[1].all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for grad in (dq, dk, dv):
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))


def _all_configs(launcher):
    return sorted({c.label(): c for cfgs in launcher.configs.values() for c in cfgs}.items())


@pytest.mark.parametrize("which", ["_FWD", "_BWD_DQ", "_BWD_DKDV"])
def test_every_gpu_block_config_is_correct(which, monkeypatch):
    """The autotuned GPU configs (larger, other block shapes) give the same numbers."""
    launcher = getattr(triton_full, which)
    q, k, v, do, mask = _inputs(2, 1, 70, 150, 32, 32, torch.float32, pad=True)
    want = _run(q, k, v, do, mask, True, "torch")
    for label, cfg in _all_configs(launcher):
        monkeypatch.setattr(launcher, "interpreter_config", cfg)
        got = _run(q, k, v, do, mask, True, "triton")
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
            assert (x - y).abs().max().item() <= FP32_TOL, f"{label}: {name}"


@pytest.mark.parametrize("d", [8, 160])
def test_unsupported_head_dim_raises(d):
    q = torch.randn(1, 1, 4, d)
    with pytest.raises(ValueError, match="head dim"):
        full_attention(q, q, q, backend="triton")


def test_float64_raises():
    q = torch.randn(1, 1, 4, 16, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        full_attention(q, q, q, backend="triton")


@pytest.mark.parametrize("causal", [True, False])
def test_huge_logits_match_torch_backend(causal):
    """Logits of 2**23 (~8e6) that tie: with q = 2**11 p and k = 2**10 p' for sign vectors p, p'
    (D = 16) every logit ``2**21 * (4 - hamming(p, p') / 2)`` is exact in float32, equal patterns
    tie at 2**23 and others are 2**20 below. The lse ``2**23 + log(count)`` must keep its
    fraction for the backward (a float32 lse rounds it away and scales p by up to e**0.5)."""
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (3, 16), generator=gen).float() * 2 - 1
    q, k = (signs[torch.randint(0, 3, (1, 2, 40), generator=gen)] * 2.0**e for e in (11, 10))
    _, _, v, do, _ = _inputs(1, 2, 40, 40, 16, 16, torch.float32, pad=False)
    got = _run(q, k, v, do, None, causal, "triton")
    want = _run(q, k, v, do, None, causal, "torch")
    ref = _run(q, k, v, do, None, causal, "torch", torch.float64)
    for name, x, y, r in zip(("out", "dq", "dk", "dv"), got, want, ref):
        assert torch.isfinite(x).all(), name
        # dq is 0 up to float32 cancellation (tied keys are one vector): the Triton error at most
        # twice the torch backend's, plus 1e-4 relative to the tensor's size (dk ~ 2e3)
        err, torch_err = ((t.double() - r).abs().max().item() for t in (x, y))
        assert err <= 2 * torch_err + FP32_TOL * max(1.0, r.abs().max().item()), (name, err, torch_err)
