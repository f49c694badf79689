"""How close LSH attention is to full shared-QK attention, versus n_hashes and bucket_size, and
with plain versus factorised hashing at the same number of buckets.

Reference: ``reformer.kernels.dense_shared_qk_attention``, full shared-QK attention with the
same rules as ``lsh_attention`` (keys ``qk`` normalised to unit norm, logits ``q . k / sqrt(D)``,
a position attends to itself only when nothing else is permitted; docs/lsh.md), so the only
difference measured is which keys LSH lets each query see.

Sweeps (``params["sweep"]``):

- ``n_hashes``: every ``n_hashes`` and ``bucket_size`` of the preset, with the default bucket
  rule (``n_buckets=None``).
- ``hashing``: at the preset's largest ``bucket_size`` and ``HASHING_N_HASHES`` rounds, plain
  hashing into ``n`` buckets against factorised hashing into ``n1 x n2 = n`` (and
  ``n1 x n2 x n3 = n``) buckets, for each entry of ``HASHING_PAIRS`` (64 vs 8x8, 256 vs 16x16,
  512 vs 16x32 vs 8x8x8). Series ``"<input> plain"``, ``"<input> factorised"`` (two factors)
  and ``"<input> factorised x3"``; ``params["hashing"]`` is ``"plain 64"``, ``"factorised 8x8"``...

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
SWEEPS = ("n_hashes", "hashing")
# the hashing sweep: (plain bucket count, one or more factorisations (n1, n2[, n3]) whose product equals it)
HASHING_PAIRS: tuple[tuple, ...] = ((64, (8, 8)), (256, (16, 16)), (512, (16, 32), (8, 8, 8)))
HASHING_N_HASHES = 2
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
    from reformer.kernels import dense_shared_qk_weights, lsh_attention

    with torch.no_grad():
        probs = dense_shared_qk_weights(qk)  # (B, H, N, N)
        full = probs @ v
        lsh = lsh_attention(qk, v, **lsh_kwargs)
        seen = lsh_weights(qk, **lsh_kwargs) > 0  # (B, H, N, N)
    top = probs.topk(min(top_k, qk.shape[2] - 1), dim=-1).indices
    return {
        "rel_err": float((lsh - full).norm() / full.norm()),
        "recall_at_k": float(seen.gather(-1, top).float().mean()),
        "mass_recall": float((probs * seen).sum(-1).mean()),
    }


def hashing_label(n_buckets: Any) -> str:
    """``"plain 64"`` for an int, ``"factorised 8x8"`` for factors, ``"default"`` for None."""
    if n_buckets is None:
        return "default"
    if isinstance(n_buckets, int):
        return f"plain {n_buckets}"
    return "factorised " + "x".join(str(n) for n in n_buckets)


def format_hashing_entry(entry: tuple, sep: str = ":") -> str:
    """``(512, (16, 32), (8, 8, 8))`` as ``"512:16x32:8x8x8"`` (the ``--hashing`` syntax) or, with
    ``sep=" vs "``, ``"512 vs 16x32 vs 8x8x8"``."""
    plain, *factorisations = entry
    return sep.join([str(plain)] + ["x".join(map(str, f)) for f in factorisations])


def check_hashing(pairs: Iterable[tuple]) -> list[tuple[int, list[tuple[int, ...]]]]:
    """``(n, factors, ...)`` entries as ``(n, [factors, ...])``; every factorisation has 2 or 3
    factors whose product is ``n``."""
    checked = []
    for plain, *factorisations in pairs:
        factorisations = [tuple(f) for f in factorisations]
        for factors in factorisations:
            if len(factors) not in (2, 3) or math.prod(factors) != plain:
                raise ValueError(f"hashing entries must be (n, (n1, n2[, n3]), ...) with a product of factors "
                                 f"== n, got {(plain, factors)}")
        checked.append((plain, factorisations))
    return checked


def plan(n_hashes: Iterable[int], bucket_sizes: Iterable[int], *, batch: int, heads: int, seq_len: int,
         head_dim: int, seeds: int, top_k: int,
         hashing: Iterable[tuple] = HASHING_PAIRS,
         hashing_n_hashes: int = HASHING_N_HASHES) -> list[Case]:
    """The ``n_hashes`` sweep (every ``n_hashes`` x ``bucket_size``, default bucket rule) and the
    ``hashing`` sweep (each entry of ``hashing``, plain then factorised, at ``max(bucket_sizes)``
    and ``hashing_n_hashes`` rounds; empty ``hashing``: no such sweep), for both inputs."""
    bucket_sizes, pairs = list(bucket_sizes), check_hashing(hashing)
    base = dict(batch=batch, heads=heads, seq_len=seq_len, head_dim=head_dim, dtype="float32", seeds=seeds,
                top_k=top_k)
    cases = [Case(BENCHMARK, "lsh-torch", f"{kind} bs={bs}",
                  dict(base, input=kind, bucket_size=bs, n_hashes=h, sweep="n_hashes", n_buckets=None,
                       hashing=hashing_label(None)))
             for kind in INPUTS for bs in bucket_sizes for h in n_hashes]
    for kind in INPUTS:
        for plain, factorisations in pairs:
            schemes = [("plain", plain)] + [("factorised" + ("" if len(f) == 2 else f" x{len(f)}"), list(f))
                                            for f in factorisations]
            for scheme, n_buckets in schemes:
                cases.append(Case(BENCHMARK, "lsh-torch", f"{kind} {scheme}",
                                  dict(base, input=kind, bucket_size=max(bucket_sizes), n_hashes=hashing_n_hashes,
                                       sweep="hashing", n_buckets=n_buckets, total_buckets=plain,
                                       hashing=hashing_label(n_buckets if scheme != "plain" else plain))))
    return cases


def run(case: Case) -> dict[str, Any]:
    """Runs one quality case in this process; metrics are averaged over ``seeds`` seeds."""
    reason = missing()
    if reason is not None:
        return make_record(case, "unavailable", reason)
    p = case.params
    shape = (p["batch"], p["heads"], p["seq_len"], p["head_dim"])
    n_buckets = p.get("n_buckets")  # None (default rule), an int (plain) or [n1, n2(, n3)] (factorised)
    n_buckets = tuple(n_buckets) if isinstance(n_buckets, list) else n_buckets
    runs = []
    for seed in range(p["seeds"]):
        qk, v = make_inputs(p["input"], shape, seed)
        runs.append(compare(qk, v, p["top_k"], bucket_size=p["bucket_size"], n_hashes=p["n_hashes"],
                            n_buckets=n_buckets, seed=seed, backend="torch"))
    metrics = {key: sum(r[key] for r in runs) / len(runs) for key in runs[0]}
    return make_record(case, "ok", **metrics)
