"""Pure-PyTorch sorted core of shared-QK LSH attention: one hash round (any device, any float dtype).

This module implements the *sorted per-round core* of docs/lsh.md ("The core seam"):

``fwd(qk, v, pos, bkt, *, bucket_size, causal, causal_mode, scale) -> (out, lse)`` and
``bwd(qk, v, pos, bkt, do, lse, delta, *, bucket_size, causal, causal_mode, scale) -> (dqk, dv)``.

qk, v, do are ``(G, Np, D)`` rows already sorted by (bucket, position) and padded to ``Np``, a
multiple of ``bucket_size``; pos ``(G, Np)`` int32 original positions (-1 = padding); bkt
``(G, Np)`` int32 bucket id per sorted slot. Keys are ``qk / max(||qk||, KEY_EPS)``, logits
``q.k * scale``. Permitted keys of query slot i (the own position never is):

- chunk mode (``causal=False``, or ``causal_mode="chunk"``): the slots of i's chunk
  (``bucket_size`` consecutive slots) and of the chunk before it (chunk 0 looks back at the last
  chunk; a single chunk attends to itself once); not padding; when causal, ``pos_j <= pos_i``;
- bucket mode (``causal=True, causal_mode="bucket"``): slots j with ``bkt_j == bkt_i``,
  ``i - bucket_size < j < i`` and ``pos_j != -1`` (no wrap-around).

A row with no permitted key (padding rows, a position alone in its window) gets out 0 and
lse -inf. The window of chunk c is the ``2 * bucket_size`` slots of chunks c-1 and c; chunks
are processed in slabs (one batched matmul each, windows are strided views, not copies)
holding about ``SLAB_LOGITS_BYTES`` of logits, so the working memory is independent of N.
Logits are float32 for float16/bfloat16 inputs (float64 for float64).
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import Tensor

from .hashing import KEY_EPS, compute_dtype

SLAB_LOGITS_BYTES = 8 * 2**20
MIN_CHUNKS_PER_GROUP_SLAB = 16  # below this, slabs span several groups (one matmul over copied windows)
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


class _Round:
    """One sorted round: normalised keys and the chunk slabs.

    Window of chunk c (``K = 2 * bs`` slots): chunk c-1 then chunk c. Chunk 0's window is built
    separately (its look-back is the last chunk, or nothing in bucket mode); chunks 1.. are
    strided views of the sorted rows. With a single chunk in chunk mode the window is the chunk
    itself (``K = bs``).
    """

    def __init__(self, qk: Tensor, v: Tensor, pos: Tensor, bkt: Tensor, bucket_size: int, causal: bool,
                 causal_mode: str, scale: float):
        g, n_pad, d = qk.shape
        self.g, self.n_pad, self.d, self.bs = g, n_pad, d, bucket_size
        self.n_chunks = n_pad // bucket_size
        self.dtype = compute_dtype(qk.dtype)
        self.causal, self.bucket_mode = causal, causal and causal_mode == "bucket"
        self.scale = scale
        self.x = qk.to(self.dtype).contiguous()  # raw queries
        self.v = v.to(self.dtype).contiguous()
        self.pos = pos.contiguous()
        self.bkt = bkt.to(torch.int32).contiguous()
        norm = key_norms(self.x)
        self.norm_ok = norm > KEY_EPS  # keys not clamped by KEY_EPS
        self.inv_norm = 1.0 / norm.clamp_min(KEY_EPS)
        self.k = self.x * self.inv_norm.unsqueeze(-1)  # normalised keys (G, Np, D)
        self.single = self.n_chunks == 1 and not self.bucket_mode
        self.window = bucket_size if self.single else 2 * bucket_size
        if self.bucket_mode:
            a = torch.arange(bucket_size, device=qk.device)[:, None]
            b = torch.arange(2 * bucket_size, device=qk.device)[None, :]
            self.band_out = (b <= a) | (b >= a + bucket_size)  # (bs, 2bs): outside i - bs < j < i

    # --- slabs -------------------------------------------------------------------------------
    def slabs(self) -> Iterator[tuple[slice, int, int]]:
        """``(groups, c0, c1)``: chunk 0 of every group first (``c0 = 0, c1 = 1``), then chunks
        ``1..C-1`` of one group in slabs of about ``SLAB_LOGITS_BYTES`` of logits (the windows are
        then strided views handed to ``bmm``), or several whole groups per slab when a group has
        fewer than ``MIN_CHUNKS_PER_GROUP_SLAB`` chunks."""
        yield slice(0, self.g), 0, 1
        rest = self.n_chunks - 1
        if rest == 0:
            return
        per_chunk = self.bs * self.window * torch.finfo(self.dtype).bits // 8
        step = max(1, SLAB_LOGITS_BYTES // per_chunk)
        if rest < MIN_CHUNKS_PER_GROUP_SLAB:  # few chunks: several whole groups per slab (copied windows)
            groups = max(1, step // rest)
            for g0 in range(0, self.g, groups):
                yield slice(g0, min(self.g, g0 + groups)), 1, self.n_chunks
        else:
            for g0 in range(self.g):
                for c0 in range(1, self.n_chunks, step):
                    yield slice(g0, g0 + 1), c0, min(self.n_chunks, c0 + step)

    def rows(self, x: Tensor, gs: slice, c0: int, c1: int) -> Tensor:
        """Rows of chunks ``c0..c1-1`` of groups ``gs`` of a per-slot tensor ``(G, Np, ...)``:
        ``(g, n, bs, ...)``."""
        y = x[gs, c0 * self.bs:c1 * self.bs]
        return y.reshape(y.shape[0], c1 - c0, self.bs, *x.shape[2:])

    def windows(self, x: Tensor, gs: slice, c0: int, c1: int, fill: Optional[float] = None) -> Tensor:
        """Key-side windows ``(g, n, K, ...)`` of a per-slot tensor ``x (G, Np, ...)``.

        Chunks >= 1: strided (overlapping) views. Chunk 0: the last chunk (``fill`` in bucket
        mode, where chunk 0 has no look-back) followed by chunk 0; or chunk 0 alone if single."""
        bs = self.bs
        if c0 == 0:
            first = x[gs, :bs]
            if self.single:
                return first.unsqueeze(1)
            prev = x[gs, -bs:] if fill is None or not self.bucket_mode else torch.full_like(first, fill)
            return torch.cat([prev, first], dim=1).unsqueeze(1)
        tail = x.shape[2:]
        inner = 1
        for t in tail:
            inner *= t
        base = x[gs]
        return base.as_strided(
            (base.shape[0], c1 - c0, 2 * bs, *tail),
            (x.stride(0), bs * inner, *([inner] if tail else [1]), *x.stride()[2:]),
            base.storage_offset() + (c0 - 1) * bs * inner,
        )

    def logits(self, q: Tensor, k: Tensor, gs: slice, c0: int, c1: int) -> Tensor:
        """Masked logits ``(g, n, bs, K)`` of the slab's queries ``q (g, n, bs, D)`` against its key
        windows ``k (g, n, K, D)``: every non-permitted pair (own position included) is -inf."""
        s = _matmul(q, k.transpose(-1, -2)).mul_(self.scale)
        pos_q = self.rows(self.pos, gs, c0, c1).unsqueeze(-1)  # (g, n, bs, 1)
        pos_k = self.windows(self.pos, gs, c0, c1, fill=-1).unsqueeze(-2)  # (g, n, 1, K)
        if self.bucket_mode:
            bkt_q = self.rows(self.bkt, gs, c0, c1).unsqueeze(-1)
            bkt_k = self.windows(self.bkt, gs, c0, c1, fill=-1).unsqueeze(-2)
            bad = (bkt_k != bkt_q) | self.band_out | (pos_k < 0) | (pos_q < 0)
            return s.masked_fill_(bad, NEG_INF)
        s.diagonal(self.window - self.bs, -2, -1).fill_(NEG_INF)  # own position: last block's diagonal
        if self.causal:
            s.masked_fill_(pos_k > pos_q, NEG_INF)
        if bool((pos_q < 0).any()) or bool((pos_k < 0).any()):
            s.masked_fill_((pos_k < 0) | (pos_q < 0), NEG_INF)
        return s

    def add_windows(self, acc: Tensor, src: Tensor, gs: slice, c0: int, c1: int) -> None:
        """Add key-side window gradients ``src (g, n, K, D)`` back into per-slot ``acc (G, Np, D)``."""
        bs = self.bs
        if c0 == 0:
            if self.single:
                acc[gs, :bs] += src[:, 0]
                return
            acc[gs, :bs] += src[:, 0, bs:]
            if not self.bucket_mode:  # bucket mode: chunk 0's look-back half is empty
                acc[gs, -bs:] += src[:, 0, :bs]
            return
        g = src.shape[0]
        acc[gs, c0 * bs:c1 * bs] += src[:, :, bs:].reshape(g, -1, self.d)
        acc[gs, (c0 - 1) * bs:(c1 - 1) * bs] += src[:, :, :bs].reshape(g, -1, self.d)


def _matmul(a: Tensor, b: Tensor) -> Tensor:
    """Batched matmul of ``(g, n, M, K)`` by ``(g, n, K, P)``; one group goes straight to ``bmm``
    (strided window views are used in place)."""
    if a.shape[0] == 1:
        return torch.bmm(a[0], b[0]).unsqueeze(0)
    return torch.matmul(a, b)


def fwd(qk: Tensor, v: Tensor, pos: Tensor, bkt: Tensor, *, bucket_size: int, causal: bool, causal_mode: str,
        scale: float) -> tuple[Tensor, Tensor]:
    """One round's attention on sorted rows (see the module docstring for the permitted keys).

    Returns out ``(G, Np, D)`` (input dtype) and lse ``(G, Np)`` (float64, whatever the input
    dtype: the max logit plus the log of the sum, so huge logits lose no digits; -inf where a row
    has no permitted key, and then out is 0).
    """
    rnd = _Round(qk, v, pos, bkt, bucket_size, causal, causal_mode, scale)
    out = torch.empty(qk.shape, dtype=rnd.dtype, device=qk.device)
    lse = torch.empty(qk.shape[:2], dtype=torch.float64, device=qk.device)
    for gs, c0, c1 in rnd.slabs():
        s = rnd.logits(rnd.rows(rnd.x, gs, c0, c1), rnd.windows(rnd.k, gs, c0, c1), gs, c0, c1)
        top = s.amax(dim=-1, keepdim=True)
        top.masked_fill_(top == NEG_INF, 0.0)
        p = s.sub_(top).exp_()
        total = p.sum(dim=-1, keepdim=True)
        o = _matmul(p, rnd.windows(rnd.v, gs, c0, c1)).div_(total.masked_fill(total == 0, 1.0))
        rnd.rows(out, gs, c0, c1).copy_(o)
        # max logit + log(sum): in float64, so that the lse keeps every digit of a huge max logit
        rnd.rows(lse, gs, c0, c1).copy_((top.double() + total.double().log_()).squeeze(-1))
    return out.to(qk.dtype), lse


def bwd(qk: Tensor, v: Tensor, pos: Tensor, bkt: Tensor, do: Tensor, lse: Tensor, delta: Tensor, *,
        bucket_size: int, causal: bool, causal_mode: str, scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of one round given the COMBINED (all rounds) lse and ``delta`` (see docs/lsh.md,
    "Backward": ``delta = rowsum(dO * O) - dlse``).

    qk, v, do: ``(G, Np, D)``; pos, bkt: ``(G, Np)``; lse, delta: ``(G, Np)`` in this round's order
    (lse -inf = no key: p = 0; a float64 lse is used to full precision). With ``p = exp(s - lse)``: ``dv += p^T dO``,
    ``ds = p (dO v^T - delta)``, ``dq = ds k``, ``dk = ds^T q``, and dk is chained through
    ``k = qk / max(||qk||, KEY_EPS)`` into dqk. Returns dqk, dv ``(G, Np, D)`` in float32 (float64
    for float64 inputs).
    """
    rnd = _Round(qk, v, pos, bkt, bucket_size, causal, causal_mode, scale)
    dqk = torch.zeros(qk.shape, dtype=rnd.dtype, device=qk.device)
    dk = torch.zeros_like(dqk)  # gradient w.r.t. the normalised keys
    dv = torch.zeros_like(dqk)
    # p = exp(s - lse) with lse = hi + lo, hi = lse rounded to the compute dtype: p = exp(s - hi) * exp(-lo),
    # and the per-row factor exp(-lo) is folded into dO and delta (exact for any logit magnitude)
    lse64 = lse.double().masked_fill(lse == NEG_INF, 0.0)  # such rows have only -inf logits
    hi = lse64.to(rnd.dtype)
    factor = torch.exp(hi.double() - lse64).to(rnd.dtype)
    lse = hi
    do = do.to(rnd.dtype) * factor.unsqueeze(-1)
    delta = delta.to(rnd.dtype) * factor
    for gs, c0, c1 in rnd.slabs():
        q, d_out = rnd.rows(rnd.x, gs, c0, c1), rnd.rows(do, gs, c0, c1)
        k = rnd.windows(rnd.k, gs, c0, c1)
        s = rnd.logits(q, k, gs, c0, c1)
        p = s.sub_(rnd.rows(lse, gs, c0, c1).unsqueeze(-1)).exp_()  # (g, n, bs, K)
        rnd.add_windows(dv, _matmul(p.transpose(-1, -2), d_out), gs, c0, c1)
        ds = _matmul(d_out, rnd.windows(rnd.v, gs, c0, c1).transpose(-1, -2))
        ds.sub_(rnd.rows(delta, gs, c0, c1).unsqueeze(-1)).mul_(p).mul_(scale)
        rnd.rows(dqk, gs, c0, c1).add_(_matmul(ds, k))
        rnd.add_windows(dk, _matmul(ds.transpose(-1, -2), q), gs, c0, c1)
    # chain through k = x / max(||x||, KEY_EPS): dx = (dk - k (k.dk)) / ||x||, or dk / KEY_EPS if clamped
    radial = torch.linalg.vecdot(rnd.k, dk).mul_(rnd.norm_ok).unsqueeze(-1)
    dqk.add_(dk.sub_(rnd.k * radial).mul_(rnd.inv_norm.unsqueeze(-1)))
    return dqk, dv
