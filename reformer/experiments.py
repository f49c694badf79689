"""Scaled-down reproductions of the Reformer paper's experiments.

    python -m reformer.experiments duplication      # Table 2: the duplication task
    python -m reformer.experiments compare          # causal_mode chunk vs bucket, plain vs factorised hashing

Table 2 of Kitaev et al. (2020) trains a one-layer model on the duplication task with full
shared-QK attention and with LSH attention of 1, 2, 4 (and 8) hash rounds, and evaluates every
trained model with every attention. Here "full" is shared-QK attention over the whole sequence,
run as LSH attention with ``bucket_size = seq_len`` and ``causal_mode="chunk"`` (then LSH
attention is exactly full shared-QK attention, see docs/lsh.md, "Exactness"); the LSH models and
columns use ``--causal-mode`` (default ``"bucket"``) and ``--n-buckets``, so one set of weights can be evaluated both ways. Each model is
trained by :func:`reformer.train.run` from a :class:`reformer.train_config.TrainConfig`. Defaults are sized to finish in
minutes on a 2-core CPU (sequence 64 instead of 1024, vocabulary 64 instead of 128, 1,000
steps of 16 sequences instead of 150K steps).

``compare`` trains, at the same budget (steps, seed, sizes, ``n_hashes``), one model per
(``causal_mode``, hashing scheme) pair on the duplication task and on the char-level text task,
and reports held-out accuracy (and, for text, eval loss in bits per character). Results:
docs/experiments.md.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from .lsh_attention import LSHSelfAttention
from .checkpoint import load_training_checkpoint
from .train import build_trainer, run
from .train_config import TrainConfig, format_n_buckets, parse_n_buckets
from .train_dist import DistContext
from .train_loop import Trainer, evaluate, masked_lm_loss


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
    p.add_argument("--n-buckets", type=parse_n_buckets, default=None, metavar="N|N1xN2[xN3]",
                   help="LSH buckets per round of the LSH models (even int, N1xN2 = factorised, auto)")
    p.add_argument("--causal-mode", choices=("bucket", "chunk"), default="chunk", help="causal LSH mode")
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


def _mode(opts: argparse.Namespace, bucket_size: int) -> str:
    """Full attention (``bucket_size = seq_len``) is LSH with one chunk in ``causal_mode="chunk"``
    (docs/lsh.md, "Exactness"); in ``"bucket"`` mode a query would still only see its own bucket."""
    return "chunk" if bucket_size >= opts.seq_len else opts.causal_mode


def train_config(opts: argparse.Namespace, name: str, bucket_size: int, n_hashes: int) -> TrainConfig:
    """The run of one causal LSH model on the duplication task (full attention: bucket_size = seq_len)."""
    return TrainConfig(task="duplication", seq_len=opts.seq_len, vocab_size=opts.vocab_size, d_model=opts.d_model,
                       n_heads=opts.n_heads, d_ff=2 * opts.d_model, depth=opts.depth, attention="lsh",
                       bucket_size=bucket_size, n_hashes=n_hashes, causal_mode=_mode(opts, bucket_size),
                       n_buckets=None if bucket_size == opts.seq_len else opts.n_buckets, steps=opts.steps, batch_size=opts.batch_size,
                       lr=opts.lr, warmup=opts.steps // 10, eval_every=0, eval_batches=opts.eval_batches,
                       log_every=50, save_every=opts.steps, seed=opts.seed, out=opts.out / name,
                       threads=opts.threads or None, overwrite=opts.overwrite, export=False)


@contextmanager
def lsh_settings(model: nn.Module, *, bucket_size: int, n_hashes: int,
                 causal_mode: Optional[str] = None) -> Iterator[None]:
    """Temporarily run every ``LSHSelfAttention`` of ``model`` with other LSH parameters
    (``causal_mode`` None = keep each module's own)."""
    modules = [m for m in model.modules() if isinstance(m, LSHSelfAttention)]
    saved = [(m.bucket_size, m.n_hashes, m.causal_mode) for m in modules]
    for m in modules:
        m.bucket_size, m.n_hashes = bucket_size, n_hashes
        m.causal_mode = m.causal_mode if causal_mode is None else causal_mode
    try:
        yield
    finally:
        for m, (b, h, c) in zip(modules, saved):
            m.bucket_size, m.n_hashes, m.causal_mode = b, h, c


def _accuracy(trainer: Trainer, bucket_size: int, n_hashes: int, causal_mode: Optional[str] = None) -> float:
    with lsh_settings(trainer.model, bucket_size=bucket_size, n_hashes=n_hashes, causal_mode=causal_mode):
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
        rows[name] = [_accuracy(trainer, opts.seq_len, 1, "chunk")]  # one chunk, chunk mode = full attention
        rows[name] += [_accuracy(trainer, opts.bucket_size, h, opts.causal_mode) for h in opts.eval_hashes]
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


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reformer.experiments compare",
                                description="causal_mode chunk vs bucket and plain vs factorised hashing, same "
                                            "budget, on the duplication and char-level text tasks",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tasks", nargs="+", choices=("duplication", "text"), default=["duplication", "text"])
    p.add_argument("--causal-modes", nargs="+", choices=("chunk", "bucket"), default=["chunk", "bucket"])
    p.add_argument("--dup-n-buckets", nargs="+", type=parse_n_buckets, default=[8, (2, 4)],
                   help="hashing schemes on duplication (even int = plain, N1xN2 = factorised)")
    p.add_argument("--text-n-buckets", nargs="+", type=parse_n_buckets, default=[16, (4, 4)],
                   help="hashing schemes on text")
    p.add_argument("--n-hashes", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    # duplication
    p.add_argument("--dup-seq-len", type=int, default=64)
    p.add_argument("--dup-vocab-size", type=int, default=64)
    p.add_argument("--dup-depth", type=int, default=1)
    p.add_argument("--dup-d-model", type=int, default=128)
    p.add_argument("--dup-bucket-size", type=int, default=8)
    p.add_argument("--dup-steps", type=int, default=800)
    p.add_argument("--dup-batch-size", type=int, default=16)
    p.add_argument("--dup-lr", type=float, default=2e-3)
    # text
    p.add_argument("--text", type=Path, default=None, help="text corpus (default: Python stdlib sources)")
    p.add_argument("--text-max-bytes", type=int, default=4 * 2**20)
    p.add_argument("--text-seq-len", type=int, default=512)
    p.add_argument("--text-depth", type=int, default=2)
    p.add_argument("--text-d-model", type=int, default=128)
    p.add_argument("--text-bucket-size", type=int, default=32)
    p.add_argument("--text-steps", type=int, default=300)
    p.add_argument("--text-batch-size", type=int, default=4)
    p.add_argument("--text-lr", type=float, default=2e-3)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--l2r-batches", type=int, default=4,
                   help="held-out batches also scored left to right (each prediction from a forward over its "
                        "prefix only, see left_to_right_logits); 0 = skip")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the finished runs already in --out instead of training")
    p.add_argument("--out", type=Path, default=Path("runs") / "compare")
    p.add_argument("--overwrite", action="store_true", help="replace the runs of an earlier grid in --out")
    return p


def compare_config(opts: argparse.Namespace, task: str, causal_mode: str, n_buckets) -> TrainConfig:
    """The run of one grid cell: ``task`` with ``causal_mode`` and ``n_buckets``; all else shared."""
    k = "dup" if task == "duplication" else "text"
    g = lambda name: getattr(opts, f"{k}_{name}")  # noqa: E731
    steps = g("steps")
    extra = ({"vocab_size": opts.dup_vocab_size} if task == "duplication"
             else {"text": opts.text, "max_bytes": opts.text_max_bytes})
    return TrainConfig(task=task, seq_len=g("seq_len"), depth=g("depth"), d_model=g("d_model"), n_heads=4,
                       d_ff=2 * g("d_model"), attention="lsh", bucket_size=g("bucket_size"), n_hashes=opts.n_hashes,
                       n_buckets=n_buckets, causal_mode=causal_mode, steps=steps, batch_size=g("batch_size"),
                       lr=g("lr"), warmup=steps // 10, eval_every=0, eval_batches=opts.eval_batches,
                       log_every=50, save_every=steps, seed=opts.seed, threads=opts.threads or None,
                       out=opts.out / f"{task}-{causal_mode}-{format_n_buckets(n_buckets)}",
                       overwrite=opts.overwrite, export=False, **extra)


@torch.no_grad()
def left_to_right_logits(model: nn.Module, tokens: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
    """Logits ``(B, N, V)`` whose row ``t`` (for ``t`` in ``positions``; other rows are zero) comes
    from a forward over ``tokens[:, :t + 1]`` alone, as a left-to-right generator sees it.

    Teacher-forced logits come from one forward over the whole sequence; with causal LSH in
    ``causal_mode="chunk"`` later tokens can change earlier rows through the hashes (docs/lsh.md,
    "Causal modes"), so the two can differ; in ``causal_mode="bucket"`` (and with full attention)
    they agree up to rounding, given the same rotations. Every forward starts from the global RNG
    state at the call, so each draws the same LSH rotations. One forward per position: an
    evaluation tool for short sequences, not a fast path."""
    state = torch.get_rng_state()
    rows = []
    for t in positions:
        torch.set_rng_state(state)
        rows.append(model(tokens[:, : t + 1])[:, t])
    logits = torch.zeros(*tokens.shape, rows[0].shape[-1], dtype=rows[0].dtype, device=tokens.device)
    logits[:, list(positions)] = torch.stack(rows, dim=1)
    return logits


@torch.no_grad()
def evaluate_left_to_right(trainer: Trainer, batches: int) -> dict[str, float]:
    """On the first ``batches`` validation batches of the trainer's task: loss and accuracy of
    one teacher-forced forward (``tf_loss``, ``tf_acc``) and of left-to-right predictions
    (``l2r_loss``, ``l2r_acc``, :func:`left_to_right_logits`), every forward with the same LSH
    rotations, so any difference comes from later tokens reaching earlier predictions."""
    model = trainer.model
    was_training = model.training
    model.eval()
    total = torch.zeros(2, 3, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        for index in range(batches):
            tokens, mask = trainer.task.batch(index, trainer.opts.batch_size, split="val")
            positions = mask.any(dim=0).nonzero().flatten().tolist()
            state = torch.get_rng_state()
            forced = model(tokens)
            torch.set_rng_state(state)
            prefix = left_to_right_logits(model, tokens, positions)
            for row, logits in enumerate((forced, prefix)):
                loss, correct, count = masked_lm_loss(logits, tokens, mask)
                total[row] += torch.stack([loss * count, correct, count]).double()
    model.train(was_training)
    count = total[:, 2].clamp_min(1.0)
    return {"tf_loss": (total[0, 0] / count[0]).item(), "tf_acc": (total[0, 1] / count[0]).item(),
            "l2r_loss": (total[1, 0] / count[1]).item(), "l2r_acc": (total[1, 1] / count[1]).item()}


def format_compare_table(results: Sequence[dict]) -> str:
    """A markdown table of :func:`compare` results: one row per run."""
    lines = ["| task | causal_mode | n_buckets | bucket_size | eval loss (nats) | bits/char | accuracy "
             "| teacher-forced / left-to-right accuracy | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        bpc = f"{r['bits_per_char']:.3f}" if r["task"] == "text" else "-"
        l2r = (f"{100 * r['tf_acc']:.1f}% / {100 * r['l2r_acc']:.1f}%" if r.get("l2r_acc") is not None else "-")
        seconds = f"{r['seconds']:.0f}" if r.get("seconds") is not None else "-"
        lines.append(f"| {r['task']} | {r['causal_mode']} | {r['n_buckets']} | {r['bucket_size']} | {r['loss']:.3f} "
                     f"| {bpc} | {100 * r['acc']:.1f}% | {l2r} | {seconds} |")
    return "\n".join(lines)


def _finished(config: TrainConfig) -> Trainer:
    """The trainer of ``config`` with the weights of its finished run in ``config.out``."""
    trainer = build_trainer(config, DistContext())
    path = trainer.checkpoint_path
    if not path.exists():
        raise FileNotFoundError(f"--eval-only: no finished run at {path}")
    trainer.model.load_state_dict(load_training_checkpoint(path)["model"])
    return trainer


def compare(argv: Optional[Sequence[str]] = None) -> str:
    """Train one model per (task, causal_mode, n_buckets) at the same budget; print and return a
    markdown table of held-out loss / bits per char / accuracy; write ``--out/compare.json``."""
    opts = compare_parser().parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    results = []
    for task in opts.tasks:
        schemes = opts.dup_n_buckets if task == "duplication" else opts.text_n_buckets
        for causal_mode in opts.causal_modes:
            for n_buckets in schemes:
                config = compare_config(opts, task, causal_mode, n_buckets)
                tic = time.perf_counter()
                trainer = _finished(config) if opts.eval_only else run(config)
                seconds = None if opts.eval_only else time.perf_counter() - tic
                with torch.random.fork_rng(devices=[]):  # eval rotations from the run's seed: a rerun scores alike
                    torch.set_rng_state(torch.Generator().manual_seed(opts.seed).get_state())
                    stats = evaluate(trainer.model, trainer.task, trainer.opts, DistContext())
                    l2r = evaluate_left_to_right(trainer, opts.l2r_batches) if opts.l2r_batches else {}
                results.append({"task": task, "causal_mode": causal_mode, "n_buckets": format_n_buckets(n_buckets),
                                "loss": stats["loss"], "bits_per_char": stats["loss"] / math.log(2),
                                "acc": stats["acc"], **l2r, "l2r_batches": opts.l2r_batches, "seconds": seconds, "steps": config.steps,
                                "seq_len": config.seq_len, "bucket_size": config.bucket_size,
                                "n_hashes": config.n_hashes, "depth": config.depth, "d_model": config.d_model,
                                "batch_size": config.batch_size, "seed": config.seed})
    table = format_compare_table(results)
    print(table)
    machine = (f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} torch threads, "
               f"torch {torch.__version__}")
    print("machine: " + machine)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "compare.json").write_text(json.dumps({"argv": list(argv) if argv is not None else sys.argv[1:],
                                                        "machine": machine, "results": results}, indent=2))
    return table


EXPERIMENTS = {"duplication": duplication, "compare": compare}


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in EXPERIMENTS:
        raise SystemExit(f"usage: python -m reformer.experiments {{{','.join(EXPERIMENTS)}}} [options]")
    EXPERIMENTS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
