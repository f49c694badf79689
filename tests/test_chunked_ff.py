"""ChunkedFeedForward: same outputs, gradients and state_dict as FeedForward; dropout replays
exactly in the backward recompute; the (positions, d_ff) hidden tensor never exists whole.
chunked_cross_entropy: same loss and gradients as the whole logits, which never exist whole."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from reformer import ChunkedFeedForward, FeedForward
from reformer.chunked_loss import chunked_cross_entropy


def grads(module, x, out):
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return torch.autograd.grad((out * weights).sum(), (x, *module.parameters()))


@pytest.mark.parametrize("shape, chunks, activation", [
    ((2, 37, 12), 5, "relu"),  # chunks do not divide B*N
    ((3, 8, 12), 1, "gelu"),
    ((1, 3, 12), 8, "relu"),  # more chunks than positions
    ((4, 12), 3, "gelu"),  # any leading shape
])
def test_matches_feedforward(shape, chunks, activation):
    torch.manual_seed(0)
    ref = FeedForward(12, 40, activation=activation).double()
    chunked = ChunkedFeedForward(12, 40, chunks, activation=activation).double()
    chunked.load_state_dict(ref.state_dict())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    out_ref, out = ref(x), chunked(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(grads(chunked, x, out), grads(ref, x, out_ref)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_state_dict_moves_both_ways():
    ref, chunked = FeedForward(8, 16), ChunkedFeedForward(8, 16, 4)
    assert ref.state_dict().keys() == chunked.state_dict().keys()
    ref.load_state_dict(chunked.state_dict())
    chunked.load_state_dict(FeedForward(8, 16).state_dict())


def test_dropout_replays_exactly_in_backward():
    """With the global RNG reseeded before every call the layer is a deterministic function of x
    and the weights; gradcheck then fails unless backward recomputes with the forward's masks."""
    torch.manual_seed(0)
    module = ChunkedFeedForward(4, 12, 3, dropout=0.4).double().train()
    names = [name for name, _ in module.named_parameters()]
    x = torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True)

    def layer(x, *weights):
        torch.manual_seed(7)
        return torch.func.functional_call(module, dict(zip(names, weights)), (x,))

    assert torch.autograd.gradcheck(layer, (x, *module.parameters()))
    with torch.no_grad():
        assert not torch.allclose(layer(x, *module.parameters()), module.eval()(x))  # dropout really acted


def test_backward_leaves_the_global_rng_alone():
    module = ChunkedFeedForward(4, 12, 3, dropout=0.4).train()
    x = torch.randn(2, 5, 4, requires_grad=True)
    draws = []
    for backward in (False, True):
        torch.manual_seed(1)
        out = module(x)
        if backward:
            out.sum().backward()
        draws.append(torch.rand(4))
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


class _HiddenSizes(TorchDispatchMode):
    """Records the row count of every tensor an op returns whose last dim is ``d_ff``."""

    def __init__(self, d_ff):
        super().__init__()
        self.d_ff, self.rows = d_ff, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[-1] == self.d_ff:
                self.rows.append(t.shape[0])
        return out


@pytest.mark.parametrize("cls_args, bound", [((FeedForward, ()), 64), ((ChunkedFeedForward, (8,)), 8)])
def test_hidden_never_exists_whole(cls_args, bound):
    """Forward and backward: no (rows, d_ff) tensor with more than B*N/chunks rows (FeedForward: all 64)."""
    cls, extra = cls_args
    module = cls(6, 48, *extra, dropout=0.2).train()
    x = torch.randn(4, 16, 6, requires_grad=True)
    with _HiddenSizes(48) as fwd:
        out = module(x)
    with _HiddenSizes(48) as bwd:
        out.sum().backward()
    assert fwd.rows and bwd.rows  # the probe saw the hidden activations and their gradients
    assert max(fwd.rows) == bound and max(bwd.rows) == bound


def test_saves_only_its_input():
    module = ChunkedFeedForward(6, 48, 4, dropout=0.2).train()
    x = torch.randn(2, 16, 6, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        module(x)
    parameters = {p.shape for p in module.parameters()}
    activations = [s for s in saved if s not in parameters]
    assert sum(math.prod(s) for s in activations) <= x.numel()


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="chunks"):
        ChunkedFeedForward(8, 16, 0)
    with pytest.raises(ValueError, match="activation"):
        ChunkedFeedForward(8, 16, 2, activation="tanh")
    with pytest.raises(ValueError, match="d_model=8"):
        ChunkedFeedForward(8, 16, 2)(torch.zeros(2, 3, 5))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_autocast_bf16_matches_feedforward(activation):
    """Under CPU bf16 autocast the chunked layer computes in bf16 like FeedForward's nn.Linear and
    sends float32 gradients to its float32 parameters."""
    torch.manual_seed(0)
    ref = FeedForward(16, 32, activation=activation)
    chunked = ChunkedFeedForward(16, 32, 3, activation=activation)
    chunked.load_state_dict(ref.state_dict())
    x = torch.randn(2, 10, 16, requires_grad=True)
    results = []
    for module in (ref, chunked):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        results.append((out, grads(module, x, out)))
    (out_ref, grads_ref), (out, grads_chunked) = results
    assert out.dtype == out_ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)
    for g, g_ref, p in zip(grads_chunked, grads_ref, (x, *chunked.parameters())):
        assert g.dtype == p.dtype == torch.float32
        torch.testing.assert_close(g, g_ref, rtol=5e-2, atol=5e-2 * g_ref.abs().max().item())


def test_bf16_parameter_gradients_as_accurate_as_feedforward():
    """bf16 weights and input: gradient error against the float64 computation with the same
    (bf16-valued) numbers stays within 2x FeedForward's; summing 64 chunk products in bf16 does not."""
    torch.manual_seed(0)
    base = FeedForward(32, 128, activation="gelu").bfloat16()
    x, weights = torch.randn(2, 8, 64, 32).bfloat16().unbind(0)

    def parameter_grads(module, dtype):
        module.load_state_dict(base.state_dict())
        module.to(dtype)
        out = module(x.to(dtype))
        return [g.double() for g in torch.autograd.grad((out * weights.to(dtype)).sum(), module.parameters())]

    exact = parameter_grads(FeedForward(32, 128, activation="gelu"), torch.float64)
    plain = parameter_grads(FeedForward(32, 128, activation="gelu"), torch.bfloat16)
    chunked = parameter_grads(ChunkedFeedForward(32, 128, 64, activation="gelu"), torch.bfloat16)
    for g_plain, g_chunked, g_exact in zip(plain, chunked, exact):
        error = lambda g: ((g - g_exact).norm() / g_exact.norm()).item()
        assert 0 < error(g_chunked) <= 2 * error(g_plain)


@pytest.mark.parametrize("cls, extra", [(FeedForward, ()), (ChunkedFeedForward, (2,))])
@pytest.mark.parametrize("x, error, message", [
    (torch.zeros(2, 3, 8, dtype=torch.long), TypeError, "x must be floating point"),
    (torch.zeros(2, 3, 8, dtype=torch.float64), TypeError,
     r"x has dtype torch.float64 but the module's parameters are torch.float32"),
    (torch.zeros(2, 3, 5), ValueError, r"x must have shape \(\.\.\., d_model=8\)"),
    (torch.zeros(()), ValueError, r"x must have shape \(\.\.\., d_model=8\)"),
    ([[0.0] * 8], TypeError, "x must be a torch.Tensor"),
])
def test_bad_input_raises_naming_x(cls, extra, x, error, message):
    with pytest.raises(error, match=message):
        cls(8, 16, *extra)(x)


@pytest.mark.parametrize("rows, chunks, with_bias", [(37, 5, True), (6, 9, False), (20, 1, True)])
def test_chunked_cross_entropy_matches_whole_logits(rows, chunks, with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(rows, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(50, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 50, (rows,))
    inputs = [t for t in (hidden, weight, bias) if t is not None]
    loss = chunked_cross_entropy(hidden, weight, bias, targets, chunks)
    expected = F.cross_entropy(F.linear(hidden, weight, bias), targets)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(torch.autograd.grad(3 * loss, inputs), torch.autograd.grad(3 * expected, inputs)):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_chunked_cross_entropy_never_holds_all_logits():
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    targets = torch.randint(0, 40, (64,))
    with _HiddenSizes(40) as fwd:
        loss = chunked_cross_entropy(hidden, weight, None, targets, 8)
    with _HiddenSizes(40) as bwd:
        loss.backward()
    assert fwd.rows and bwd.rows and max(fwd.rows) == 8 and max(bwd.rows) == 8


def test_chunked_cross_entropy_bad_arguments_raise():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="agree on D"):
        chunked_cross_entropy(hidden, torch.randn(10, 7), None, targets, 2)
    with pytest.raises(ValueError, match="targets must have shape"):
        chunked_cross_entropy(hidden, weight, None, targets[:3], 2)
    with pytest.raises(ValueError, match="bias must have shape"):
        chunked_cross_entropy(hidden, weight, torch.zeros(9), targets, 2)
    with pytest.raises(ValueError, match="chunks"):
        chunked_cross_entropy(hidden, weight, None, targets, 0)
    with pytest.raises(TypeError, match="targets must hold integer class ids"):
        chunked_cross_entropy(hidden, weight, None, torch.tensor([0.0, 1.5, 2.0, 9.9]), 2)  # no silent truncation
    with pytest.raises(TypeError, match="targets must hold integer class ids"):
        chunked_cross_entropy(hidden, weight, None, torch.ones(4, dtype=torch.bool), 2)
    with pytest.raises(TypeError, match="targets must be a tensor"):
        chunked_cross_entropy(hidden, weight, None, [0, 1, 2, 3], 2)
    for bad in (torch.tensor([0, 1, 10, 2]), torch.tensor([0, -100, 1, 2]), torch.tensor([0, -1, 1, 2])):
        with pytest.raises(ValueError, match=r"targets ids must be in \[0, 10\)"):
            chunked_cross_entropy(hidden, weight, None, bad, 2)


def test_float64_input_under_half_autocast_raises():
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="which torch.autocast does not cast"):
        ChunkedFeedForward(8, 16, 2)(torch.zeros(2, 3, 8, dtype=torch.float64))


def test_bad_argument_types_raise_type_error():
    with pytest.raises(TypeError, match="chunks must be a positive int, got 2.0"):
        ChunkedFeedForward(8, 16, 2.0)
    with pytest.raises(TypeError, match="dropout must be a number"):
        ChunkedFeedForward(8, 16, 2, dropout="0.1")
