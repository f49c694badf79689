"""Scaled-down reproductions of the Reformer paper's experiments.

    python -m reformer.experiments duplication      # Table 2: the duplication task

Table 2 of Kitaev et al. (2020) trains a one-layer model on the duplication task with full
shared-QK attention and with LSH attention of 1, 2, 4 (and 8) hash rounds, and evaluates every
trained model with every attention. Here "full" is shared-QK attention over the whole sequence,
run as LSH attention with ``bucket_size = seq_len`` (then LSH attention is exactly full shared-QK
attention, see docs/lsh.md), so one set of weights can be evaluated both ways. Each model is
trained by :func:`reformer.train.run` from a :class:`reformer.train_config.TrainConfig`. Defaults are sized to finish in
minutes on a 2-core CPU (sequence 64 instead of 1024, vocabulary 64 instead of 128, 1,000
steps of 16 sequences instead of 150K steps).
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .lsh_attention import LSHSelfAttention
from .train import run
from .train_config import TrainConfig
from .train_dist import DistContext
from .train_loop import Trainer, evaluate


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in text.split(","))


def duplication_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reformer.experiments duplication",
                                description="Table 2 (duplication task), scaled down",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=64)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--bucket-size", type=int, default=8, help="LSH chunk length (full: seq_len)")
    p.add_argument("--train-hashes", type=_ints, default=(1, 2, 4), help="LSH models to train")
    p.add_argument("--eval-hashes", type=_ints, default=(1, 2, 4, 8), help="LSH rounds to evaluate with")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs") / "duplication-table")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier table in --out")
    return p


def train_config(opts: argparse.Namespace, name: str, bucket_size: int, n_hashes: int) -> TrainConfig:
    """The run of one causal LSH model on the duplication task (full attention: bucket_size = seq_len)."""
    return TrainConfig(task="duplication", seq_len=opts.seq_len, vocab_size=opts.vocab_size, d_model=opts.d_model,
                       n_heads=opts.n_heads, d_ff=2 * opts.d_model, depth=opts.depth, attention="lsh",
                       bucket_size=bucket_size, n_hashes=n_hashes, steps=opts.steps, batch_size=opts.batch_size,
                       lr=opts.lr, warmup=opts.steps // 10, eval_every=0, eval_batches=opts.eval_batches,
                       log_every=50, save_every=opts.steps, seed=opts.seed, out=opts.out / name,
                       threads=opts.threads or None, overwrite=opts.overwrite, export=False)


@contextmanager
def lsh_settings(model: nn.Module, *, bucket_size: int, n_hashes: int) -> Iterator[None]:
    """Temporarily run every ``LSHSelfAttention`` of ``model`` with other LSH parameters."""
    modules = [m for m in model.modules() if isinstance(m, LSHSelfAttention)]
    saved = [(m.bucket_size, m.n_hashes) for m in modules]
    for m in modules:
        m.bucket_size, m.n_hashes = bucket_size, n_hashes
    try:
        yield
    finally:
        for m, (b, h) in zip(modules, saved):
            m.bucket_size, m.n_hashes = b, h


def _accuracy(trainer: Trainer, bucket_size: int, n_hashes: int) -> float:
    with lsh_settings(trainer.model, bucket_size=bucket_size, n_hashes=n_hashes):
        return evaluate(trainer.model, trainer.task, trainer.opts, DistContext())["acc"]


def format_table(rows: dict[str, list[float]], columns: Sequence[str]) -> str:
    """A markdown table: one row per trained model, accuracy (%) per evaluation attention."""
    lines = ["| train \\ eval | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(f"{100 * a:.1f}%" for a in accs) + " |" for name, accs in rows.items()]
    return "\n".join(lines)


def duplication(argv: Optional[Sequence[str]] = None) -> str:
    """Train full and LSH models, evaluate each with every attention, print and return the table."""
    opts = duplication_parser().parse_args(argv)
    columns = ["full"] + [f"LSH-{h}" for h in opts.eval_hashes]
    variants = [("full", opts.seq_len, 1)] + [(f"LSH-{h}", opts.bucket_size, h) for h in opts.train_hashes]
    rows, seconds = {}, {}
    for name, bucket_size, n_hashes in variants:
        tic = time.perf_counter()
        trainer = run(train_config(opts, name, bucket_size, n_hashes))
        seconds[name] = time.perf_counter() - tic
        rows[name] = [_accuracy(trainer, opts.seq_len, 1)]
        rows[name] += [_accuracy(trainer, opts.bucket_size, h) for h in opts.eval_hashes]
    table = format_table(rows, columns)
    chance = 1 / (opts.vocab_size - 1)
    print(f"\nDuplication task, seq_len={opts.seq_len} (w of {opts.seq_len // 2 - 1} symbols), "
          f"vocab={opts.vocab_size} (chance {100 * chance:.1f}%), {opts.depth} layer(s), d_model={opts.d_model}, "
          f"{opts.n_heads} heads, LSH bucket_size={opts.bucket_size}, {opts.steps} steps x batch {opts.batch_size}; "
          f"accuracy on the second copy, {opts.eval_batches * opts.batch_size} held-out sequences.")
    print(table)
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; training time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()))
    return table


EXPERIMENTS = {"duplication": duplication}


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        raise SystemExit(f"usage: python -m reformer.experiments {{{','.join(EXPERIMENTS)}}} [options]")
    EXPERIMENTS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
