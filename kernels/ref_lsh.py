"""Pure-PyTorch core of shared-QK LSH attention: one sorted hash round (any device, any float dtype).

The rows of one round are already sorted by (bucket, position) and padded to ``Np``, a multiple
of ``bucket_size``. Chunk c (rows ``c*bs .. c*bs+bs-1``) attends to the keys of chunk c and of
chunk c-1; chunk 0 looks back to the last chunk (wrap-around); a single chunk attends to itself
once. Keys are ``qk / max(||qk||, KEY_EPS)``, logits ``q.k * scale``; key j is not permitted for
query i when ``pos_j == -1`` or (causal) ``pos_j > pos_i``; a query's own position gets the logit
``SELF_LOGIT``; a padding query (``pos_i == -1``) gets out 0 and lse -inf.

Chunks are processed in slabs holding about ``SLAB_LOGITS_BYTES`` of logits each: every slab
is one batched matmul over all groups and many chunks, and the slab bound keeps the working
memory independent of N. Logits are float32 for float16/bfloat16 inputs (float64 for float64).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import Tensor

from .lsh_common import KEY_EPS, SELF_LOGIT, compute_dtype

SLAB_LOGITS_BYTES = 1 * 2**20


class _Round:
    """One sorted round cut into chunks, with the look-back pairs of each chunk.

    qk, v: ``(G, Np, D)``; pos: ``(G, Np)`` int32. ``pairs[c]`` lists the chunks chunk c
    attends to: ``[c, c-1 mod C]``, or ``[0]`` when there is a single chunk.
    """

    def __init__(self, qk: Tensor, v: Tensor, pos: Tensor, bucket_size: int, causal: bool, scale: float):
        g, n_pad, d = qk.shape
        self.causal, self.scale, self.padded = causal, scale, bool((pos < 0).any())
        self.bs, self.n_chunks, self.dtype = bucket_size, n_pad // bucket_size, compute_dtype(qk.dtype)
        self.qk = qk.view(g, self.n_chunks, bucket_size, d)  # (G, C, bs, D)
        self.v = v.view(g, self.n_chunks, bucket_size, d)
        self.pos = pos.view(g, self.n_chunks, bucket_size)  # (G, C, bs)
        norm = qk.to(self.dtype).norm(dim=-1).view(g, self.n_chunks, bucket_size)
        self.norm_ok = norm > KEY_EPS  # (G, C, bs): keys not clamped by KEY_EPS
        self.inv_norm = 1.0 / norm.clamp_min(KEY_EPS)
        chunk = torch.arange(self.n_chunks, device=qk.device)
        self.pairs = chunk[:, None] if self.n_chunks == 1 else torch.stack([chunk, (chunk - 1) % self.n_chunks], 1)

    def slabs(self) -> Iterator[slice]:
        """Chunk ranges holding about ``SLAB_LOGITS_BYTES`` of logits each."""
        g = self.qk.shape[0]
        per_chunk = g * self.bs * self.bs * self.pairs.shape[1] * torch.finfo(self.dtype).bits // 8
        step = max(1, SLAB_LOGITS_BYTES // per_chunk)
        return (slice(c, c + step) for c in range(0, self.n_chunks, step))

    def chunked(self, x: Tensor) -> Tensor:
        """A view ``(G, C, bs, ...)`` of per-row ``x (G, Np, ...)``."""
        return x.view(*self.qk.shape[:3], *x.shape[2:])

    def queries(self, sl: slice, x: Tensor) -> Tensor:
        """Rows of chunks ``sl`` of ``x (G, Np, D)``: ``(G, n, bs, D)`` in compute dtype."""
        return self.chunked(x)[:, sl].to(self.dtype)

    def keys(self, sl: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Normalised keys, values ``(G, n, K, D)``, key positions ``(G, n, K)`` and the pair
        index ``(n*P,)`` of chunks ``sl``, K = P * bs keys per chunk (P = 2, or 1 if C == 1)."""
        pairs = self.pairs[sl].reshape(-1)
        g, n = self.qk.shape[0], pairs.numel()
        k = self.qk[:, pairs].to(self.dtype).mul_(self.inv_norm[:, pairs].unsqueeze(-1))
        v = self.v[:, pairs].to(self.dtype)
        m = self.pairs.shape[1]
        return (k.view(g, n // m, m * self.bs, -1), v.view(g, n // m, m * self.bs, -1),
                self.pos[:, pairs].reshape(g, n // m, m * self.bs), pairs)

    def logits(self, sl: slice, q: Tensor, k: Tensor, pos_k: Tensor) -> Tensor:
        """Masked logits ``(G, n, bs, K)`` of the queries ``(G, n, bs, D)`` of chunks ``sl``
        against their keys ``(G, n, K, D)`` at positions ``pos_k (G, n, K)``."""
        s = torch.matmul(q, k.transpose(-1, -2)).mul_(self.scale)
        _self_logits(s).fill_(SELF_LOGIT)
        pos_q, pos_k = self.pos[:, sl].unsqueeze(-1), pos_k.unsqueeze(-2)
        if self.causal:
            s.masked_fill_(pos_k > pos_q, float("-inf"))
        if self.padded:
            s.masked_fill_(pos_k < 0, float("-inf")).masked_fill_(pos_q < 0, float("-inf"))
        return s


def _self_logits(s: Tensor) -> Tensor:
    """The entries of logits ``s (G, n, bs, K)`` where a query meets its own position: the
    diagonal of the own-chunk block (keys ``0..bs-1``); each position occurs once per round."""
    return s[..., : s.shape[-2]].diagonal(dim1=-2, dim2=-1)


def fwd(qk: Tensor, v: Tensor, pos: Tensor, *, bucket_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """One round's attention on sorted rows.

    qk, v: ``(G, Np, D)``; pos: ``(G, Np)`` int32 original positions, -1 = padding.
    Returns out ``(G, Np, D)`` (input dtype) and lse ``(G, Np)`` (float32; float64 for float64
    inputs; -inf where a row has no permitted key, and then out is 0).
    """
    rnd = _Round(qk, v, pos, bucket_size, causal, scale)
    out = torch.empty(qk.shape, dtype=qk.dtype, device=qk.device)
    lse = torch.empty(qk.shape[:2], dtype=rnd.dtype, device=qk.device)
    out_c, lse_c = rnd.chunked(out), rnd.chunked(lse)
    for sl in rnd.slabs():
        k, vv, pos_k, _ = rnd.keys(sl)
        s = rnd.logits(sl, rnd.queries(sl, qk), k, pos_k)
        top = s.amax(dim=-1, keepdim=True)
        top.masked_fill_(top == float("-inf"), 0.0)
        p = s.sub_(top).exp_()
        total = p.sum(dim=-1, keepdim=True)
        out_c[:, sl] = torch.matmul(p, vv).div_(total.masked_fill(total == 0, 1.0))
        lse_c[:, sl] = (top + total.log()).squeeze(-1)
    return out, lse


def bwd(qk: Tensor, v: Tensor, pos: Tensor, do: Tensor, lse: Tensor, delta: Tensor, *,
        bucket_size: int, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """Gradients of one round given the COMBINED (all rounds) lse and ``delta = rowsum(dO * O)``.

    qk, v, do: ``(G, Np, D)``; pos: ``(G, Np)``; lse, delta: ``(G, Np)`` in this round's order.
    With ``p = exp(s - lse)``: ``dv += p^T dO``, ``ds = p (dO v^T - delta)``, ``dq = ds k``,
    ``dk = ds^T q``, and dk is chained through ``k = qk / max(||qk||, KEY_EPS)`` into dqk.
    Returns dqk, dv ``(G, Np, D)`` in float32 (float64 for float64 inputs).
    """
    rnd = _Round(qk, v, pos, bucket_size, causal, scale)
    dqk = torch.zeros(qk.shape, dtype=rnd.dtype, device=qk.device)
    dv = torch.zeros_like(dqk)
    dqk_c, dv_c = rnd.chunked(dqk), rnd.chunked(dv)
    lse_c = rnd.chunked(lse.to(rnd.dtype))
    lse_c = lse_c.masked_fill(lse_c == float("-inf"), 0.0)  # such rows have only -inf logits
    delta_c = rnd.chunked(delta.to(rnd.dtype))
    for sl in rnd.slabs():
        k, vv, pos_k, pairs = rnd.keys(sl)
        q, d_out = rnd.queries(sl, qk), rnd.queries(sl, do)
        s = rnd.logits(sl, q, k, pos_k)
        p = s.sub_(lse_c[:, sl].unsqueeze(-1)).exp_()  # (G, n, bs, K)
        _add_pairs(dv_c, pairs, torch.matmul(p.transpose(-1, -2), d_out))
        ds = torch.matmul(d_out, vv.transpose(-1, -2)).sub_(delta_c[:, sl].unsqueeze(-1)).mul_(p)
        _self_logits(ds).zero_()  # the self logit is a constant
        ds.mul_(scale)
        dqk_c[:, sl] += torch.matmul(ds, k)
        dk = torch.matmul(ds.transpose(-1, -2), q)  # (G, n, K, D) w.r.t. the normalised keys
        _add_pairs(dqk_c, pairs, _normalise_backward(rnd, pairs, k, dk))
    return dqk, dv


def _normalise_backward(rnd: _Round, pairs: Tensor, k: Tensor, dk: Tensor) -> Tensor:
    """Chain ``dk`` through ``k = x / max(||x||, KEY_EPS)``:
    ``dx = (dk - k (k.dk)) / ||x||``, or ``dk / KEY_EPS`` where the norm was clamped."""
    g, n, kk, _ = k.shape
    inv = rnd.inv_norm[:, pairs].view(g, n, kk, 1)
    ok = rnd.norm_ok[:, pairs].view(g, n, kk, 1)
    radial = torch.linalg.vecdot(k, dk).unsqueeze(-1).mul_(ok)
    return dk.addcmul_(k, radial, value=-1.0).mul_(inv)


def _add_pairs(acc: Tensor, pairs: Tensor, src: Tensor) -> None:
    """Scatter-add per-pair key gradients ``src (G, n, K, D)`` into ``acc (G, C, bs, D)``."""
    g, c, bs, d = acc.shape
    acc.index_add_(1, pairs, src.reshape(g, -1, bs, d))
