"""Multi-round shared-QK LSH attention, generic over the per-round core (docs/lsh.md).

Layers, from the outside in:

- :func:`lsh_attention_rounds`: hash (``hashing.hash_buckets``), sort every round by
  (bucket, position) with padding last (in causal bucket mode, spread into the aligned layout
  of :func:`align_buckets`), and run :class:`LSHAttentionFunction`.
- :class:`LSHAttentionFunction`: the autograd Function. It calls only the round-level protocol
  :class:`LSHCore` (``forward_round``/``backward_round``), once per hash round, and applies the
  self rule outside the rounds (a non-padding row with no permitted key in any round gets its
  own value; docs/lsh.md, "The self rule").
- Round-level cores: ``reformer.kernels.ref_lsh`` (the torch backend) and
  ``reformer.kernels.triton_lsh`` implement :class:`LSHCore` directly: they read each slab's rows
  through the round's sort order and merge (forward) or scatter-add (backward) the results into
  the unsorted accumulators, so no sorted copy of a whole group ever exists.
- :class:`SortedCoreAdapter`: implements :class:`LSHCore` for any *sorted core* (a module with
  ``fwd``/``bwd`` on sorted, padded rows, such as ``ref_lsh.fwd``/``ref_lsh.bwd``) by gathering a
  round's rows into sorted order, padding, calling the core and merging/scattering the results
  back, for slabs of groups of about ``GROUP_SLAB_BYTES`` of sorted rows (at least one group).

Memory: the Function saves its inputs, the output, the combined lse and, per round, the sort
order and the sorted bucket ids (int32); backward recomputes each round's logits (as
flash-attention does). Beyond those, its own passes use slabs of ``ROW_SLAB_BYTES``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Protocol

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .hashing import compute_dtype, hash_buckets, padded_length, total_buckets

SELF_ONLY_LSE = -1e5  # reported lse of a non-padding row with no permitted key in any round (gradient 0)
GROUP_SLAB_BYTES = 16 * 2**20  # bound on one sorted (g, Np, D) copy in the adapter (at least one group)
ROW_SLAB_BYTES = 4 * 2**20  # bound on the temporaries of the Function's own row-wise passes
CAUSAL_MODES = ("bucket", "chunk")
NEG_INF = float("-inf")
REBASE_ABOVE = 2.0**20  # |max lse| beyond which backward rebases on the max (see LSHAttentionFunction)


class LSHCore(Protocol):
    """Round-level protocol the Function calls (docs/lsh.md, "The core seam").

    qk, v, do: ``(G, N, D)`` UNSORTED rows; pos ``(G, N)`` int32 (-1 = padding); order ``(G, S)``
    int32: the position placed at sorted slot s of group g this round; bkt ``(G, S)`` int32: the
    bucket id of each sorted slot. ``S = N``, or in bucket mode the aligned layout's slot count
    (:func:`align_buckets`: a multiple of bucket_size, holes with order and bkt -1, which are no
    row: never merged, never scattered into). ``out`` is float32 (float64 for float64 inputs); ``top``,
    ``total`` and the combined ``lse`` are float64 (a huge max logit keeps all its digits).
    """

    def forward_round(self, qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, out: Tensor,
                      top: Tensor, total: Tensor, *, bucket_size: int, causal: bool, causal_mode: str,
                      scale: float) -> None:
        """Merge this round into the running sums in place: ``top (G, N)`` is the largest round
        lse so far, ``out (G, N, D) = sum_r exp(lse_r - top) out_r`` and
        ``total (G, N) = sum_r exp(lse_r - top)``."""

    def backward_round(self, qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, do: Tensor,
                       lse: Tensor, delta: Tensor, dqk: Tensor, dv: Tensor, *, bucket_size: int, causal: bool,
                       causal_mode: str, scale: float) -> None:
        """Add this round's gradients into ``dqk, dv (G, N, D)`` at unsorted positions, given the
        combined ``lse (G, N)`` and ``delta = rowsum(dO * O) - dlse (G, N)``."""


def _group_slabs(g: int, n_pad: int, d: int, itemsize: int) -> tuple[range, int]:
    """Start indices and size of the group slabs holding about ``GROUP_SLAB_BYTES`` of rows each."""
    step = max(1, GROUP_SLAB_BYTES // max(1, n_pad * d * itemsize))
    return range(0, g, step), step


def _row_slabs(g: int, n: int, row_bytes: int) -> Iterator[tuple[int, int, int, int]]:
    """``(g0, g1, r0, r1)`` covering ``(g, n)`` rows in slabs of about ``ROW_SLAB_BYTES``: several
    whole groups, or row ranges of one group."""
    rows = max(1, ROW_SLAB_BYTES // max(1, row_bytes))
    if n <= rows:
        step = max(1, rows // n)
        for g0 in range(0, g, step):
            yield g0, min(g, g0 + step), 0, n
        return
    for g0 in range(g):
        for r0 in range(0, n, rows):
            yield g0, g0 + 1, r0, min(n, r0 + rows)


def _gather(x: Tensor, flat_idx: Tensor, gs: int, n: int, n_pad: int, fill: float) -> Tensor:
    """Rows ``flat_idx`` of ``x`` viewed as ``(G*N, ...)``, as ``(gs, n_pad, ...)`` padded with ``fill``."""
    tail = x.shape[2:]
    rows = x.reshape(-1, *tail).index_select(0, flat_idx).view(gs, n, *tail)
    if n_pad == n:
        return rows
    out = rows.new_empty((gs, n_pad, *tail))
    out[:, :n] = rows
    out[:, n:] = fill
    return out


class SortedCoreAdapter:
    """:class:`LSHCore` for a sorted core module ``core`` (``fwd``/``bwd`` on sorted rows)."""

    def __init__(self, core: Any):
        self.core = core

    def _slabs(self, qk: Tensor, order: Tensor, bucket_size: int):
        """Per slab of groups: ``g0, g1``, the slots' rows ``idx`` (``(g, S)``, holes of the
        aligned layout sent to a spare row ``N``), their flat rows (holes: row 0 of the group),
        the padded slot count and the hole mask (None without holes)."""
        g, rows, d = qk.shape
        n_pad = padded_length(order.shape[1], bucket_size)
        starts, step = _group_slabs(g, n_pad, d, max(4, qk.element_size()))
        for g0 in starts:
            g1 = min(g, g0 + step)
            idx = order[g0:g1].long()
            hole = idx < 0
            if not bool(hole.any()):
                hole = None
            base = torch.arange(g0, g1, device=qk.device).mul_(rows).unsqueeze(-1)
            flat = ((idx if hole is None else idx.clamp_min(0)) + base).reshape(-1)
            if hole is not None:
                idx = idx.masked_fill(hole, rows)
            yield g0, g1, idx, flat, n_pad, hole

    def forward_round(self, qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, out: Tensor,
                      top: Tensor, total: Tensor, *, bucket_size: int, causal: bool, causal_mode: str,
                      scale: float) -> None:
        g, rows, d = qk.shape
        n = order.shape[1]  # slots (more than rows with the aligned layout's holes)
        for g0, g1, idx, flat, n_pad, hole in self._slabs(qk, order, bucket_size):
            gs = g1 - g0
            pos_s = _sorted_pos(pos, flat, gs, n, n_pad, hole)
            out_r, lse_r = self.core.fwd(
                _gather(qk, flat, gs, n, n_pad, 0.0), _gather(v, flat, gs, n, n_pad, 0.0),
                pos_s, _pad(bkt[g0:g1], n_pad, -1),
                bucket_size=bucket_size, causal=causal, causal_mode=causal_mode, scale=scale,
            )
            lse_r = lse_r[:, :n].to(top.dtype)
            lse_u = lse_r.new_empty(gs, rows + 1).scatter_(1, idx, lse_r)[:, :rows]  # this round's lse, unsorted
            old_top = top[g0:g1]
            new_top = torch.maximum(old_top, lse_u)
            base = new_top.masked_fill(new_top == NEG_INF, 0.0)
            w_old = (old_top - base).exp_()  # weights of the sums so far ...
            w_new = lse_u.sub_(base).exp_()  # ... and of this round
            total[g0:g1].mul_(w_old).add_(w_new)
            out[g0:g1].mul_(w_old.to(out.dtype).unsqueeze(-1))
            weighted = out_r[:, :n].to(out.dtype).mul_(w_new.gather(1, idx.clamp(max=rows - 1)).to(out.dtype).unsqueeze(-1))
            local, weighted = flat - g0 * rows, weighted.reshape(-1, d)
            if hole is not None:
                keep = torch.nonzero(~hole.reshape(-1)).squeeze(-1)
                local, weighted = local.index_select(0, keep), weighted.index_select(0, keep)
            out[g0:g1].view(-1, d).index_add_(0, local, weighted)
            top[g0:g1] = new_top

    def backward_round(self, qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, do: Tensor,
                       lse: Tensor, delta: Tensor, dqk: Tensor, dv: Tensor, *, bucket_size: int, causal: bool,
                       causal_mode: str, scale: float) -> None:
        g, rows, d = qk.shape
        n = order.shape[1]
        for g0, g1, idx, flat, n_pad, hole in self._slabs(qk, order, bucket_size):
            gs = g1 - g0
            pos_s = _sorted_pos(pos, flat, gs, n, n_pad, hole)
            dqk_r, dv_r = self.core.bwd(
                _gather(qk, flat, gs, n, n_pad, 0.0), _gather(v, flat, gs, n, n_pad, 0.0),
                pos_s, _pad(bkt[g0:g1], n_pad, -1),
                _gather(do, flat, gs, n, n_pad, 0.0), _gather(lse, flat, gs, n, n_pad, NEG_INF),
                _gather(delta, flat, gs, n, n_pad, 0.0),
                bucket_size=bucket_size, causal=causal, causal_mode=causal_mode, scale=scale,
            )
            local = flat - g0 * rows
            keep = None if hole is None else torch.nonzero(~hole.reshape(-1)).squeeze(-1)
            for grad, grad_r in ((dqk, dqk_r), (dv, dv_r)):
                grad_r = grad_r[:, :n].reshape(-1, d).to(grad.dtype)
                grad[g0:g1].view(-1, d).index_add_(0, local if keep is None else local.index_select(0, keep),
                                                   grad_r if keep is None else grad_r.index_select(0, keep))


def _sorted_pos(pos: Tensor, flat: Tensor, gs: int, n: int, n_pad: int, hole: Optional[Tensor]) -> Tensor:
    """Positions of the sorted slots ``(gs, n_pad)``: -1 for padding slots and for holes."""
    pos_s = _gather(pos, flat, gs, n, n_pad, -1)
    if hole is not None:
        pos_s[:, :n].masked_fill_(hole, -1)
    return pos_s


def _pad(x: Tensor, n_pad: int, fill: int) -> Tensor:
    """``(g, N)`` padded to ``(g, n_pad)`` with ``fill``."""
    if x.shape[1] == n_pad:
        return x
    return torch.cat([x, x.new_full((x.shape[0], n_pad - x.shape[1]), fill)], dim=1)


class LSHAttentionFunction(torch.autograd.Function):
    """Multi-round shared-QK LSH attention over flattened heads, generic over a round-level core.

    Inputs: qk, v ``(G, N, D)``; pos ``(G, N)`` int32 (-1 = padding); order, bkt ``(R, G, S)``
    int32 (per round: the position at each sorted slot and the slot's bucket; ``S > N`` with the
    holes of bucket mode's aligned layout); the round-level
    core (:class:`LSHCore`); bucket_size; causal; causal_mode. Outputs: out ``(G, N, D)`` (input
    dtype) and lse ``(G, N)`` (float32, float64 for float64 inputs). Self rule: a non-padding row
    with no permitted key in any round gets out = its own v and lse ``SELF_ONLY_LSE`` (gradient
    of that lse: 0); padding rows get out 0 and lse -inf.
    """

    @staticmethod
    def forward(ctx: Any, qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, core: LSHCore,
                bucket_size: int, causal: bool, causal_mode: str) -> tuple[Tensor, Tensor]:
        g, n, d = qk.shape
        acc = compute_dtype(qk.dtype)
        out = torch.zeros(g, n, d, dtype=acc, device=qk.device)
        top = torch.full((g, n), NEG_INF, dtype=torch.float64, device=qk.device)  # lse kept in float64
        total = torch.zeros_like(top)
        kw = dict(bucket_size=bucket_size, causal=causal, causal_mode=causal_mode, scale=d**-0.5)
        for r in range(order.shape[0]):
            core.forward_round(qk, v, pos, order[r], bkt[r], out, top, total, **kw)
        out.div_(total.masked_fill(total == 0, 1.0).to(acc).unsqueeze(-1))
        self_only = (top == NEG_INF) & (pos >= 0)
        lse = top + total.log()
        if bool(self_only.any()):
            out[self_only] = v[self_only].to(acc)
            lse.masked_fill_(self_only, SELF_ONLY_LSE)
        out = out.to(qk.dtype)
        # huge logits: lse = top + log(total) cannot hold log(total) next to a huge top, even in
        # float64; backward then uses lse = top and folds 1 / total into dO and delta
        rebase = (top.abs() > REBASE_ABOVE) & (total > 1.0)
        lse_b = torch.where(rebase, top, lse)
        factor = torch.where(rebase, total.reciprocal(), torch.ones_like(total)) if bool(rebase.any()) else None
        ctx.save_for_backward(qk, v, pos, order, bkt, out, lse_b, self_only, factor)  # float64 lse
        ctx.core, ctx.kw = core, kw
        return out, lse.to(acc)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dout: Optional[Tensor], dlse: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        qk, v, pos, order, bkt, out, lse, self_only, factor = ctx.saved_tensors
        g, n, d = qk.shape
        acc = compute_dtype(qk.dtype)
        if dout is None:
            dout = torch.zeros_like(out)
        delta = torch.empty(g, n, dtype=acc, device=qk.device)
        for g0, g1, r0, r1 in _row_slabs(g, n, d * 8):  # rowsum(dO * O) in slabs (no full-size temporary)
            delta[g0:g1, r0:r1] = torch.linalg.vecdot(dout[g0:g1, r0:r1].to(acc), out[g0:g1, r0:r1].to(acc))
        if dlse is not None:
            delta.sub_(dlse.to(acc).masked_fill(self_only | (pos < 0), 0.0))
        do_rounds = dout.contiguous()  # the cores read rows of a flat view (an expanded dO is copied once)
        if factor is not None:  # see forward: p = exp(s - top) / total
            do_rounds = dout * factor.to(dout.dtype if dout.dtype == torch.float64 else acc).unsqueeze(-1)
            delta = delta * factor.to(acc)
        dqk = torch.zeros(g, n, d, dtype=acc, device=qk.device)
        dv = torch.zeros_like(dqk)
        for r in range(order.shape[0]):
            ctx.core.backward_round(qk, v, pos, order[r], bkt[r], do_rounds, lse, delta, dqk, dv, **ctx.kw)
        if bool(self_only.any()):
            dv[self_only] += dout[self_only].to(acc)
        return dqk.to(qk.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def sort_rounds(buckets: Tensor, key_padding_mask: Optional[Tensor], n_total: int) -> tuple[Tensor, Tensor]:
    """Per-round order of positions by (bucket, position), padding last.

    buckets: ``(B, H, R, N)`` int; key_padding_mask: ``(B, N)`` bool (True = padding: those
    positions go to an extra bucket ``n_total``, after all others). Returns order and sorted
    bucket ids, both ``(R, B*H, N)`` int32: ``order[r, g, s]`` is the position at sorted slot s.
    """
    b, h, r, n = buckets.shape
    if key_padding_mask is not None:
        buckets = buckets.masked_fill(key_padding_mask[:, None, None, :], n_total)
    keys = buckets.to(torch.int32).permute(2, 0, 1, 3).reshape(r, b * h, n)
    bkt, order = torch.sort(keys, dim=-1, stable=True)  # ties keep position order
    return order.to(torch.int32), bkt


def align_buckets(order: Tensor, bkt: Tensor, bucket_size: int) -> tuple[Tensor, Tensor]:
    """The aligned layout of ``causal_mode="bucket"`` (docs/lsh.md, "Causal modes").

    order, bkt: ``(R, G, N)`` int32 from :func:`sort_rounds`. Every bucket's run of sorted
    positions is moved to start at a slot that is a multiple of ``bucket_size``: the element of
    rank ``r`` in its bucket goes to slot ``aligned_start(bucket) + r``, where the aligned start
    is the previous bucket's aligned start plus its count rounded up to a multiple of
    ``bucket_size``. The slots in between are holes: order ``-1`` and bkt ``-1``. Returns order
    and bkt ``(R, G, S)`` int32 with ``S`` the largest slot count of any round and group, rounded
    up to a multiple of ``bucket_size`` (holes at the end of shorter ones); ``S <= N + (number
    of occupied buckets) * (bucket_size - 1)``. A query's row inside its chunk and the slots of
    its keys in its window then depend only on its own bucket's history.
    """
    r, g, n = order.shape
    dev = order.device
    bk = bkt.long()
    idx = torch.arange(n, device=dev).expand(r, g, n)
    first = torch.ones(r, g, n, dtype=torch.bool, device=dev)
    first[..., 1:] = bk[..., 1:] != bk[..., :-1]  # the first element of a bucket's run
    run_start = torch.where(first, idx, 0).cummax(dim=-1).values
    rank = idx - run_start  # rank inside the bucket
    # at each run start, the holes after the previous run: (-count of the previous run) mod bucket_size
    holes = torch.zeros(r, g, n, dtype=torch.long, device=dev)
    holes[..., 1:] = torch.where(first[..., 1:], (-(rank[..., :-1] + 1)).remainder(bucket_size), 0)
    slot = idx + holes.cumsum_(dim=-1)
    s = padded_length(int(slot[..., -1].max()) + 1, bucket_size)
    order_a = torch.full((r, g, s), -1, dtype=torch.int32, device=dev).scatter_(-1, slot, order)
    bkt_a = torch.full((r, g, s), -1, dtype=torch.int32, device=dev).scatter_(-1, slot, bkt)
    return order_a, bkt_a


def lsh_attention_rounds(
    qk: Tensor,
    v: Tensor,
    *,
    core: LSHCore,
    bucket_size: int,
    causal: bool,
    causal_mode: str,
    key_padding_mask: Optional[Tensor],
    rotations: Tensor,
    n_buckets: Any,
    hasher: Optional[Callable[..., Tensor]] = None,
) -> tuple[Tensor, Tensor]:
    """Hash, sort and run :class:`LSHAttentionFunction` on validated inputs.

    qk, v: ``(B, H, N, D)`` (padded positions already zeroed); key_padding_mask: ``(B, N)`` bool or
    None; rotations: ``(H, D, n_hashes, W)`` for ``n_buckets`` (int or pair); hasher: a function
    with :func:`~reformer.kernels.hashing.hash_buckets`'s signature (default: that one). Returns out
    ``(B, H, N, D)`` and lse ``(B, H, N)``.
    """
    b, h, n, d = qk.shape
    with torch.no_grad():
        buckets = (hasher or hash_buckets)(qk.detach(), rotations, n_buckets, dtype=torch.int32)
        order, bkt = sort_rounds(buckets, key_padding_mask, total_buckets(n_buckets))
        del buckets
        if causal and causal_mode == "bucket":
            order, bkt = align_buckets(order, bkt, bucket_size)
        pos = torch.arange(n, dtype=torch.int32, device=qk.device).expand(b, h, n)
        if key_padding_mask is not None:
            pos = pos.masked_fill(key_padding_mask[:, None, :], -1)
        pos = pos.reshape(b * h, n)
    out, lse = LSHAttentionFunction.apply(
        qk.reshape(b * h, n, d), v.reshape(b * h, n, d), pos, order, bkt, core, bucket_size, causal, causal_mode
    )
    return out.view(b, h, n, d), lse.view(b, h, n)


def sorted_core_module(core: ModuleType) -> SortedCoreAdapter:
    """The round-level protocol for a sorted core module (``ref_lsh``, ``triton_lsh``)."""
    return SortedCoreAdapter(core)
