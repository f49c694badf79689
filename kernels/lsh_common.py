"""Shared-QK LSH attention machinery common to every backend (DESIGN.md rules 1-7).

Hashing (random rotations, ``argmax([xR; -xR])``), the per-round sort by (bucket, position),
padding, and one ``torch.autograd.Function`` that is generic over a *core*: a module or object
with ``fwd``/``bwd`` functions computing the chunked look-back attention of ONE sorted round
(``reformer.kernels.ref_lsh`` in pure PyTorch, ``reformer.kernels.triton_lsh`` in Triton; the
signatures are in ``ref_lsh``).

Memory: the Function runs the hash rounds in turn and combines them online by their
log-sum-exp. It saves only its inputs, the per-round sort indices, the combined output and the
combined log-sum-exp; backward recomputes each round's logits (as flash-attention does), so no
round's scores outlive that round.

Rounds are not de-duplicated: a key found in k rounds is counted k times in the combined
softmax (the paper's basic scheme, as in trax and HF). Within a round every key is counted once.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Optional

import torch
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

KEY_EPS = 1e-6  # keys are qk / max(||qk||_2, KEY_EPS)
SELF_LOGIT = -1e5  # logit of a query against its own position (attended only when nothing else is)
HASH_SLAB_BYTES = 4 * 2**20  # bound on the rotated-vector buffer while hashing


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Hashing, logits and round combination run in float32 for float16/bfloat16 inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def padded_length(n: int, bucket_size: int) -> int:
    """``n`` rounded up to a multiple of ``bucket_size``."""
    return -(-n // bucket_size) * bucket_size


def default_n_buckets(n: int, bucket_size: int) -> int:
    """``2 * N_pad / bucket_size``: even and at least 2 (rule 2)."""
    return 2 * (padded_length(n, bucket_size) // bucket_size)


def make_rotations(
    heads: int, dim: int, n_hashes: int, n_buckets: int, *, seed: Optional[int], device: torch.device
) -> Tensor:
    """Random Gaussian rotations ``(H, D, n_hashes, n_buckets // 2)`` in float32.

    From a CPU ``torch.Generator`` seeded with ``seed`` (then moved to ``device``), or from the
    global RNG of ``device`` when ``seed`` is None (so that saving and restoring the RNG state
    replays the draw exactly).
    """
    shape = (heads, dim, n_hashes, n_buckets // 2)
    if seed is None:
        return torch.randn(shape, device=device)
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(device)


def hash_buckets(qk: Tensor, rotations: Tensor) -> Tensor:
    """Bucket ids ``argmax([x R ; -x R])`` for every head and round.

    qk: ``(B, H, N, D)``; rotations: ``(H, D, n_hashes, n_buckets // 2)``.
    Returns a LongTensor ``(B, H, n_hashes, N)`` with values in ``[0, n_buckets)``. Ties go to
    the lowest index, as with ``argmax`` on the concatenation. Positions are processed in slabs
    so the rotated vectors never take more than about ``HASH_SLAB_BYTES``.
    """
    b, h, n, d = qk.shape
    dtype = compute_dtype(qk.dtype)
    rot = rotations.to(dtype)
    n_hashes, half = rot.shape[2], rot.shape[3]
    per_position = b * h * n_hashes * half * rot.element_size()
    step = max(1, HASH_SLAB_BYTES // per_position)
    buckets = torch.empty(b, h, n_hashes, n, dtype=torch.int64, device=qk.device)  # before the temporaries
    for start in range(0, n, step):
        x = qk[:, :, start:start + step].to(dtype)
        rotated = torch.einsum("bhnd,hdrk->bhrnk", x, rot)  # (B, H, R, n, n_buckets/2)
        top, top_idx = rotated.max(dim=-1)
        low, low_idx = rotated.min(dim=-1)
        buckets[..., start:start + step] = torch.where(top >= -low, top_idx, low_idx + half)
    return buckets


def sort_indices(buckets: Tensor, key_padding_mask: Optional[Tensor], n_buckets: int) -> Tensor:
    """Per-round order of positions by (bucket, position), as flat row indices.

    buckets: ``(B, H, R, N)``; key_padding_mask: ``(B, N)`` bool, True = padding (those positions
    go to an extra bucket ``n_buckets``, after all others). Returns ``(R, B*H*N)`` int64: entry
    ``g*N + i`` of round r is the row (of the ``(B*H*N, D)`` view of qk) placed at sorted slot i
    of group g.
    """
    b, h, _, n = buckets.shape
    if key_padding_mask is not None:
        buckets = buckets.masked_fill(key_padding_mask[:, None, None, :], n_buckets)
    position = torch.arange(n, device=buckets.device)
    order = (buckets * n + position).argsort(dim=-1)  # keys are unique: the sort is total
    order = rearrange(order, "b h r n -> r (b h) n")
    offsets = (torch.arange(b * h, device=buckets.device) * n)[:, None]
    return (order + offsets).reshape(order.shape[0], -1)


def original_positions(batch: int, heads: int, n: int, key_padding_mask: Optional[Tensor],
                       device: torch.device) -> Tensor:
    """``(B*H*N,)`` int32: each row's position in its sequence, -1 where padding."""
    pos = torch.arange(n, dtype=torch.int32, device=device).expand(batch, heads, n)
    if key_padding_mask is not None:
        pos = pos.masked_fill(key_padding_mask[:, None, :], -1)
    return pos.reshape(-1)


def _sorted(rows: Tensor, idx: Tensor, groups: int, n_pad: int, fill: float) -> Tensor:
    """Rows ``(G*N, ...)`` gathered into one round's order ``(G, Np, ...)``, padded with ``fill``."""
    x = rows.index_select(0, idx)
    x = x.view(groups, -1, *rows.shape[1:])
    extra = n_pad - x.shape[1]
    if extra == 0:
        return x
    pad = x.new_full((groups, extra, *rows.shape[1:]), fill)
    return torch.cat([x, pad], dim=1)


def _merge_round(out: Tensor, top: Tensor, total: Tensor, out_r: Tensor, lse_r: Tensor, idx: Tensor) -> None:
    """Fold one round (sorted rows ``out_r (G*N, D)``, ``lse_r (G*N,)``) into the running unsorted
    sums, in place: ``top`` is the largest lse so far, ``out = sum_r exp(lse_r - top) out_r`` and
    ``total = sum_r exp(lse_r - top)``. Normalising at the end (rather than keeping a running
    lse) keeps rows whose only key is themselves exact: their lse, ``SELF_LOGIT + log(rounds)``,
    is not representable to float32 precision."""
    lse_rows = torch.empty_like(top).index_copy_(0, idx, lse_r.to(top.dtype))  # idx is a permutation
    new_top = torch.maximum(top, lse_rows)
    base = new_top.masked_fill(new_top == float("-inf"), 0.0)
    old_weight, weight = torch.exp(top - base), torch.exp(lse_rows - base)
    weighted = out_r.to(out.dtype) * weight.index_select(0, idx).unsqueeze(-1)
    out.mul_(old_weight.unsqueeze(-1)).index_add_(0, idx, weighted)
    total.mul_(old_weight).add_(weight)
    top.copy_(new_top)


def _self_only_rebase(lse: Tensor, n_hashes: int) -> tuple[Tensor, Tensor]:
    """Backward re-basing of rows whose only key in every round was themselves.

    Their combined lse is ``SELF_LOGIT + log(n_hashes)``, which float32 cannot hold precisely
    enough for ``p = exp(s - lse)``; they get lse ``SELF_LOGIT`` (p = 1 per round) and a
    ``1 / n_hashes`` factor on dO and delta instead, which is exact. Returns (lse, factor).
    """
    self_only = (lse < SELF_LOGIT / 2) & (lse > float("-inf"))
    factor = torch.ones_like(lse).masked_fill_(self_only, 1.0 / n_hashes)
    return lse.masked_fill(self_only, SELF_LOGIT), factor


def _forward_round(core: ModuleType, qk_rows: Tensor, v_rows: Tensor, pos: Tensor, idx: Tensor,
                   sums: tuple[Tensor, Tensor, Tensor], groups: int, bucket_size: int, causal: bool) -> None:
    """Run ``core.fwd`` on one round (rows ``(G*N, D)`` gathered by ``idx``) and fold it into
    the running ``sums = (out, top, total)`` (see :func:`_merge_round`). A function of its own
    so the round's buffers are freed before the next round allocates its own."""
    rows, d = qk_rows.shape
    n, n_pad = rows // groups, padded_length(rows // groups, bucket_size)
    out_r, lse_r = core.fwd(
        _sorted(qk_rows, idx, groups, n_pad, 0.0), _sorted(v_rows, idx, groups, n_pad, 0.0),
        _sorted(pos, idx, groups, n_pad, -1), bucket_size=bucket_size, causal=causal, scale=d**-0.5,
    )
    _merge_round(*sums, out_r[:, :n].reshape(-1, d), lse_r[:, :n].reshape(-1), idx)


def _backward_round(core: ModuleType, rows: tuple[Tensor, ...], idx: Tensor, grads: tuple[Tensor, Tensor],
                    groups: int, bucket_size: int, causal: bool) -> None:
    """Gather one round of ``rows = (qk, v, dO, pos, lse, delta, factor)`` (each ``(G*N, ...)``),
    run ``core.bwd`` and scatter-add its dqk, dv into ``grads = (dqk, dv)`` ``(G*N, D)``."""
    qk_rows, v_rows, do_rows, pos, lse, delta, factor = rows
    n_rows, d = qk_rows.shape
    n, n_pad = n_rows // groups, padded_length(n_rows // groups, bucket_size)
    sdo = _sorted(do_rows, idx, groups, n_pad, 0.0)
    sdo.mul_(_sorted(factor, idx, groups, n_pad, 1.0).unsqueeze(-1).to(sdo.dtype))
    dqk_r, dv_r = core.bwd(
        _sorted(qk_rows, idx, groups, n_pad, 0.0), _sorted(v_rows, idx, groups, n_pad, 0.0),
        _sorted(pos, idx, groups, n_pad, -1), sdo, _sorted(lse, idx, groups, n_pad, float("-inf")),
        _sorted(delta, idx, groups, n_pad, 0.0), bucket_size=bucket_size, causal=causal, scale=d**-0.5,
    )
    for grad, grad_r in zip(grads, (dqk_r, dv_r)):
        grad.index_add_(0, idx, grad_r[:, :n].reshape(-1, d).to(grad.dtype))


class LSHAttentionFunction(torch.autograd.Function):
    """Multi-round shared-QK LSH attention over flattened heads, generic over a core.

    Inputs: qk, v ``(G, N, D)``; pos ``(G*N,)`` int32 (-1 = padding); sort_idx ``(R, G*N)`` from
    :func:`sort_indices`; the core; bucket_size; causal. Outputs: out ``(G, N, D)`` (input dtype)
    and lse ``(G, N)`` (float32, float64 for float64 inputs; -inf where a row has no key).
    Both outputs are differentiable (``d lse / d logit = p``).
    """

    @staticmethod
    def forward(ctx: Any, qk: Tensor, v: Tensor, pos: Tensor, sort_idx: Tensor, core: ModuleType,
                bucket_size: int, causal: bool) -> tuple[Tensor, Tensor]:
        g, n, d = qk.shape
        acc = compute_dtype(qk.dtype)
        out = torch.zeros(g * n, d, dtype=acc, device=qk.device)
        top = torch.full((g * n,), float("-inf"), dtype=acc, device=qk.device)
        total = torch.zeros_like(top)
        qk_rows, v_rows = qk.reshape(g * n, d), v.reshape(g * n, d)
        for idx in sort_idx:
            _forward_round(core, qk_rows, v_rows, pos, idx, (out, top, total), g, bucket_size, causal)
        out = out.div_(total.masked_fill(total == 0, 1.0).unsqueeze(-1)).view(g, n, d).to(qk.dtype)
        lse = top.add_(total.log_()).view(g, n)
        ctx.save_for_backward(qk, v, pos, sort_idx, out, lse)
        ctx.core, ctx.bucket_size, ctx.causal = core, bucket_size, causal
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Tensor, dlse: Tensor) -> tuple[Optional[Tensor], ...]:
        qk, v, pos, sort_idx, out, lse = ctx.saved_tensors
        g, n, d = qk.shape
        acc = compute_dtype(qk.dtype)
        lse_rows, factor = _self_only_rebase(lse.reshape(-1), sort_idx.shape[0])
        delta = ((dout.to(acc) * out.to(acc)).sum(-1) - dlse.to(acc)).reshape(-1) * factor  # (G*N,)
        qk_rows, v_rows, do_rows = (x.reshape(g * n, d) for x in (qk, v, dout))
        dqk = torch.zeros(g * n, d, dtype=acc, device=qk.device)
        dv = torch.zeros_like(dqk)
        for idx in sort_idx:
            _backward_round(ctx.core, (qk_rows, v_rows, do_rows, pos, lse_rows, delta, factor), idx, (dqk, dv),
                            g, ctx.bucket_size, ctx.causal)
        return dqk.view(g, n, d).to(qk.dtype), dv.view(g, n, d).to(v.dtype), None, None, None, None, None


def lsh_attention_rounds(
    qk: Tensor,
    v: Tensor,
    *,
    core: ModuleType,
    bucket_size: int,
    causal: bool,
    key_padding_mask: Optional[Tensor],
    rotations: Tensor,
) -> tuple[Tensor, Tensor]:
    """Hash, sort and run :class:`LSHAttentionFunction` on validated inputs.

    qk, v: ``(B, H, N, D)``; key_padding_mask: ``(B, N)`` bool, True = padding, or None;
    rotations: ``(H, D, n_hashes, n_buckets // 2)``. Returns out ``(B, H, N, D)`` and
    lse ``(B, H, N)``.
    """
    b, h, n, d = qk.shape
    with torch.no_grad():
        buckets = hash_buckets(qk.detach(), rotations)
        sort_idx = sort_indices(buckets, key_padding_mask, 2 * rotations.shape[-1])
        pos = original_positions(b, h, n, key_padding_mask, qk.device)
    out, lse = LSHAttentionFunction.apply(
        qk.reshape(b * h, n, d), v.reshape(b * h, n, d), pos, sort_idx, core, bucket_size, causal
    )
    return out.view(b, h, n, d), lse.view(b, h, n)
