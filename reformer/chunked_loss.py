"""Output projection + cross-entropy over chunks of positions, for large vocabularies.

The Reformer paper (section 4, "Chunking") computes the log-probabilities and the loss "for a
section of the sequence at a time". ``chunked_cross_entropy`` never materialises the whole
``(M, vocab)`` logits: forward keeps one chunk's logits at a time (plus one log-sum-exp per
row), backward recomputes them chunk by chunk and turns them into gradients in place.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._validation import check_ids, check_positive


class _ChunkedCrossEntropyFn(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``targets``, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, chunks: int) -> Tensor:
        compute = torch.promote_types(hidden.dtype, torch.float32)  # float32 for half inputs
        lse = hidden.new_empty(hidden.shape[0], dtype=compute)  # (M,) log-sum-exp per row
        total = hidden.new_zeros((), dtype=compute)
        for h, t, out in zip(hidden.tensor_split(chunks), targets.tensor_split(chunks), lse.tensor_split(chunks)):
            logits = F.linear(h, weight, bias).to(compute)  # (m, V)
            torch.logsumexp(logits, dim=-1, out=out)
            total += (out - logits.gather(1, t[:, None]).squeeze(1)).sum()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunks = chunks
        return (total / hidden.shape[0]).to(hidden.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        scale = grad.to(lse.dtype) / hidden.shape[0]
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight)
        grad_bias = None if bias is None else torch.zeros_like(bias)
        pieces = zip(hidden.tensor_split(ctx.chunks), targets.tensor_split(ctx.chunks), lse.tensor_split(ctx.chunks),
                     grad_hidden.tensor_split(ctx.chunks))
        for h, t, row_lse, grad_h in pieces:
            probs = F.linear(h, weight, bias).to(lse.dtype).sub_(row_lse[:, None]).exp_()  # (m, V) softmax
            probs.scatter_add_(1, t[:, None], probs.new_full((t.shape[0], 1), -1.0)).mul_(scale)
            probs = probs.to(hidden.dtype)  # d loss / d logits
            torch.mm(probs, weight, out=grad_h)
            grad_weight.addmm_(probs.t(), h)
            if grad_bias is not None:
                grad_bias.add_(probs.sum(0))
        return grad_hidden, grad_weight, grad_bias, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                          chunks: int) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), targets)`` (mean) without the full logits.

    Args:
        hidden: ``(M, D)`` features (e.g. the flattened ``(B * N, D)`` positions).
        weight: ``(V, D)`` output projection; bias: ``(V,)`` or None.
        targets: ``(M,)`` integer class ids in ``[0, V)`` (there is no ``ignore_index``: drop
            such positions from ``hidden`` and ``targets`` first).
        chunks: the positions are processed in this many slices (>= 1); peak extra memory for
            the logits is about ``M * V / chunks`` floats. Logits of float16/bfloat16 inputs are
            computed in float32.

    Returns:
        A scalar in ``hidden``'s dtype. Differentiable once (hidden, weight, bias).

    Raises:
        TypeError: ``targets`` is not an integer tensor (float ids are not truncated).
        ValueError: mismatched shapes, ``targets`` outside ``[0, V)``, ``chunks`` < 1, M == 0.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (M, D) and weight (V, D) must agree on D, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    check_ids("targets", targets, weight.shape[0])
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape (M,) = {tuple(hidden.shape[:1])}, got {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must have shape (V,) = {tuple(weight.shape[:1])}, got {tuple(bias.shape)}")
    check_positive("chunks", chunks)
    if hidden.shape[0] == 0:
        raise ValueError("hidden must hold at least one position")
    return _ChunkedCrossEntropyFn.apply(hidden, weight, bias, targets.long(), chunks)
