"""The exact self rule at any finite magnitude, and padding that cannot leak (docs/lsh.md,
"The self rule" and "Padding"), for lsh_attention and full_attention."""
from __future__ import annotations

import math

import pytest
import torch

from reformer.kernels import dense_shared_qk_attention, full_attention, lsh_attention
from reformer.kernels.ref_dense import SELF_ONLY_LSE

NEG_INF = float("-inf")


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, m) for m in (1e4, 1e5, 1e6, 1e10, 1e20, 1e30)]
                         + [(torch.float16, 1e4)])  # float16 holds at most 65504
@pytest.mark.parametrize("causal", [False, True])
def test_huge_logits_match_the_dense_oracle(magnitude, dtype, causal):
    n = 19
    base = rand(1, 2, n, 8, dtype=torch.float32, seed=1)
    base = base / base.abs().amax() * 6.0  # entries up to 6 * magnitude: float16 holds 6e4
    qk = (base * magnitude).to(dtype).requires_grad_()
    v = rand(1, 2, n, 8, dtype=torch.float32, seed=2).to(dtype).requires_grad_()
    out = lsh_attention(qk, v, bucket_size=n, n_hashes=2, causal=causal, causal_mode="chunk", seed=3,
                        backend="torch")
    qk64, v64 = (x.detach().double().requires_grad_() for x in (qk, v))
    ref = dense_shared_qk_attention(qk64, v64, causal=causal)  # float64
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=0)
    g = rand(*out.shape, dtype=torch.float32, seed=4).to(dtype)
    dqk, dv = torch.autograd.grad(out, (qk, v), g)
    dqk_ref, dv_ref = torch.autograd.grad(ref, (qk64, v64), g.double())
    assert torch.isfinite(dqk).all() and torch.isfinite(dv).all()
    torch.testing.assert_close(dv.double(), dv_ref, atol=2e-2, rtol=0)
    torch.testing.assert_close(dqk.double(), dqk_ref, atol=2e-2 * max(1.0, dqk_ref.abs().max().item()), rtol=0)


@pytest.mark.parametrize("magnitude", [1.0, 1e5, 1.2e5, 1e6, 1e30])
def test_a_row_whose_only_other_key_has_a_hugely_negative_logit_attends_to_it(magnitude):
    """Two positions with opposite qk: each one's only permitted key is the other (logit about
    -magnitude), never itself, whatever the magnitude."""
    x = rand(1, 1, 1, 8, dtype=torch.float32, seed=1)
    qk = (torch.cat([x, -x], dim=2) * magnitude).requires_grad_()
    v = rand(1, 1, 2, 8, dtype=torch.float32, seed=2).requires_grad_()
    out, lse = lsh_attention(qk, v, bucket_size=2, n_hashes=3, seed=0, return_lse=True, backend="torch")
    torch.testing.assert_close(out[0, 0], v.detach()[0, 0].flip(0), rtol=1e-6, atol=1e-6)
    expected_lse = -x.norm().item() * magnitude / math.sqrt(8) + math.log(3)  # 3 rounds, not de-duplicated
    torch.testing.assert_close(lse, torch.full_like(lse, expected_lse), rtol=1e-5, atol=1e-4)
    dqk, dv = torch.autograd.grad(out.sum(), (qk, v))
    assert torch.isfinite(dqk).all()
    torch.testing.assert_close(dv, torch.ones_like(dv), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("causal_mode", ["bucket", "chunk"])
def test_self_only_rows_output_their_value_with_constant_lse_and_no_lse_gradient(causal_mode):
    qk = rand(1, 2, 9, 4, seed=1).requires_grad_()
    v = rand(1, 2, 9, 4, seed=2).requires_grad_()
    out, lse = lsh_attention(qk, v, bucket_size=3, n_hashes=2, causal=True, causal_mode=causal_mode, seed=0,
                             return_lse=True)
    assert torch.equal(out[:, :, 0], v.detach()[:, :, 0])  # position 0 has no earlier key: its own value
    assert torch.all(lse[:, :, 0] == SELF_ONLY_LSE)
    dqk, dv = torch.autograd.grad(lse[:, :, 0].sum(), (qk, v), retain_graph=True)
    assert torch.all(dqk == 0) and torch.all(dv == 0)
    dqk, dv = torch.autograd.grad(out[:, :, 0].sum(), (qk, v))
    assert torch.all(dqk == 0)
    expected = torch.zeros_like(dv)
    expected[:, :, 0] = 1.0
    assert torch.equal(dv, expected)


def poisoned(x, mask, value):
    """``x (B, H, N, D)`` with ``value`` at padded positions (mask ``(B, N)``)."""
    return x.masked_fill(mask[:, None, :, None], value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), "huge"])
@pytest.mark.parametrize("causal,causal_mode", [(False, "bucket"), (True, "bucket"), (True, "chunk")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lsh_nonfinite_values_at_padded_positions_cannot_leak(value, causal, causal_mode, dtype):
    if value == "huge":
        value = torch.finfo(dtype).max
    n = 60
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, 50:] = True
    mask[1, ::7] = True
    qk0 = rand(2, 2, n, 8, dtype=torch.float32, seed=1).to(dtype)
    v0 = rand(2, 2, n, 8, dtype=torch.float32, seed=2).to(dtype)
    g = rand(2, 2, n, 8, dtype=torch.float32, seed=3).to(dtype)

    def run(qk, v):
        qk, v = qk.clone().requires_grad_(), v.clone().requires_grad_()
        out = lsh_attention(qk, v, bucket_size=8, n_hashes=3, causal=causal, causal_mode=causal_mode,
                            key_padding_mask=mask, seed=5)
        return (out, *torch.autograd.grad(out, (qk, v), g))

    clean = run(qk0, v0)
    for dirty in (run(poisoned(qk0, mask, value), v0), run(qk0, poisoned(v0, mask, value)),
                  run(poisoned(qk0, mask, value), poisoned(v0, mask, value))):
        for got, want in zip(dirty, clean):
            assert torch.isfinite(got).all()
            assert torch.equal(got, want)
    assert torch.all(clean[0].masked_select(mask[:, None, :, None]) == 0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("causal", [False, True])
def test_full_attention_nonfinite_keys_and_values_at_padded_positions_cannot_leak(value, causal):
    n = 12
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, 8:] = True
    mask[1, 3] = True
    q, k, v = (rand(2, 2, n, 4, seed=s) for s in (1, 2, 3))
    g = rand(2, 2, n, 4, seed=4)

    def run(k, v):
        qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
        out = full_attention(qq, kk, vv, causal=causal, key_padding_mask=mask, backend="torch")
        return (out, *torch.autograd.grad(out, (qq, kk, vv), g))

    clean = run(k, v)
    for dirty in (run(poisoned(k, mask, value), v), run(k, poisoned(v, mask, value))):
        for got, want in zip(dirty, clean):
            assert torch.isfinite(got).all()
            assert torch.equal(got, want)
