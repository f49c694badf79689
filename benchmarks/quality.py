"""How close LSH attention is to full shared-QK attention, versus n_hashes and bucket_size.

Reference: full shared-QK attention with the same rules as ``lsh_attention`` (keys are ``qk``
normalised to unit norm, logits ``q . k / sqrt(D)``, a position's own logit set to -1e5), so
the only difference measured is which keys LSH lets each query see.

Metrics, averaged over heads, queries and seeds:

- ``rel_err``: ``||O_lsh - O_full||_F / ||O_full||_F`` with random values.
- ``recall_at_k``: the share of each query's ``k`` highest-probability keys under full attention
  that LSH attends to at all (in any round).
- ``mass_recall``: the share of each query's full-attention probability mass on keys that LSH
  attends to.

Which keys LSH attends to is read from the op itself: with fixed rotations the LSH output is
``W @ v`` for a (sparse) matrix ``W``; calling it with one-hot values (``D`` keys at a time)
returns ``W``'s columns.

Inputs: ``random`` (``qk``, ``v`` standard normal: diffuse attention, the hard case) and
``clustered`` (``N / 16`` clusters of nearby directions, ``|qk| = 8 sqrt(D)``: concentrated
attention, the case LSH is built for).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .cases import Case, make_record, requires

BENCHMARK = "quality"
INPUTS = ("random", "clustered")
CLUSTER_SIZE = 16
missing = requires("reformer.kernels:lsh_attention")


def make_inputs(kind: str, shape: tuple[int, int, int, int], seed: int) -> tuple[Tensor, Tensor]:
    """``qk``, ``v`` of ``shape`` ``(B, H, N, D)`` for input ``kind`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    b, h, n, d = shape
    v = torch.randn(shape, generator=gen)
    if kind == "random":
        return torch.randn(shape, generator=gen), v
    if kind != "clustered":
        raise ValueError(f"input kind must be one of {INPUTS}, got {kind!r}")
    n_clusters = max(1, n // CLUSTER_SIZE)
    centres = F.normalize(torch.randn(b, h, n_clusters, d, generator=gen), dim=-1)
    member = torch.randint(n_clusters, (n,), generator=gen)
    noise = 0.1 * torch.randn(shape, generator=gen) / math.sqrt(d)
    qk = F.normalize(centres[:, :, member] + noise, dim=-1) * 8 * math.sqrt(d)
    return qk, v


def full_shared_qk_probs(qk: Tensor) -> Tensor:
    """``(B, H, N, D)`` -> attention probabilities ``(B, H, N, N)`` of full shared-QK attention."""
    keys = qk / qk.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = qk @ keys.transpose(-1, -2) / math.sqrt(qk.shape[-1])  # (B, H, N, N)
    scores.diagonal(dim1=-2, dim2=-1).fill_(-1e5)
    return scores.softmax(dim=-1)


def lsh_weights(qk: Tensor, **lsh_kwargs: Any) -> Tensor:
    """The ``(B, H, N, N)`` matrix ``W`` with ``lsh_attention(qk, v) = W @ v`` (fixed rotations).

    One call on ``ceil(N / D)`` copies of ``qk`` stacked along the batch, copy ``c`` with values
    one-hot on keys ``c*D .. c*D + D - 1``; output column ``d`` of copy ``c`` is ``W[:, c*D + d]``.
    """
    from reformer.kernels import lsh_attention

    b, h, n, d = qk.shape
    copies = math.ceil(n / d)
    onehot = torch.eye(copies * d, dtype=qk.dtype, device=qk.device)[:n]  # (N, copies*D)
    v = rearrange(onehot, "n (c d) -> c n d", d=d)[:, None, None].expand(copies, b, h, n, d)
    qks = qk.expand(copies, b, h, n, d)
    out = lsh_attention(qks.reshape(copies * b, h, n, d), v.reshape(copies * b, h, n, d), **lsh_kwargs)
    out = rearrange(out, "(c b) h n d -> b h n (c d)", c=copies)
    return out[..., :n]


def compare(qk: Tensor, v: Tensor, top_k: int, **lsh_kwargs: Any) -> dict[str, float]:
    """``rel_err``, ``recall_at_k`` and ``mass_recall`` of ``lsh_attention(qk, v, **lsh_kwargs)``."""
    from reformer.kernels import lsh_attention

    with torch.no_grad():
        probs = full_shared_qk_probs(qk)
        full = probs @ v
        lsh = lsh_attention(qk, v, **lsh_kwargs)
        seen = lsh_weights(qk, **lsh_kwargs) > 0  # (B, H, N, N)
    top = probs.topk(min(top_k, qk.shape[2] - 1), dim=-1).indices
    return {
        "rel_err": float((lsh - full).norm() / full.norm()),
        "recall_at_k": float(seen.gather(-1, top).float().mean()),
        "mass_recall": float((probs * seen).sum(-1).mean()),
    }


def plan(n_hashes: Iterable[int], bucket_sizes: Iterable[int], *, batch: int, heads: int, seq_len: int,
         head_dim: int, seeds: int, top_k: int) -> list[Case]:
    base = dict(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, dtype="float32", seeds=seeds,
                top_k=top_k)
    return [Case(BENCHMARK, "lsh-torch", f"{kind} bs={bs}", dict(base, input=kind, bucket_size=bs, n_hashes=h))
            for kind in INPUTS for bs in bucket_sizes for h in n_hashes]


def run(case: Case) -> dict[str, Any]:
    """Runs one quality case in this process; metrics are averaged over ``seeds`` seeds."""
    reason = missing()
    if reason is not None:
        return make_record(case, "unavailable", reason)
    p = case.params
    shape = (p["batch"], p["heads"], p["seq_len"], p["head_dim"])
    runs = []
    for seed in range(p["seeds"]):
        qk, v = make_inputs(p["input"], shape, seed)
        runs.append(compare(qk, v, p["top_k"], bucket_size=p["bucket_size"], n_hashes=p["n_hashes"],
                            seed=seed, backend="torch"))
    metrics = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    return make_record(case, "ok", **metrics)
