"""Position-wise feed-forward network FFN(x) = W2 act(W1 x + b1) + b2, whole or in chunks."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rng import RngState
from ._validation import check_dropout, check_positive

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
        self.activation = get_activation(activation)
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(check_dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.activation(self.w1(x))))


class _ChunkedFeedForwardFn(torch.autograd.Function):
    """Applies ``fn`` to row chunks of a ``(M, d_model)`` input and saves only that input.

    Backward recomputes one chunk at a time (replaying the RNG state for dropout) and
    back-propagates it before the next, so at most one chunk's ``(M / chunks, d_ff)`` hidden
    activation, and its gradient, exists at any moment. The loop over chunks is sequential by
    design: that is what bounds the memory.
    """

    @staticmethod
    def forward(ctx, x: Tensor, fn: Callable[[Tensor], Tensor], chunks: int, rng: Optional[RngState],
                *params: Tensor) -> Tensor:
        out = torch.empty_like(x)  # (M, d_model)
        for xc, oc in zip(x.tensor_split(chunks), out.tensor_split(chunks)):
            oc.copy_(fn(xc))
        ctx.save_for_backward(x)
        ctx.fn, ctx.chunks, ctx.rng, ctx.params = fn, chunks, rng, params
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        grad_x = torch.empty_like(x)
        grad_params: list[Tensor] = []
        chunks = zip(x.tensor_split(ctx.chunks), grad_out.tensor_split(ctx.chunks), grad_x.tensor_split(ctx.chunks))
        with ctx.rng.replay() if ctx.rng is not None else nullcontext(), torch.enable_grad():
            for xc, gc, gxc in chunks:
                xc = xc.detach().requires_grad_()
                gx, *gp = torch.autograd.grad(ctx.fn(xc), (xc, *ctx.params), gc)
                gxc.copy_(gx)
                grad_params = gp if not grad_params else [acc.add_(g) for acc, g in zip(grad_params, gp)]
        return (grad_x, None, None, None, *grad_params)


class ChunkedFeedForward(FeedForward):
    """``FeedForward`` applied to ``chunks`` slices of the positions one after another.

    The ``(positions, d_ff)`` hidden activation never exists whole, in forward or backward:
    forward keeps only the input, and backward recomputes each chunk's hidden activation
    (dropout replays exactly: the RNG state is saved, then restored for the recompute) and
    back-propagates it before moving on. Peak extra memory is about ``1/chunks`` of
    ``FeedForward``'s, at the price of one more forward pass in backward.

    Same parameters and ``state_dict`` keys as ``FeedForward`` (``w1``, ``w2``), so weights move
    between the two, and, with dropout off, the same outputs and gradients.

    Args:
        d_model, d_ff, activation, dropout: as for ``FeedForward``.
        chunks: number of slices the flattened positions ``(B * N)`` are cut into (>= 1; fewer
            are used when there are fewer positions).
    """

    def __init__(self, d_model: int, d_ff: int, chunks: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__(d_model, d_ff, activation=activation, dropout=dropout)
        self.chunks = check_positive("chunks", chunks)

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(..., d_model)`` -> ``(..., d_model)``."""
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be a tensor of shape (..., d_model={self.d_model}), got {_shape(x)}")
        flat = x.reshape(-1, self.d_model)  # (M, d_model), M = B * N
        params = tuple(p for p in self.parameters() if p.requires_grad)
        rng = RngState.capture() if self.training and self.dropout.p > 0 else None
        out = _ChunkedFeedForwardFn.apply(flat, super().forward, self.chunks, rng, *params)
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return f"chunks={self.chunks}"


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
