"""Pure-PyTorch core of shared-QK LSH attention: one hash round (any device, any float dtype).

This module is both kinds of core of docs/lsh.md ("The core seam"):

- the **round-level core** (what ``lsh_attention(backend="torch")`` runs):
  ``forward_round(qk, v, pos, order, bkt, out, top, total, *, bucket_size, causal, causal_mode, scale)``
  and ``backward_round(qk, v, pos, order, bkt, do, lse, delta, dqk, dv, ...)`` on UNSORTED rows
  ``(G, N, D)``, reading each slab's rows through the round's sort order and merging (forward) or
  scatter-adding (backward) its results straight into the unsorted accumulators;
- the **sorted per-round core**: ``fwd(qk, v, pos, bkt, ...) -> (out, lse)`` and
  ``bwd(qk, v, pos, bkt, do, lse, delta, ...) -> (dqk, dv)`` on rows already sorted by
  (bucket, position) and padded to ``Np``, a multiple of ``bucket_size`` (for
  ``lsh_function.SortedCoreAdapter``; the same slab code with the identity order).

pos is ``-1`` for padding; bkt is the bucket id per sorted slot. In bucket mode the order may be
the aligned layout (``lsh_function.align_buckets``: ``S >= N`` slots, holes with order and bkt
-1, treated as padding and never written back), and a row's backward gradient is added in two
fixed parts, own chunk then look-back (:func:`_bucket_backward`), so outputs and gradients do
not depend on where slab boundaries fall (docs/lsh.md, "Causal modes"). Keys are
``qk / max(||qk||, KEY_EPS)``, logits ``q.k * scale``. Permitted keys of query slot i (the own
position never is):

- chunk mode (``causal=False``, or ``causal_mode="chunk"``): the slots of i's chunk
  (``bucket_size`` consecutive slots) and of the chunk before it (chunk 0 looks back at the last
  chunk; a single chunk attends to itself once); not padding; when causal, ``pos_j <= pos_i``;
- bucket mode (``causal=True, causal_mode="bucket"``): slots j with ``bkt_j == bkt_i``,
  ``i - bucket_size < j < i`` and ``pos_j != -1`` (no wrap-around).

A row with no permitted key (padding rows, a position alone in its window) gets out 0 and
lse -inf.

Slabs: a round is processed in slabs of about ``SLAB_LOGITS_BYTES`` of logits: a range of chunks
of one group, or several whole groups when a group has few chunks. A slab gathers only its own
rows (its chunks and the look-back chunk before them) from the unsorted inputs into one local
sequence; the key windows (look-back chunk + own chunk) are overlapping strided views of it, so
each slab is a few batched matmuls and no row is copied twice. Everything a slab allocates is
bounded by the slab size, whatever N: beyond the caller's accumulators, a round needs O(slab)
memory. Logits are float32 for float16/bfloat16 inputs (float64 for float64).
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from .hashing import KEY_EPS, compute_dtype, padded_length

SLAB_LOGITS_BYTES = 2 * 2**20  # logits of one slab (smaller slabs stay in cache; 1 = one chunk per slab)
NEG_INF = float("-inf")


def key_norms(x: Tensor) -> Tensor:
    """``||x||_2`` over the last dim, without overflow for large finite rows (``x`` in its compute
    dtype): rows whose plain norm overflows are rescaled by their largest entry first."""
    norm = torch.linalg.vector_norm(x, dim=-1)
    big = torch.isinf(norm)
    if bool(big.any()):
        rows = x[big]
        top = rows.abs().amax(dim=-1, keepdim=True)
        norm[big] = top.squeeze(-1) * torch.linalg.vector_norm(rows / top, dim=-1)
    return norm


class _Slab:
    """The rows of one slab, gathered into a flat local sequence of ``T`` chunks.

    Per group of the slab the local sequence is the look-back chunk followed by the slab's chunks
    (``single``: the one chunk alone). Query chunk ``j`` (local chunks ``q0..T-1``, ``q0 = 1``, or
    0 when single) has the key window local chunks ``j-1, j`` (``K = 2 * bs`` slots; ``K = bs``
    when single), a strided view. Look-back chunks are no queries (``pos_q = -1``; with several
    groups a group's look-back chunk sits inside the sequence and is computed fully masked).
    """

    def __init__(self, rnd: "_Round", g0: int, g1: int, c0: int, c1: int):
        bs, dev = rnd.bs, rnd.device
        self.rnd = rnd
        if rnd.single:
            slots = torch.arange(bs, device=dev)
        else:
            slots = torch.arange((c0 - 1) * bs, c1 * bs, device=dev).remainder_(rnd.n_pad)
        real = slots < rnd.n  # padding slots (>= n) read a real row but count as padding
        groups = torch.arange(g0, g1, device=dev).mul_(rnd.rows_per_group).unsqueeze(-1)
        order = rnd.order[g0:g1].index_select(1, slots.clamp(max=rnd.n - 1))
        hole = None
        if rnd.bucket_mode:  # the aligned layout's holes (order -1): no row, pos -1, bkt -1
            hole = order < 0
            order = order.clamp_min(0)
        self.rows = (order.long() + groups).reshape(-1)
        pos = rnd.pos.index_select(0, self.rows).view(g1 - g0, -1)
        padded = not bool(real.all())
        if padded:
            pos = pos.masked_fill(~real, -1)
        if hole is not None:
            pos.masked_fill_(hole, -1)
        if rnd.bucket_mode and c0 == 0:  # chunk 0 has no look-back in bucket mode
            pos[:, :bs] = -1
        self.pos = pos.reshape(-1)  # key role (int32)
        self.bkt = None
        if rnd.bucket_mode:
            bkt = rnd.bkt[g0:g1].index_select(1, slots.clamp(max=rnd.n - 1))
            self.bkt = (bkt.masked_fill(~real, -1) if padded else bkt).reshape(-1)
        self.pad_rows = (~real).repeat(g1 - g0) if padded else None
        if hole is not None:
            self.pad_rows = hole.reshape(-1) if self.pad_rows is None else self.pad_rows | hole.reshape(-1)
        self.q0 = 0 if rnd.single else 1
        self.n_chunks = self.rows.numel() // bs
        self.nq = self.n_chunks - self.q0  # query chunks
        self.multi = g1 - g0 > 1 and not rnd.single
        if self.multi:  # look-back chunks of groups 2.. lie inside the sequence: no queries
            pos_q = self.pos.view(g1 - g0, -1).clone()
            pos_q[:, :bs] = -1
            self.pos_q = pos_q.reshape(-1)[self.q0 * bs:]
        else:
            self.pos_q = self.pos[self.q0 * bs:]
        self.masked = padded or self.multi or bool((self.pos < 0).any())
        # rows each slab owns (every row once; padding slots never): forward merges its queries'
        # rows; backward scatter-adds its local rows, the look-back chunk folded into the last
        # chunk when both are the same chunk (a slab spanning a whole group)
        length, pad = slots.numel(), rnd.n_pad - rnd.n
        self.groups, self.length = g1 - g0, length
        tail = pad if c1 == rnd.n_chunks else 0
        self.fold = not rnd.single and c0 == 0 and c1 == rnd.n_chunks
        if rnd.bucket_mode:  # rows are data-dependent (holes): keep the real query rows
            self.query_keep = torch.nonzero(self.pos_q >= 0).squeeze(-1)
            # look-back rows: real keys whose next local chunk is a query chunk of their group
            lookback = self.pos[:-bs] >= 0
            if self.multi:
                ends = torch.arange(1, self.nq + 1, device=dev).remainder_(length // bs) == 0
                lookback = lookback.view(self.nq, bs).masked_fill_(ends.unsqueeze(-1), False).view(-1)
            self.lookback_keep = torch.nonzero(lookback).squeeze(-1)
            return
        if rnd.single:
            queries = rows = [(0, bs - pad)]
        else:
            queries = [(bs, length - tail)]
            rows = queries if self.fold else [(0, bs - (pad if c0 == 0 else 0)), (bs, length - tail)]
        self.query_keep = self._index(queries, g1 - g0, length, self.q0 * bs)
        self.row_keep = self._index(rows, g1 - g0, length, 0)

    def _index(self, ranges: list[tuple[int, int]], groups: int, length: int, shift: int) -> Optional[Tensor]:
        """Indices ``group * length + i - shift`` for ``i`` in ``ranges`` of every group, or None
        when that is every index of an array of ``groups * length - shift`` rows."""
        merged = [list(ranges[0])]
        for a, b in ranges[1:]:
            if a == merged[-1][1]:
                merged[-1][1] = b
            else:
                merged.append([a, b])
        if merged == [[shift, length]] and (groups == 1 or shift == 0):
            return None
        dev = self.rnd.device
        within = torch.cat([torch.arange(a, b, device=dev) for a, b in ranges]) - shift
        return (torch.arange(groups, device=dev).mul_(length).unsqueeze(-1) + within).reshape(-1)

    @staticmethod
    def owned(x: Tensor, keep: Optional[Tensor]) -> Tensor:
        """The rows ``keep`` of a per-row tensor (all of them when None)."""
        return x if keep is None else x.index_select(0, keep)

    def fold_lookback(self, grad: Tensor) -> Tensor:
        """Local row gradients ``(T*bs, D)`` with the look-back chunk's added to the last chunk's
        when the slab spans whole groups (the look-back chunk then is the group's last chunk)."""
        if self.fold:
            g3 = grad.view(self.groups, self.length, grad.shape[-1])
            g3[:, -self.rnd.bs:] += g3[:, :self.rnd.bs]
        return grad

    # --- rows and views ----------------------------------------------------------------------
    def gather(self, x: Tensor) -> Tensor:
        """This slab's rows of an unsorted ``(G*Nr, D)`` tensor, in the compute dtype (padding
        slots zero)."""
        rows = x.index_select(0, self.rows).to(self.rnd.dtype)
        if self.pad_rows is not None:
            rows.masked_fill_(self.pad_rows.unsqueeze(-1), 0.0)
        return rows

    def queries(self, x: Tensor) -> Tensor:
        """``(nq, bs, ...)`` view of the query chunks of a local ``(T*bs, ...)`` tensor."""
        bs = self.rnd.bs
        return x[self.q0 * bs:].view(self.nq, bs, *x.shape[1:])

    def windows(self, x: Tensor) -> Tensor:
        """``(nq, K, ...)`` key windows (strided, overlapping views) of a local ``(T*bs, ...)`` tensor."""
        rnd = self.rnd
        if rnd.single:
            return x.view(self.nq, rnd.bs, *x.shape[1:])
        inner = x[0].numel() if x.dim() > 1 else 1
        return x.as_strided((self.nq, rnd.window, *x.shape[1:]), (rnd.bs * inner, *x.stride()))

    def fold_windows(self, w: Tensor) -> Tensor:
        """Window-shaped gradients ``(nq, K, D)`` summed onto the local rows ``(T*bs, D)``."""
        bs = self.rnd.bs
        if self.rnd.single:
            return w.reshape(-1, w.shape[-1])
        acc = w.new_empty(self.n_chunks * bs, w.shape[-1])
        acc[bs:].copy_(w[:, bs:].reshape(-1, w.shape[-1]))
        acc[:bs].zero_()
        acc[:-bs].add_(w[:, :bs].reshape(-1, w.shape[-1]))
        return acc

    # --- logits ------------------------------------------------------------------------------
    def logits(self, q: Tensor, k_scaled: Tensor) -> Tensor:
        """Masked logits ``(nq, bs, K)`` of the query chunks ``q (nq, bs, D)`` against the windows
        of the scaled keys: every non-permitted pair (own position included) is -inf."""
        rnd = self.rnd
        s = torch.bmm(q, self.windows(k_scaled).transpose(-1, -2))
        pos_q = self.pos_q.view(self.nq, rnd.bs, 1)
        pos_k = self.windows(self.pos).unsqueeze(1)  # (nq, 1, K)
        if rnd.bucket_mode:  # per slot first: a non-key gets bucket -2, a non-query -3 (never equal)
            bkt_k = self.bkt.masked_fill(self.pos < 0, -2)
            bkt_q = self.queries(self.bkt).masked_fill(self.pos_q.view(self.nq, rnd.bs) < 0, -3).unsqueeze(-1)
            bad = torch.ne(self.windows(bkt_k).unsqueeze(1), bkt_q).logical_or_(rnd.band_out)
            return s.masked_fill_(bad, NEG_INF)
        s.diagonal(rnd.window - rnd.bs, -2, -1).fill_(NEG_INF)  # own position: last block's diagonal
        if rnd.causal:
            s.masked_fill_(pos_k > pos_q, NEG_INF)
        if self.masked:
            s.masked_fill_((pos_k < 0) | (pos_q < 0), NEG_INF)
        return s

    def keys(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Scaled keys ``x * scale / max(||x||, KEY_EPS)`` of local rows ``x (L, D)``, the
        inverse norms ``1 / max(||x||, KEY_EPS)`` and whether ``||x|| > KEY_EPS`` (not clamped)."""
        norm = key_norms(x)
        inv = 1.0 / norm.clamp_min(KEY_EPS)
        return x * (inv * self.rnd.scale).unsqueeze(-1), inv, norm > KEY_EPS


class _Round:
    """One round's geometry: ``G`` groups of ``rows_per_group`` unsorted rows, ``n`` sorted
    slots per group (slot s holds row ``order[g, s]``) padded to ``n_pad``."""

    def __init__(self, qk: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, bucket_size: int, causal: bool,
                 causal_mode: str, scale: float):
        g, rows, _ = qk.shape
        self.g, self.rows_per_group, self.n = g, rows, order.shape[1]
        self.bs, self.scale, self.device = bucket_size, scale, qk.device
        self.n_pad = padded_length(self.n, bucket_size)
        self.n_chunks = self.n_pad // bucket_size
        self.dtype = compute_dtype(qk.dtype)
        self.causal, self.bucket_mode = causal, causal and causal_mode == "bucket"
        self.single = self.n_chunks == 1 and not self.bucket_mode
        self.window = bucket_size if self.single else 2 * bucket_size
        self.order, self.bkt = order, bkt
        self.pos = pos.reshape(-1)
        if self.bucket_mode:
            a = torch.arange(bucket_size, device=qk.device)[:, None]
            b = torch.arange(2 * bucket_size, device=qk.device)[None, :]
            self.band_out = (b <= a) | (b >= a + bucket_size)  # (bs, 2bs): outside i - bs < j < i

    def slabs(self) -> Iterator[_Slab]:
        """Slabs of about ``SLAB_LOGITS_BYTES`` of logits: several whole groups when a group has
        no more chunks than a slab holds, else chunk ranges of one group."""
        per_chunk = self.bs * self.window * torch.finfo(self.dtype).bits // 8
        step = max(1, SLAB_LOGITS_BYTES // per_chunk)  # query chunks per slab
        if self.n_chunks <= step:
            groups = max(1, step // self.n_chunks)
            for g0 in range(0, self.g, groups):
                yield _Slab(self, g0, min(self.g, g0 + groups), 0, self.n_chunks)
        else:
            for g0 in range(self.g):
                for c0 in range(0, self.n_chunks, step):
                    yield _Slab(self, g0, g0 + 1, c0, min(self.n_chunks, c0 + step))


def _forward_slabs(qk: Tensor, v: Tensor, rnd: _Round) -> Iterator[tuple[_Slab, Tensor, Tensor]]:
    """Per slab: the slab, its queries' out ``(nq*bs, D)`` (compute dtype) and lse ``(nq*bs,)``
    (float64: the max logit plus the log of the sum, so huge logits lose no digits)."""
    x_all, v_all = qk.reshape(-1, qk.shape[-1]), v.reshape(-1, v.shape[-1])
    for slab in rnd.slabs():
        x = slab.gather(x_all)
        k_scaled, _, _ = slab.keys(x)
        s = slab.logits(slab.queries(x), k_scaled)
        top = s.amax(dim=-1, keepdim=True)
        top.masked_fill_(top == NEG_INF, 0.0)
        p = s.sub_(top).exp_()
        total = p.sum(dim=-1, keepdim=True)
        o = torch.bmm(p, slab.windows(slab.gather(v_all))).div_(total.masked_fill(total == 0, 1.0))
        lse = top.double().add_(total.double().log_())
        yield slab, o.view(-1, o.shape[-1]), lse.view(-1)


def _backward_slabs(qk: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, rnd: _Round
                    ) -> Iterator[tuple[_Slab, list[tuple[Tensor, Tensor, Tensor]]]]:
    """Per slab: the slab and its gradients w.r.t. qk and v as parts ``(rows, dqk, dv)`` to add
    at the unsorted ``rows`` in that order (chunk mode: one part, the local rows with the
    look-back chunk folded in; bucket mode: :func:`_bucket_backward`). ``do``, ``lse``, ``delta``
    are per unsorted row; lse is the COMBINED lse (float64 used to full precision)."""
    d = qk.shape[-1]
    x_all, v_all, do_all = qk.reshape(-1, d), v.reshape(-1, d), do.reshape(-1, d)
    lse_all, delta_all = lse.reshape(-1), delta.reshape(-1)
    for slab in rnd.slabs():
        q_rows = slab.rows[slab.q0 * rnd.bs:]
        x = slab.gather(x_all)
        k_scaled, inv, norm_ok = slab.keys(x)
        q = slab.queries(x)
        # p = exp(s - lse) with lse = hi + lo, hi = lse rounded to the compute dtype: p = exp(s - hi) * exp(-lo),
        # and the per-row factor exp(-lo) is folded into dO and delta (exact for any logit magnitude)
        lse64 = lse_all.index_select(0, q_rows).double()
        lse64.masked_fill_(lse64 == NEG_INF, 0.0)  # such rows have only -inf logits
        hi = lse64.to(rnd.dtype)
        factor = (hi.double() - lse64).exp_().to(rnd.dtype)
        d_out = do_all.index_select(0, q_rows).to(rnd.dtype).mul_(factor.unsqueeze(-1)).view(slab.nq, rnd.bs, d)
        dlt = delta_all.index_select(0, q_rows).to(rnd.dtype).mul_(factor).view(slab.nq, rnd.bs, 1)
        s = slab.logits(q, k_scaled)
        p = s.sub_(hi.view(slab.nq, rnd.bs, 1)).exp_()  # (nq, bs, K)
        if rnd.bucket_mode:
            yield slab, _bucket_backward(slab, x, q, k_scaled, inv, norm_ok, p, d_out, dlt,
                                         slab.gather(v_all))
            continue
        dv = slab.fold_windows(torch.bmm(p.transpose(-1, -2), d_out))
        ds = torch.bmm(d_out, slab.windows(slab.gather(v_all)).transpose(-1, -2)).sub_(dlt).mul_(p)
        dq = torch.bmm(ds, slab.windows(k_scaled))  # d/dq of q . (k * scale)
        dk = slab.fold_windows(torch.bmm(ds.transpose(-1, -2), q)).mul_(rnd.scale)  # w.r.t. unit keys
        dqk = _chain_key(dk, x, inv, norm_ok)
        dqk[slab.q0 * rnd.bs:].add_(dq.view(-1, d))
        rows = slab.owned(slab.rows, slab.row_keep)
        yield slab, [(rows, slab.owned(slab.fold_lookback(dqk), slab.row_keep),
                      slab.owned(slab.fold_lookback(dv), slab.row_keep))]


def _chain_key(dk: Tensor, x: Tensor, inv: Tensor, norm_ok: Tensor) -> Tensor:
    """Key gradient ``dk`` (w.r.t. unit keys) chained through ``k = x / max(||x||, KEY_EPS)``:
    ``dx = (dk - k (k.dk)) / ||x||``, or ``dk / KEY_EPS`` where the norm is clamped (in place on dk)."""
    k = x * inv.unsqueeze(-1)
    radial = torch.linalg.vecdot(k, dk).mul_(norm_ok).unsqueeze(-1)
    return dk.sub_(k.mul_(radial)).mul_(inv.unsqueeze(-1))


def _bucket_backward(slab: _Slab, x: Tensor, q: Tensor, k_scaled: Tensor, inv: Tensor, norm_ok: Tensor, p: Tensor,
                     d_out: Tensor, dlt: Tensor, v: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
    """Bucket-mode gradients of one slab as two ordered parts ``(rows, dqk, dv)``: first each
    row's use as a query and as a key of its own chunk's queries, then its use as a key of the
    next chunk's queries (look-back). The caller adds them in that order, so a row's gradient is
    ``(acc + own) + look_back`` whether or not a slab boundary falls between the two chunks
    (docs/lsh.md, "Causal modes")."""
    bs, d = slab.rnd.bs, x.shape[-1]
    w_dv = torch.bmm(p.transpose(-1, -2), d_out)  # (nq, 2bs, D): look-back half, own half
    ds = torch.bmm(d_out, slab.windows(v).transpose(-1, -2)).sub_(dlt).mul_(p)
    dq = torch.bmm(ds, slab.windows(k_scaled))
    w_dk = torch.bmm(ds.transpose(-1, -2), q).mul_(slab.rnd.scale)  # w.r.t. unit keys
    own = _chain_key(w_dk[:, bs:].reshape(-1, d), x[bs:], inv[bs:], norm_ok[bs:]).add_(dq.view(-1, d))
    back = _chain_key(w_dk[:, :bs].reshape(-1, d), x[:-bs], inv[:-bs], norm_ok[:-bs])
    own_keep, back_keep = slab.query_keep, slab.lookback_keep
    return [(slab.rows[bs:].index_select(0, own_keep), own.index_select(0, own_keep),
             w_dv[:, bs:].reshape(-1, d).index_select(0, own_keep)),
            (slab.rows[:-bs].index_select(0, back_keep), back.index_select(0, back_keep),
             w_dv[:, :bs].reshape(-1, d).index_select(0, back_keep))]


def _add_rows(acc: Tensor, rows: Tensor, vals: Tensor) -> None:
    """``acc[rows] += vals`` for distinct ``rows`` of a ``(R, D)`` accumulator."""
    acc.index_add_(0, rows, vals.to(acc.dtype))


def _add_backward(dqk: Tensor, dv: Tensor, slabs: Iterator[tuple[_Slab, list[tuple[Tensor, Tensor, Tensor]]]]) -> None:
    """Adds every slab's gradient parts ``(rows, dqk, dv)``, in order, into ``(R, D)`` views."""
    for _, parts in slabs:
        for rows, dqk_r, dv_r in parts:
            _add_rows(dqk, rows, dqk_r)
            _add_rows(dv, rows, dv_r)


# --- round-level core (unsorted rows read through the order) -------------------------------------
def forward_round(qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, out: Tensor, top: Tensor,
                  total: Tensor, *, bucket_size: int, causal: bool, causal_mode: str, scale: float) -> None:
    """Merge this round into the running sums in place (``lsh_function.LSHCore``): ``top (G, N)``
    is the largest round lse so far, ``out (G, N, D) = sum_r exp(lse_r - top) out_r`` and
    ``total (G, N) = sum_r exp(lse_r - top)`` (top, total float64)."""
    rnd = _Round(qk, pos, order, bkt, bucket_size, causal, causal_mode, scale)
    d = out.shape[-1]
    out_all, top_all, total_all = out.view(-1, d), top.view(-1), total.view(-1)
    for slab, o, lse in _forward_slabs(qk, v, rnd):
        keep = slab.query_keep  # every real query row once
        rows = slab.owned(slab.rows[slab.q0 * rnd.bs:], keep)
        o, lse = slab.owned(o, keep), slab.owned(lse, keep)
        old_top = top_all.index_select(0, rows)
        new_top = torch.maximum(old_top, lse)
        base = new_top.masked_fill(new_top == NEG_INF, 0.0)
        w_old = old_top.sub_(base).exp_()  # weights of the sums so far ...
        w_new = lse.sub_(base).exp_()  # ... and of this round
        total_all.index_copy_(0, rows, total_all.index_select(0, rows).mul_(w_old).add_(w_new))
        top_all.index_copy_(0, rows, new_top)
        acc = out_all.index_select(0, rows).mul_(w_old.to(out.dtype).unsqueeze(-1))
        out_all.index_copy_(0, rows, acc.addcmul_(o.to(out.dtype), w_new.to(out.dtype).unsqueeze(-1)))


def backward_round(qk: Tensor, v: Tensor, pos: Tensor, order: Tensor, bkt: Tensor, do: Tensor, lse: Tensor,
                   delta: Tensor, dqk: Tensor, dv: Tensor, *, bucket_size: int, causal: bool, causal_mode: str,
                   scale: float) -> None:
    """Add this round's gradients into ``dqk, dv (G, N, D)`` at unsorted positions, given the
    combined ``lse (G, N)`` and ``delta = rowsum(dO * O) - dlse (G, N)`` (``lsh_function.LSHCore``)."""
    rnd = _Round(qk, pos, order, bkt, bucket_size, causal, causal_mode, scale)
    d = dqk.shape[-1]
    _add_backward(dqk.view(-1, d), dv.view(-1, d), _backward_slabs(qk, v, do, lse, delta, rnd))


# --- sorted per-round core (rows already in sorted order) --------------------------------------
def _sorted_round(qk: Tensor, pos: Tensor, bkt: Tensor, bucket_size: int, causal: bool, causal_mode: str,
                  scale: float) -> _Round:
    g, n_pad, _ = qk.shape
    identity = torch.arange(n_pad, dtype=torch.int32, device=qk.device).expand(g, n_pad)
    return _Round(qk, pos.to(torch.int32), identity, bkt.to(torch.int32), bucket_size, causal, causal_mode, scale)


def fwd(qk: Tensor, v: Tensor, pos: Tensor, bkt: Tensor, *, bucket_size: int, causal: bool, causal_mode: str,
        scale: float) -> tuple[Tensor, Tensor]:
    """One round's attention on sorted rows (see the module docstring for the permitted keys).

    Returns out ``(G, Np, D)`` (input dtype) and lse ``(G, Np)`` (float64, whatever the input
    dtype; -inf where a row has no permitted key, and then out is 0).
    """
    rnd = _sorted_round(qk, pos, bkt, bucket_size, causal, causal_mode, scale)
    d = qk.shape[-1]
    out = torch.zeros(qk.shape, dtype=rnd.dtype, device=qk.device)
    lse_out = torch.full(qk.shape[:2], NEG_INF, dtype=torch.float64, device=qk.device)
    for slab, o, lse in _forward_slabs(qk, v, rnd):
        rows = slab.owned(slab.rows[slab.q0 * rnd.bs:], slab.query_keep)
        out.view(-1, d).index_copy_(0, rows, slab.owned(o, slab.query_keep))
        lse_out.view(-1).index_copy_(0, rows, slab.owned(lse, slab.query_keep))
    return out.to(qk.dtype), lse_out


def bwd(qk: Tensor, v: Tensor, pos: Tensor, bkt: Tensor, do: Tensor, lse: Tensor, delta: Tensor, *,
        bucket_size: int, causal: bool, causal_mode: str, scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of one round on sorted rows given the COMBINED (all rounds) lse and ``delta``
    (see docs/lsh.md, "The core seam": ``delta = rowsum(dO * O) - dlse``).

    qk, v, do: ``(G, Np, D)``; pos, bkt: ``(G, Np)``; lse, delta: ``(G, Np)`` in this round's order
    (lse -inf = no key: p = 0; a float64 lse is used to full precision). With ``p = exp(s - lse)``:
    ``dv += p^T dO``, ``ds = p (dO v^T - delta)``, ``dq = ds k``, ``dk = ds^T q``, and dk is chained
    through ``k = qk / max(||qk||, KEY_EPS)`` into dqk. Returns dqk, dv ``(G, Np, D)`` in float32
    (float64 for float64 inputs).
    """
    rnd = _sorted_round(qk, pos, bkt, bucket_size, causal, causal_mode, scale)
    d = qk.shape[-1]
    dqk = torch.zeros(qk.shape, dtype=rnd.dtype, device=qk.device)
    dv = torch.zeros_like(dqk)
    _add_backward(dqk.view(-1, d), dv.view(-1, d), _backward_slabs(qk, v, do, lse, delta, rnd))
    return dqk, dv
