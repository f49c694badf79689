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

Keyword arguments (``f_kwargs`` for every ``f``, ``g_kwargs`` for every ``g``) may hold tensors,
also inside lists, tuples and dicts. Every such tensor is an input of the autograd function, so
a tensor that requires grad (a context, a learned mask, ...) receives exactly the gradient of the
non-reversible network, summed over all the sub-layers that use it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor, nn

from ._rng import RngState


def _map_tensors(obj: Any, fn: Callable[[Tensor], Any]) -> Any:
    """``obj`` with every tensor inside (nested lists, tuples, dicts) replaced by ``fn(tensor)``."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    if isinstance(obj, tuple):  # namedtuple
        return type(obj)(*(_map_tensors(v, fn) for v in obj))
    return obj


def _tensors(*objs: Any) -> list[Tensor]:
    """The distinct tensors (by identity) inside ``objs``, in order of first appearance."""
    found: dict[int, Tensor] = {}

    def visit(t: Tensor) -> Tensor:
        found.setdefault(id(t), t)
        return t

    for obj in objs:
        _map_tensors(obj, visit)
    return list(found.values())


class ReversibleBlock(nn.Module):
    """One coupling ``(x1, x2) -> (x1 + f(x2, **f_kwargs), x2 + g(x1 + f(x2), **g_kwargs))``.

    ``f`` and ``g`` map ``(B, N, d)`` to ``(B, N, d)``; keyword arguments of ``forward`` (for
    example ``key_padding_mask``) go to ``f``, the dict ``g_kwargs`` to ``g``.
    """

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f, self.g = f, g

    def forward(self, x1: Tensor, x2: Tensor, *, g_kwargs: Optional[dict] = None,
                **f_kwargs: Any) -> tuple[Tensor, Tensor]:
        y1 = x1 + self.f(x2, **f_kwargs)
        return y1, x2 + self.g(y1, **(g_kwargs or {}))

    def forward_recording(self, x1: Tensor, x2: Tensor, f_kwargs: dict,
                          g_kwargs: dict) -> tuple[Tensor, Tensor, tuple[RngState, RngState]]:
        """``forward`` that also returns the RNG states seen by ``f`` and ``g``."""
        f_state = RngState.capture()
        y1 = x1 + self.f(x2, **f_kwargs)
        g_state = RngState.capture()
        return y1, x2 + self.g(y1, **g_kwargs), (f_state, g_state)

    def trainable(self) -> tuple[Tensor, ...]:
        """The parameters that need gradients, ``f``'s then ``g``'s."""
        return _trainable(self.f) + _trainable(self.g)

    def backward_pass(self, y1: Tensor, y2: Tensor, dy1: Tensor, dy2: Tensor, f_kwargs: dict, g_kwargs: dict,
                      kwarg_leaves: list[Tensor], kwarg_grads: list[Optional[Tensor]],
                      states: tuple[RngState, RngState],
                      autocast: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor, Tensor, list]:
        """From outputs and their gradients, return ``(x1, x2, dx1, dx2, parameter grads)``.

        ``f_kwargs``/``g_kwargs`` hold the leaves ``kwarg_leaves`` (detached copies of the keyword
        tensors that require grad) in place of the caller's tensors; their gradients are added to
        ``kwarg_grads`` (same order). ``f`` and ``g`` are recomputed under
        ``torch.autocast(**autocast)`` (the forward's autocast state), so they reproduce the
        forward's outputs; their backward runs outside it.
        """
        f_state, g_state = states
        f_params, g_params = _trainable(self.f), _trainable(self.g)
        n_leaves = len(kwarg_leaves)
        with torch.enable_grad():
            y1 = y1.detach().requires_grad_()
            with g_state.replay(), torch.autocast(**autocast):
                gy1 = self.g(y1, **g_kwargs)
            dy1_g, *rest = torch.autograd.grad(gy1, (y1, *kwarg_leaves, *g_params), dy2, allow_unused=True)
        _add_grads(kwarg_grads, rest[:n_leaves])
        g_grads = rest[n_leaves:]
        with torch.no_grad():
            x2 = y2 - gy1
            dx1 = dy1 + dy1_g  # y1 feeds y2 through g and is x1's direct image
        del gy1
        with torch.enable_grad():
            x2 = x2.detach().requires_grad_()
            with f_state.replay(), torch.autocast(**autocast):
                fx2 = self.f(x2, **f_kwargs)
            dx2_f, *rest = torch.autograd.grad(fx2, (x2, *kwarg_leaves, *f_params), dx1, allow_unused=True)
        _add_grads(kwarg_grads, rest[:n_leaves])
        f_grads = rest[n_leaves:]
        with torch.no_grad():
            x1 = y1 - fx2
            dx2 = dy2 + dx2_f
        return x1.detach(), x2.detach(), dx1, dx2, f_grads + g_grads


def _add_grads(acc: list[Optional[Tensor]], grads: Iterable[Optional[Tensor]]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            acc[i] = g if acc[i] is None else acc[i] + g


def _trainable(module: nn.Module) -> tuple[Tensor, ...]:
    return tuple(p for p in module.parameters() if p.requires_grad)


def _autocast_state(device: str) -> dict[str, Any]:
    """``torch.autocast`` keyword arguments reproducing the current autocast state on ``device``."""
    return {"device_type": device, "enabled": torch.is_autocast_enabled(device),
            "dtype": torch.get_autocast_dtype(device)}


class _ReversibleFn(torch.autograd.Function):
    """Runs the blocks without building a graph; saves only the concatenated final output.

    Inputs: ``x``, the blocks, the keyword dicts, the number ``n_kw`` of keyword tensors, then
    the keyword tensors (as inputs, so that they get gradients) and the parameters.
    """

    @staticmethod
    def forward(ctx, x: Tensor, blocks: nn.ModuleList, f_kwargs: dict, g_kwargs: dict, n_kw: int,
                *tensors: Tensor) -> Tensor:
        x1 = x2 = x
        states = []
        for block in blocks:
            x1, x2, block_states = block.forward_recording(x1, x2, f_kwargs, g_kwargs)
            states.append(block_states)
        out = torch.cat([x1, x2], dim=-1)  # (..., 2d)
        kw_tensors = tensors[:n_kw]
        ctx.save_for_backward(out, *kw_tensors)
        ctx.blocks, ctx.f_kwargs, ctx.g_kwargs, ctx.states, ctx.n_kw = blocks, f_kwargs, g_kwargs, states, n_kw
        ctx.autocast = _autocast_state(x.device.type)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out, *kw_tensors = ctx.saved_tensors
        n_kw = ctx.n_kw
        wanted = ctx.needs_input_grad[5:5 + n_kw]
        # Keyword tensors that need a gradient are replaced by fresh leaves (shared by all blocks).
        leaves = {id(orig): t.detach().requires_grad_()
                  for orig, t, need in zip(_tensors(ctx.f_kwargs, ctx.g_kwargs), kw_tensors, wanted) if need}
        f_kwargs = _map_tensors(ctx.f_kwargs, lambda t: leaves.get(id(t), t))
        g_kwargs = _map_tensors(ctx.g_kwargs, lambda t: leaves.get(id(t), t))
        leaf_list = list(leaves.values())
        kw_grads: list[Optional[Tensor]] = [None] * len(leaf_list)
        y1, y2 = out.chunk(2, dim=-1)
        dy1, dy2 = grad_out.chunk(2, dim=-1)
        grads = []
        for block, states in zip(reversed(ctx.blocks), reversed(ctx.states)):
            y1, y2, dy1, dy2, block_grads = block.backward_pass(y1, y2, dy1, dy2, f_kwargs, g_kwargs, leaf_list,
                                                                kw_grads, states, ctx.autocast)
            grads.append(block_grads)
        param_grads = [g for block_grads in reversed(grads) for g in block_grads]
        kw_iter = iter(kw_grads)
        kw_out = [next(kw_iter) if need else None for need in wanted]
        return (dy1 + dy2, None, None, None, None, *kw_out, *param_grads)  # x fed both streams


def _first_floating_parameter(module: nn.Module) -> Optional[Tensor]:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


class ReversibleSequence(nn.Module):
    """A stack of reversible couplings over two streams, trax-style.

    ``forward(x)`` duplicates ``x`` of shape ``(..., d)`` into both streams, applies the blocks
    and returns the concatenation ``[y1, y2]`` of shape ``(..., 2 * d)`` (as trax's and the
    Reformer paper's ReformerLM: ``Dup -> ReversibleSerial -> Concatenate``).

    Args:
        blocks: pairs ``(f, g)`` of modules mapping ``(B, N, d) -> (B, N, d)``, one per layer.
        reversible: True recomputes activations in backward (memory independent of depth);
            False runs the same two-stream network with ordinary autograd (memory linear in
            depth). Both have the same ``state_dict`` keys and the same outputs and gradients,
            for ``x``, the parameters and every tensor in the keyword arguments.
    """

    def __init__(self, blocks: Iterable[tuple[nn.Module, nn.Module]], reversible: bool = True):
        super().__init__()
        self.blocks = nn.ModuleList(ReversibleBlock(f, g) for f, g in blocks)
        if not self.blocks:
            raise ValueError("blocks must hold at least one (f, g) pair")
        if not isinstance(reversible, bool):
            raise TypeError(f"reversible must be a bool, got {reversible!r}")
        self.reversible = reversible

    def forward(self, x: Tensor, *, g_kwargs: Optional[dict] = None, **f_kwargs: Any) -> Tensor:
        """x: ``(B, N, d)`` -> ``(B, N, 2 * d)``.

        ``f_kwargs`` (e.g. ``key_padding_mask``) go to every ``f``, the dict ``g_kwargs`` to every
        ``g``. ``x`` must have the dtype of the blocks' parameters (outside ``torch.autocast``).
        """
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise TypeError(f"x must be a tensor of shape (B, N, d), got {type(x).__name__}")
        if g_kwargs is not None and not isinstance(g_kwargs, dict):
            raise TypeError(f"g_kwargs must be a dict of keyword arguments for g, got {type(g_kwargs).__name__}")
        g_kwargs = dict(g_kwargs or {})
        param = _first_floating_parameter(self)
        if (param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type)):
            raise TypeError(f"x has dtype {x.dtype} but the blocks' parameters are {param.dtype}: convert one "
                            f"(e.g. x.to({param.dtype}) or module.to({x.dtype})) or run under torch.autocast")
        if self.reversible and torch.is_grad_enabled():
            params = [p for block in self.blocks for p in block.trainable()]
            kw_tensors = _tensors(f_kwargs, g_kwargs)
            return _ReversibleFn.apply(x, self.blocks, f_kwargs, g_kwargs, len(kw_tensors), *kw_tensors, *params)
        x1 = x2 = x
        for block in self.blocks:
            x1, x2 = block(x1, x2, g_kwargs=g_kwargs, **f_kwargs)
        return torch.cat([x1, x2], dim=-1)

    def extra_repr(self) -> str:
        return f"reversible={self.reversible}"
