"""The full-attention reference: masks, fully masked rows, gradcheck, input errors."""
import math

import pytest
import torch

from reformer.kernels import full_attention


def _qkv(b=2, h=3, nq=5, nk=6, d=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (nq, nk, nk)]


def _naive(q, k, v, allowed):
    """Loop-free textbook softmax attention with an explicit (B, H, Nq, Nk) allowed mask."""
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.softmax(s, -1) @ v


def test_matches_sdpa_without_masks():
    q, k, v = _qkv(dtype=torch.float32)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(full_attention(q, k, v), ref, atol=1e-6, rtol=1e-5)


def test_causal_and_padding_match_naive():
    q, k, v = _qkv(nq=6, nk=6)
    kpm = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] & ~kpm[:, None, None, :]
    out = full_attention(q, k, v, causal=True, key_padding_mask=kpm)
    torch.testing.assert_close(out, _naive(q, k, v, allowed))


def test_bool_and_float_attn_masks_agree():
    q, k, v = _qkv()
    bool_mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) < 0.3
    bool_mask[:, 0] = False  # every row keeps a key
    float_mask = torch.zeros(5, 6, dtype=torch.float64).masked_fill(bool_mask, float("-inf"))
    a = full_attention(q, k, v, attn_mask=bool_mask)
    b = full_attention(q, k, v, attn_mask=float_mask)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, _naive(q, k, v, ~bool_mask[None, None]))


def test_fully_masked_rows_are_zero_with_finite_grad():
    q, k, v = (t.requires_grad_() for t in _qkv(nq=4, nk=4))
    kpm = torch.tensor([[True] * 4, [False, True, True, True]])
    out = full_attention(q, k, v, key_padding_mask=kpm)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert not torch.isnan(out).any()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))


def test_gradcheck_with_masks():
    q, k, v = (t.requires_grad_() for t in _qkv(b=2, h=2, nq=5, nk=5, d=3))
    kpm = torch.tensor([[False] * 3 + [True] * 2, [False] * 5])
    fn = lambda q, k, v: full_attention(q, k, v, causal=True, key_padding_mask=kpm)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))
    am = torch.zeros(5, 5, dtype=torch.float64)
    am[1, 2] = -2.0
    fn2 = lambda q, k, v: full_attention(q, k, v, attn_mask=am)  # noqa: E731
    assert torch.autograd.gradcheck(fn2, (q, k, v))


def test_low_precision_computes_in_float32():
    """Half inputs: the error against float64 is that of rounding the inputs and output only,
    i.e. close to float32 compute on the rounded inputs, and well below computing in half."""
    q, k, v = _qkv(b=2, h=4, nq=64, nk=64, d=32, seed=3)
    q, k = q * 3, k * 3  # peaked softmax: rounding the logits to half precision shows
    for dt in (torch.float16, torch.bfloat16):
        qh, kh, vh = (t.to(dt) for t in (q, k, v))
        exact = full_attention(qh.double(), kh.double(), vh.double())
        out = full_attention(qh, kh, vh)
        assert out.dtype == dt
        err = (out.double() - exact).abs().max().item()
        f32 = full_attention(qh.float(), kh.float(), vh.float()).to(dt).double()
        s = (qh @ kh.transpose(-1, -2)) / math.sqrt(32)  # all in half precision
        in_half = (torch.softmax(s.float(), -1).to(dt) @ vh).double()
        err_f32, err_half = (f32 - exact).abs().max().item(), (in_half - exact).abs().max().item()
        assert err <= 1.01 * err_f32 + 1e-12, (dt, err, err_f32)
        assert err < 0.5 * err_half, (dt, err, err_half)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(q=torch.randn(2, 5, 4)), ValueError, "q must have shape"),
        (dict(k=torch.randn(2, 2, 6, 5)), ValueError, "same head dim"),
        (dict(v=torch.randn(2, 2, 7, 4)), ValueError, "same length Nk"),
        (dict(k=torch.randn(2, 3, 6, 4)), ValueError, r"agree on \(B, H\)"),
        (dict(v=torch.randn(2, 2, 6, 4, dtype=torch.float64)), TypeError, "one dtype"),
        (dict(q=torch.ones(2, 2, 5, 4, dtype=torch.long)), TypeError, "floating-point"),
        (dict(key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (dict(key_padding_mask=torch.zeros(2, 6)), TypeError, "key_padding_mask must have dtype torch.bool"),
        (dict(attn_mask=torch.zeros(6, 5, dtype=torch.bool)), ValueError, "attn_mask must have shape"),
        (dict(attn_mask=torch.zeros(5, 6, dtype=torch.long)), TypeError, "attn_mask must be bool"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(dropout_p=1.5), ValueError, "dropout_p"),
    ],
)
def test_bad_inputs_raise(kwargs, exc, match):
    args = dict(q=torch.randn(2, 2, 5, 4), k=torch.randn(2, 2, 6, 4), v=torch.randn(2, 2, 6, 4))
    args.update(kwargs)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        full_attention(q, k, v, **args)
