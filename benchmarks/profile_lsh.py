"""Where an LSH attention call spends its time: hashing, sorting, forward rounds, backward rounds.

``python -m benchmarks.profile_lsh 32768 1048576`` runs one forward+backward of
``lsh_attention(backend="torch")`` per length (B=1, H=8, D=64, float32, bucket 64, n_hashes 4, one
process, lengths in the order given) and prints the wall time of each phase, measured by timers
wrapped around ``hashing.hash_buckets``, ``lsh_function.sort_rounds`` and the torch core's
``forward_round``/``backward_round``, with the time per position. A diagnostic (one call, no
warm-up, the allocator as the process has it): the benchmarks proper are ``python -m benchmarks``.
"""
from __future__ import annotations

import argparse
import collections
import time
from typing import Callable, Optional, Sequence

import torch

from reformer.kernels import lsh_attention, lsh_function, ref_lsh


def _timed(module: object, name: str, key: str, totals: dict) -> Callable[[], None]:
    """Wraps ``module.name`` so that its calls add their seconds to ``totals[key]``; returns an undo."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            totals[key] += time.perf_counter() - start

    setattr(module, name, wrapper)
    return lambda: setattr(module, name, original)


def profile(n: int, *, heads: int = 8, head_dim: int = 64, bucket_size: int = 64, n_hashes: int = 4,
            seed: int = 0) -> dict[str, float]:
    """Seconds of each phase of one forward+backward call at length ``n``."""
    totals: dict[str, float] = collections.defaultdict(float)
    undo = [_timed(lsh_function, "hash_buckets", "hash", totals), _timed(lsh_function, "sort_rounds", "sort", totals),
            _timed(ref_lsh, "forward_round", "forward rounds", totals),
            _timed(ref_lsh, "backward_round", "backward rounds", totals)]
    try:
        gen = torch.Generator().manual_seed(seed)
        qk = torch.randn(1, heads, n, head_dim, generator=gen).requires_grad_()
        v = torch.randn(1, heads, n, head_dim, generator=gen).requires_grad_()
        grad = torch.randn(1, heads, n, head_dim, generator=gen)
        start = time.perf_counter()
        out = lsh_attention(qk, v, bucket_size=bucket_size, n_hashes=n_hashes, seed=seed, backend="torch")
        totals["forward"] = time.perf_counter() - start
        out.backward(grad)
        totals["total"] = time.perf_counter() - start
    finally:
        for restore in undo:
            restore()
    return dict(totals)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_lsh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lengths", type=int, nargs="+", metavar="N")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for n in args.lengths:
        if n < 1:
            p.error(f"lengths must be positive, got {n}")
        t = profile(n)
        phases = " | ".join(f"{k} {t.get(k, 0.0):.2f} s" for k in ("hash", "sort", "forward rounds", "backward rounds"))
        print(f"N={n}: total {t['total']:.2f} s (forward {t['forward']:.2f} s) | {phases} | "
              f"{t['total'] / n * 1e6:.1f} us per position", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
