"""Position-wise feed-forward network FFN(x) = W2 act(W1 x + b1) + b2, whole or in chunks."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._rng import RngState
from ._validation import check_dropout, check_feature_dim, check_param_dtype, check_positive

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class FeedForward(nn.Module):
    """Applied to each position independently: ``(..., d_model) -> (..., d_model)``.

    Dropout acts on the hidden activations (as in ``nn.TransformerEncoderLayer``).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.d_ff = check_positive("d_ff", d_ff)
        self.activation_name = activation
        self.activation = get_activation(activation)
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(check_dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        """x: floating ``(..., d_model)`` of the parameters' dtype (any under autocast) -> ``(..., d_model)``."""
        check_feature_dim("x", x, self.d_model)
        check_param_dtype("x", x, self.w1.weight)
        return self.w2(self.dropout(self.activation(self.w1(x))))


def _chunk_hidden(x: Tensor, w1: Tensor, b1: Tensor, activation: str,
                  p: float) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``dropout(act(x W1^T + b1))`` for one chunk ``x`` ``(m, d_model)``, in place where possible.

    Returns the hidden activation ``(m, d_ff)``, the pre-activation when the activation's
    derivative needs it (gelu; None for relu, which is applied in place) and the bool keep-mask
    (None without dropout; drawn with ``bernoulli_``, so it replays from the RNG state).
    """
    pre = F.linear(x, w1, b1)  # (m, d_ff)
    if activation == "relu":
        hidden, pre = pre.relu_(), None
    else:
        hidden = get_activation(activation)(pre)
    keep = None
    if p > 0:
        keep = torch.empty_like(hidden, dtype=torch.bool).bernoulli_(1 - p)
        hidden.mul_(keep).div_(1 - p)
    return hidden, pre, keep


def _chunk_backward(x: Tensor, grad_out: Tensor, grad_x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                    grads: list[Tensor], activation: str, p: float) -> None:
    """Recomputes one chunk and back-propagates ``grad_out`` ``(m, d_model)`` through it: writes
    ``grad_x`` and adds to the accumulators ``grads = [dW1, db1, dW2, db2]`` (float32 for half
    inputs: each chunk's product is rounded once, the running sums are not). At most two
    ``(m, d_ff)`` tensors (three for gelu) are alive at once."""
    hidden, pre, keep = _chunk_hidden(x, w1, b1, activation, p)
    _accumulate(grads[2], grad_out.t(), hidden)
    grads[3].add_(grad_out.sum(0, dtype=grads[3].dtype))
    grad_h = grad_out @ w2  # (m, d_ff)
    if keep is not None:
        grad_h.mul_(keep).div_(1 - p)
    if activation == "relu":
        grad_h.masked_fill_(hidden <= 0, 0.0)  # dropped positions already have zero gradient
    else:
        grad_h = torch.ops.aten.gelu_backward(grad_h, pre)
    del hidden, pre, keep
    _accumulate(grads[0], grad_h.t(), x)
    grads[1].add_(grad_h.sum(0, dtype=grads[1].dtype))
    torch.mm(grad_h, w1, out=grad_x)


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``; ``acc`` may be wider than ``a`` and ``b`` (float32 sums of half products)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(a @ b)


class _ChunkedFeedForwardFn(torch.autograd.Function):
    """FFN over row chunks of a ``(M, d_model)`` input; saves only the input and the weights.

    Backward recomputes one chunk at a time (replaying the RNG state, so the dropout masks are
    the same) and back-propagates it by hand before the next chunk. The loop over chunks is
    sequential by design: that is what bounds the memory.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, activation: str, p: float,
                chunks: int, rng: Optional[RngState]) -> Tensor:
        out = x.new_empty(x.shape[0], w2.shape[0])  # (M, d_model)
        for xc, oc in zip(x.tensor_split(chunks), out.tensor_split(chunks)):
            torch.addmm(b2, _chunk_hidden(xc, w1, b1, activation, p)[0], w2.t(), out=oc)
        ctx.save_for_backward(x, w1, b1, w2, b2)
        ctx.activation, ctx.p, ctx.chunks, ctx.rng = activation, p, chunks, rng
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, w1, b1, w2, b2 = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        acc_dtype = torch.promote_types(x.dtype, torch.float32)  # float32 sums for half inputs
        grads = [torch.zeros_like(t, dtype=acc_dtype) for t in (w1, b1, w2, b2)]
        pieces = zip(x.tensor_split(ctx.chunks), grad_out.tensor_split(ctx.chunks), grad_x.tensor_split(ctx.chunks))
        with ctx.rng.replay() if ctx.rng is not None else nullcontext():
            for xc, gc, gxc in pieces:
                _chunk_backward(xc, gc, gxc, w1, b1, w2, grads, ctx.activation, ctx.p)
        grads = [g.to(t.dtype) for g, t in zip(grads, (w1, b1, w2, b2))]
        return (grad_x, *grads, None, None, None, None)


def _autocast_inputs(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors as autocast would hand them to ``F.linear``: under autocast for the first
    tensor's device, float32/16 tensors are cast (differentiably) to the autocast dtype and
    float64 ones are left alone; outside autocast they are returned unchanged."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t.dtype == torch.float64 else t.to(dtype) for t in tensors)


class ChunkedFeedForward(FeedForward):
    """``FeedForward`` applied to ``chunks`` slices of the positions one after another.

    The ``(positions, d_ff)`` hidden activation never exists whole, in forward or backward:
    forward keeps only the input, and backward recomputes each chunk's hidden activation and
    back-propagates it (by hand, in place where possible) before moving on. Peak extra memory
    for the hidden activations is about ``1/chunks`` of ``FeedForward``'s, at the price of one
    more forward pass in backward.

    Same parameters and ``state_dict`` keys as ``FeedForward`` (``w1``, ``w2``), so weights move
    between the two, and, without dropout, the same outputs and gradients. Dropout draws a bool
    keep-mask per chunk with ``bernoulli_`` (masks differ from ``FeedForward``'s, same
    distribution); the RNG state is saved in forward and restored for the recompute, so
    backward uses exactly the forward's masks. Not twice differentiable. Under ``torch.autocast``
    it computes in the autocast dtype, like ``FeedForward``'s ``nn.Linear`` layers.

    Args:
        d_model, d_ff, activation, dropout: as for ``FeedForward``.
        chunks: number of slices the flattened positions ``(B * N)`` are cut into (>= 1; fewer
            are used when there are fewer positions).
    """

    def __init__(self, d_model: int, d_ff: int, chunks: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__(d_model, d_ff, activation=activation, dropout=dropout)
        self.chunks = check_positive("chunks", chunks)

    def forward(self, x: Tensor) -> Tensor:
        """x: floating ``(..., d_model)`` of the parameters' dtype (any under autocast) -> ``(..., d_model)``."""
        check_feature_dim("x", x, self.d_model)
        check_param_dtype("x", x, self.w1.weight)
        p = self.dropout.p if self.training else 0.0
        rng = RngState.capture() if p > 0 else None
        tensors = _autocast_inputs(x.reshape(-1, self.d_model), self.w1.weight, self.w1.bias, self.w2.weight,
                                   self.w2.bias)
        if tensors[0].dtype != tensors[1].dtype:  # float64 input under a half-precision autocast
            raise TypeError(f"x has dtype {x.dtype}, which torch.autocast does not cast, but the parameters compute "
                            f"in {tensors[1].dtype}: convert x or run outside autocast")
        with torch.autocast(x.device.type, enabled=False):
            out = _ChunkedFeedForwardFn.apply(*tensors, self.activation_name, p, self.chunks, rng)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}"
