"""Reversible residual layers (RevNet coupling, Gomez et al. 2017), as used by the Reformer.

Each block maps two streams ``(x1, x2)`` to

    y1 = x1 + f(x2)        y2 = x2 + g(y1)

and is inverted exactly by ``x2 = y2 - g(y1)``, ``x1 = y1 - f(x2)``. In reversible mode a
custom ``torch.autograd.Function`` keeps only the final outputs; backward walks the blocks in
reverse, reconstructing each block's inputs from its outputs and back-propagating through one
block at a time, so activation memory does not grow with depth. Dropout and LSH hashing in
``f`` and ``g`` replay exactly: the RNG state is captured before each sub-layer and restored for
its recompute (the global seed is never reset), and the recompute runs under the forward's
``torch.autocast`` state, so mixed-precision training reconstructs the same activations.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ._rng import RngState


class ReversibleBlock(nn.Module):
    """One coupling ``(x1, x2) -> (x1 + f(x2), x2 + g(x1 + f(x2)))``.

    ``f`` and ``g`` map ``(B, N, d)`` to ``(B, N, d)``; keyword arguments of ``forward`` (for
    example ``key_padding_mask``) go to ``f`` only.
    """

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x1: Tensor, x2: Tensor, **f_kwargs: Any) -> tuple[Tensor, Tensor]:
        y1 = x1 + self.f(x2, **f_kwargs)
        return y1, x2 + self.g(y1)

    def forward_recording(self, x1: Tensor, x2: Tensor,
                          f_kwargs: dict) -> tuple[Tensor, Tensor, tuple[RngState, RngState]]:
        """``forward`` that also returns the RNG states seen by ``f`` and ``g``."""
        f_state = RngState.capture()
        y1 = x1 + self.f(x2, **f_kwargs)
        g_state = RngState.capture()
        return y1, x2 + self.g(y1), (f_state, g_state)

    def trainable(self) -> tuple[Tensor, ...]:
        """The parameters that need gradients, ``f``'s then ``g``'s."""
        return _trainable(self.f) + _trainable(self.g)

    def backward_pass(self, y1: Tensor, y2: Tensor, dy1: Tensor, dy2: Tensor, f_kwargs: dict,
                      states: tuple[RngState, RngState],
                      autocast: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, list]:
        """From outputs and their gradients, return ``(x1, x2, dx1, dx2, parameter grads)``.

        ``f`` and ``g`` are recomputed under ``torch.autocast(**autocast)`` (the forward's
        autocast state), so they reproduce the forward's outputs; their backward runs outside it.
        """
        f_state, g_state = states
        f_params, g_params = _trainable(self.f), _trainable(self.g)
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            with g_state.replay(), torch.autocast(**autocast):
                gy1 = self.g(y1)
            dy1_g, *g_grads = torch.autograd.grad(gy1, (y1, *g_params), dy2, allow_unused=True)
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + dy1_g  # y1 feeds y2 through g and is x1's direct image
        del gy1
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_()
            with f_state.replay(), torch.autocast(**autocast):
                fx2 = self.f(x2, **f_kwargs)
            dx2_f, *f_grads = torch.autograd.grad(fx2, (x2, *f_params), dx1, allow_unused=True)
        with torch.no_grad():
            x1 = y1 - fx2
            dx2 = dy2 + dx2_f
        return x1.detach(), x2.detach(), dx1, dx2, f_grads + g_grads


def _trainable(module: nn.Module) -> tuple[Tensor, ...]:
    return tuple(p for p in module.parameters() if p.requires_grad)


def _autocast_state(device: str) -> dict[str, Any]:
    """``torch.autocast`` keyword arguments reproducing the current autocast state on ``device``."""
    return {"device_type": device, "enabled": torch.is_autocast_enabled(device),
            "dtype": torch.get_autocast_dtype(device)}


class _ReversibleFn(torch.autograd.Function):
    """Runs the blocks without building a graph; saves only the concatenated final output."""

    @staticmethod
    def forward(ctx, x: Tensor, blocks: nn.ModuleList, f_kwargs: dict, *params: Tensor) -> Tensor:
        x1 = x2 = x
        states = []
        for block in blocks:
            x1, x2, block_states = block.forward_recording(x1, x2, f_kwargs)
            states.append(block_states)
        out = torch.cat([x1, x2], dim=-1)  # (..., 2d)
        ctx.save_for_backward(out)
        ctx.blocks, ctx.f_kwargs, ctx.states = blocks, f_kwargs, states
        ctx.autocast = _autocast_state(x.device.type)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (out,) = ctx.saved_tensors
        y1, y2 = out.chunk(2, dim=-1)
        dy1, dy2 = grad_out.chunk(2, dim=-1)
        grads = []
        for block, states in zip(reversed(ctx.blocks), reversed(ctx.states)):
            y1, y2, dy1, dy2, block_grads = block.backward_pass(y1, y2, dy1, dy2, ctx.f_kwargs, states,
                                                                ctx.autocast)
            grads.append(block_grads)
        param_grads = [g for block_grads in reversed(grads) for g in block_grads]
        return (dy1 + dy2, None, None, *param_grads)  # x fed both streams


class ReversibleSequence(nn.Module):
    """A stack of reversible couplings over two streams, trax-style.

    ``forward(x)`` duplicates ``x`` of shape ``(..., d)`` into both streams, applies the blocks
    and returns the concatenation ``[y1, y2]`` of shape ``(..., 2 * d)`` (as trax's and the
    Reformer paper's ReformerLM: ``Dup -> ReversibleSerial -> Concatenate``).

    Args:
        blocks: pairs ``(f, g)`` of modules mapping ``(B, N, d) -> (B, N, d)``, one per layer.
        reversible: True recomputes activations in backward (memory independent of depth);
            False runs the same two-stream network with ordinary autograd (memory linear in
            depth). Both have the same ``state_dict`` keys and the same outputs and gradients.
    """

    def __init__(self, blocks: Iterable[tuple[nn.Module, nn.Module]], reversible: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(ReversibleBlock(f, g) for f, g in blocks)
        if not self.blocks:
            raise ValueError("blocks must hold at least one (f, g) pair")
        if not isinstance(reversible, bool):
            raise TypeError(f"reversible must be a bool, got {reversible!r}")
        self.reversible = reversible

    def forward(self, x: Tensor, **f_kwargs: Any) -> Tensor:
        """x: ``(B, N, d)`` -> ``(B, N, 2 * d)``; ``f_kwargs`` (e.g. ``key_padding_mask``) go to every ``f``."""
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a tensor of shape (B, N, d), got {type(x).__name__}")
        if self.reversible and torch.is_grad_enabled():
            params = [p for block in self.blocks for p in block.trainable()]
            return _ReversibleFn.apply(x, self.blocks, f_kwargs, *params)
        x1 = x2 = x
        for block in self.blocks:
            x1, x2 = block(x1, x2, **f_kwargs)
        return torch.cat([x1, x2], dim=-1)

    def extra_repr(self) -> str:
        return f"reversible={self.reversible}"
