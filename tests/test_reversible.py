"""ReversibleSequence: the reversible backward (inputs reconstructed, activations recomputed with
the RNG replayed) gives the plain two-stream network's loss and gradients exactly, with dropout
and LSH attention; only the output is kept for backward, whatever the depth."""
import pytest
import torch
from torch import nn

from reformer import ChunkedFeedForward, FeedForward, MultiHeadAttention, ReversibleSequence
from reformer.lsh_attention import LSHSelfAttention
from reformer.model import PreNorm

D, HEADS = 8, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def lsh_blocks(depth, dropout):
    return [(PreNorm(D, LSHSelfAttention(D, HEADS, bucket_size=4, n_hashes=2, causal=True, dropout=dropout), dropout),
             PreNorm(D, ChunkedFeedForward(D, 24, 3, dropout=dropout), dropout)) for _ in range(depth)]


def full_blocks(depth, dropout):
    return [(PreNorm(D, MultiHeadAttention(D, HEADS, dropout=dropout), dropout, causal=True),
             PreNorm(D, FeedForward(D, 24, dropout=dropout), dropout)) for _ in range(depth)]


def loss_and_grads(seq, x, seed, **kwargs):
    """Loss of a fixed projection of the output, its gradients (x, then parameters), and the next RNG draw."""
    seq.zero_grad()
    x = x.detach().requires_grad_()
    torch.manual_seed(seed)
    out = seq(x, **kwargs)  # (B, N, 2D)
    loss = (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().mean()
    loss.backward()
    return loss.detach(), [x.grad] + [p.grad for p in seq.parameters()], torch.rand(3)


def assert_same_training_step(seq, x, seed=0, **kwargs):
    seq.reversible = False
    loss_ref, grads_ref, rng_ref = loss_and_grads(seq, x, seed, **kwargs)
    seq.reversible = True
    loss, grads, rng = loss_and_grads(seq, x, seed, **kwargs)
    assert torch.equal(loss, loss_ref)
    assert torch.equal(rng, rng_ref)  # the recompute left the global RNG stream alone
    scale = max(g.abs().max() for g in grads_ref if g is not None)  # some grads (key biases) are ~0
    assert scale > 0
    for g, g_ref in zip(grads, grads_ref, strict=True):
        if g_ref is None:
            assert g is None
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("with_mask", [False, True])
def test_lsh_with_dropout_matches_plain(with_mask):
    torch.manual_seed(0)
    seq = ReversibleSequence(lsh_blocks(3, dropout=0.2)).double().train()
    x = torch.randn(2, 13, D, dtype=torch.float64)
    kwargs = {}
    if with_mask:
        kwargs["key_padding_mask"] = torch.arange(13).expand(2, 13) >= torch.tensor([[13], [9]])
    assert_same_training_step(seq, x, **kwargs)


def test_full_attention_with_dropout_matches_plain():
    torch.manual_seed(0)
    seq = ReversibleSequence(full_blocks(4, dropout=0.3)).double().train()
    assert_same_training_step(seq, torch.randn(3, 10, D, dtype=torch.float64), seed=5)


def test_frozen_parameters_get_no_gradient():
    torch.manual_seed(0)
    seq = ReversibleSequence(full_blocks(2, dropout=0.1)).double().train()
    seq.blocks[0].f.requires_grad_(False)
    assert_same_training_step(seq, torch.randn(2, 6, D, dtype=torch.float64))


def test_dropout_is_really_random():
    """Guards the tests above: two forwards without reseeding differ, so a missing replay would show."""
    seq = ReversibleSequence(lsh_blocks(1, dropout=0.2)).train()
    x = torch.randn(1, 8, D)
    assert not torch.equal(seq(x), seq(x))


def saved_activation_bytes(seq, x):
    params = {p.data_ptr() for p in seq.parameters()}
    total = []

    def pack(t):
        if t.data_ptr() not in params:
            total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        seq(x.requires_grad_())
    return sum(total)


def test_saved_activations_do_not_grow_with_depth():
    torch.manual_seed(0)
    x = torch.randn(2, 32, D)
    output_bytes = 2 * x.numel() * x.element_size()  # the (B, N, 2D) output
    for depth in (1, 4):
        seq = ReversibleSequence(full_blocks(depth, dropout=0.1)).train()
        assert saved_activation_bytes(seq, x) == output_bytes
    seq.reversible = False
    assert saved_activation_bytes(seq, x) > 4 * 8 * output_bytes  # plain: many tensors per layer


def test_no_grad_and_eval_give_the_plain_output():
    torch.manual_seed(0)
    seq = ReversibleSequence(full_blocks(2, dropout=0.1)).eval()
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        out = seq(x)
    seq.reversible = False
    assert out.shape == (2, 5, 2 * D)
    torch.testing.assert_close(out, seq(x), rtol=0, atol=0)


class _Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.seen = []

    def forward(self, x, **kwargs):
        self.seen.append(sorted(kwargs))
        return self.lin(x)


def test_keyword_arguments_go_to_f_only():
    f, g = _Recorder(), nn.Linear(D, D)
    seq = ReversibleSequence([(f, g)])
    seq(torch.randn(1, 3, D), key_padding_mask=None).sum().backward()  # forward + recompute
    assert f.seen == [["key_padding_mask"], ["key_padding_mask"]]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="at least one"):
        ReversibleSequence([])
    with pytest.raises(TypeError, match="reversible must be a bool"):
        ReversibleSequence(full_blocks(1, 0.0), reversible=1)
    with pytest.raises(TypeError, match="x must be a tensor"):
        ReversibleSequence(full_blocks(1, 0.0))([1.0])


class _Scaled(nn.Module):
    """``lin(x) * ctx`` (``ctx`` optional), plus ``bias`` when given: keyword tensors that take part in the output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x, ctx=None, extra=None):
        out = self.lin(x)
        if ctx is not None:
            out = out * ctx
        if extra is not None:
            out = out + extra["bias"][0].tanh()
        return out


def _kwarg_grads(seq, x, f_kwargs, g_kwargs, leaves):
    for t in (x, *leaves):
        t.grad = None
    seq.zero_grad()
    out = seq(x, g_kwargs=g_kwargs, **f_kwargs)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).square().sum().backward()
    return [None if t.grad is None else t.grad.clone() for t in (x, *leaves)] + [p.grad.clone() for p in seq.parameters()]


def test_keyword_tensor_gradients_match_plain():
    """Keyword tensors used by f only, by g only, by both, nested in a dict, and one without grad:
    the reversible backward gives each the plain network's gradient (float64)."""
    torch.manual_seed(0)
    seq = ReversibleSequence([(_Scaled(), _Scaled()) for _ in range(3)]).double()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    f_only = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    g_only = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    both = torch.randn(1, 1, D, dtype=torch.float64, requires_grad=True)
    const = torch.randn(2, 5, D, dtype=torch.float64)  # requires no grad
    leaves = [f_only, g_only, both]
    cases = [lambda: ({"ctx": f_only, "extra": {"bias": [both]}},
                      {"ctx": g_only * 1.0, "extra": {"bias": (both,)}}),  # g_only * 1.0: a non-leaf too
             lambda: ({"ctx": const}, {"ctx": both})]
    for kwargs in cases:
        seq.reversible = False
        ref = _kwarg_grads(seq, x, *kwargs(), leaves)
        seq.reversible = True
        got = _kwarg_grads(seq, x, *kwargs(), leaves)
        assert any(g is not None and g.abs().sum() > 0 for g in ref[1:4])
        for g, g_ref in zip(got, ref, strict=True):
            if g_ref is None:
                assert g is None
            else:
                torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    assert const.grad is None


def test_keyword_tensor_gradient_as_in_the_bug_report():
    class F(nn.Module):
        def __init__(s):
            super().__init__()
            s.l = nn.Linear(4, 4)

        def forward(s, x, ctx=None):
            return s.l(x) * ctx

    torch.manual_seed(0)
    seq = ReversibleSequence([(F(), nn.Linear(4, 4))]).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    ctx = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    grads = []
    for reversible in (False, True):
        seq.reversible = reversible
        ctx.grad = None
        seq(x, ctx=ctx).sum().backward()
        grads.append(ctx.grad)
    assert grads[1] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_keyword_tensor_gradcheck():
    torch.manual_seed(0)
    seq = ReversibleSequence([(_Scaled(), _Scaled()) for _ in range(2)]).double()
    x = torch.randn(1, 3, D, dtype=torch.float64, requires_grad=True)
    ctx = torch.randn(1, 3, D, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, c: seq(x, ctx=c, g_kwargs={"ctx": c}), (x, ctx))


def test_dtype_mismatch_names_the_input():
    seq = ReversibleSequence(full_blocks(1, 0.0))
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the blocks' parameters are torch.float32"):
        seq(torch.randn(1, 3, D, dtype=torch.float64))
    with pytest.raises(TypeError, match="g_kwargs must be a dict"):
        seq(torch.randn(1, 3, D), g_kwargs=[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: no error
        assert seq(torch.randn(1, 3, D, dtype=torch.bfloat16)).shape == (1, 3, 2 * D)
