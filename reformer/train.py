r"""Train a ``ReformerLM`` on long sequences: ``python -m reformer.train --help``.

Tasks: ``duplication`` (the Reformer paper's ``0 w 0 w`` copy task, scored on the second copy)
and ``text`` (byte-level language modelling on a local file or folder; by default the Python
standard library's sources, so nothing is downloaded).

    python -m reformer.train --task duplication --seq-len 64 --vocab-size 64 --depth 1 --d-model 128 \
        --d-ff 256 --attention lsh --bucket-size 8 --n-hashes 2 --steps 1000 --batch-size 16 --lr 2e-3
    python -m reformer.train --task text --seq-len 2048 --axial-shape 32,64 --ff-chunks 4 --d-model 128 \
        --n-hashes 2 --batch-size 4 --steps 2000 --out runs/text
    python -m reformer.train ... --out runs/text --resume          # continue exactly where it stopped
    torchrun --nproc_per_node=2 -m reformer.train ...              # data parallel (gloo on CPU)

``--batch-size`` is the global batch: it is split over the ranks (and ``--grad-accum`` parts),
so the same command trains the same model on 1 or W processes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import random
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from .config import ATTENTIONS, ReformerConfig
from .data import TASKS, make_task
from .model import ReformerLM
from .train_dist import DistContext
from .train_loop import LoopOptions, Trainer


def _axial_shape(text: str) -> Optional[tuple[int, ...]]:
    if text.lower() == "none":
        return None
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--axial-shape must be comma-separated ints like 64,64 or 'none', got {text!r}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the option help, examples kept as written."""


def build_parser() -> argparse.ArgumentParser:
    examples = __doc__[__doc__.index("    python -m"):]
    p = argparse.ArgumentParser(prog="python -m reformer.train", formatter_class=_HelpFormatter,
                                description="Train a ReformerLM on long sequences (duplication or byte-level text).",
                                epilog="examples:\n" + examples)
    t = p.add_argument_group("task")
    t.add_argument("--task", choices=TASKS, default="duplication")
    t.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (up to 64K on CPU)")
    t.add_argument("--vocab-size", type=int, default=128, help="duplication: symbols incl. the separator 0")
    t.add_argument("--text", type=Path, default=None,
                   help="text: corpus file or folder; None = the Python standard library's sources")
    t.add_argument("--text-pattern", default="*", help="text: glob of files inside a --text folder")
    t.add_argument("--max-bytes", type=int, default=32 * 2**20, help="text: read at most this many corpus bytes")
    m = p.add_argument_group("model (ReformerConfig)")
    m.add_argument("--attention", choices=ATTENTIONS, default="lsh")
    m.add_argument("--n-hashes", type=int, default=4)
    m.add_argument("--bucket-size", type=int, default=64)
    m.add_argument("--depth", type=int, default=2)
    m.add_argument("--d-model", type=int, default=256)
    m.add_argument("--n-heads", type=int, default=4)
    m.add_argument("--d-ff", type=int, default=512)
    m.add_argument("--ff-chunks", type=int, default=1)
    m.add_argument("--axial-shape", type=_axial_shape, default=None, help="e.g. 64,64; default: sinusoidal")
    m.add_argument("--reversible", action=argparse.BooleanOptionalAction, default=True)
    m.add_argument("--dropout", type=float, default=0.0)
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=1000)
    o.add_argument("--batch-size", type=int, default=8, help="global batch (sequences per step, all ranks)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per rank and step")
    o.add_argument("--lr", type=float, default=1e-3)
    o.add_argument("--warmup", type=int, default=100, help="linear warm-up steps, then cosine decay")
    o.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0 = off)")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    r = p.add_argument_group("logging and checkpoints")
    r.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<task>)")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--eval-every", type=int, default=100, help="0 = never")
    r.add_argument("--eval-batches", type=int, default=4)
    r.add_argument("--save-every", type=int, default=500)
    r.add_argument("--resume", nargs="?", const="auto", default=None, type=str,
                   help="resume from this checkpoint (no value: <out>/checkpoint.pt)")
    r.add_argument("--stop-at", type=int, default=None, help="checkpoint and exit after this step (time slicing)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Raise ValueError for option values the parser's types do not rule out."""
    for name in ("seq_len", "steps", "batch_size", "grad_accum", "log_every", "eval_batches", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "eval_every", "grad_clip"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.min_lr_ratio <= 1.0:
        raise ValueError(f"--min-lr-ratio must be in [0, 1], got {args.min_lr_ratio}")


def model_config(args: argparse.Namespace, vocab_size: int) -> ReformerConfig:
    """The ``ReformerConfig`` of the command line (causal: both tasks are language modelling)."""
    return ReformerConfig(
        vocab_size=vocab_size, d_model=args.d_model, n_heads=args.n_heads, depth=args.depth, d_ff=args.d_ff,
        max_seq_len=args.seq_len, attention=args.attention, bucket_size=args.bucket_size, n_hashes=args.n_hashes,
        causal=True, reversible=args.reversible, ff_chunks=args.ff_chunks, axial_shape=args.axial_shape,
        dropout=args.dropout)


def build_optimizer(model: nn.Module, args: argparse.Namespace) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (weight decay on matrices only) and linear warm-up then cosine decay to ``min_lr_ratio``."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98))
    warmup, total, floor = args.warmup, args.steps, args.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _run_meta(args: argparse.Namespace, config: ReformerConfig) -> dict[str, Any]:
    """What must not change between a run and its resumption: model, data and batch."""
    return {"config": dataclasses.asdict(config), "task": args.task, "seq_len": args.seq_len,
            "vocab_size": args.vocab_size, "text": None if args.text is None else str(args.text),
            "text_pattern": args.text_pattern, "max_bytes": args.max_bytes, "batch_size": args.batch_size,
            "seed": args.seed}


@contextmanager
def seeded_rng(seed: int, ctx: DistContext) -> Iterator[None]:
    """Seed torch's and Python's global RNGs with ``seed`` (the same on every rank, see
    ``train_loop``) for the block, and give the caller its own RNG states back afterwards."""
    python_state = random.getstate()
    with torch.random.fork_rng(devices=[ctx.device.index] if ctx.device.type == "cuda" else []):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)


def build_trainer(args: argparse.Namespace, ctx: DistContext) -> Trainer:
    """Task, model, optimizer and schedule of the command line, resumed when ``--resume`` says so."""
    if args.batch_size % (ctx.world_size * args.grad_accum):
        raise ValueError(f"--batch-size {args.batch_size} must be divisible by world size x --grad-accum "
                         f"= {ctx.world_size * args.grad_accum}")
    task = make_task(args.task, args.seq_len, seed=args.seed, vocab_size=args.vocab_size,
                     text_path=args.text, text_pattern=args.text_pattern, max_bytes=args.max_bytes)
    config = model_config(args, task.vocab_size)
    model = ReformerLM(config).to(ctx.device)
    optimizer, scheduler = build_optimizer(model, args)
    opts = LoopOptions(steps=args.steps, batch_size=args.batch_size, out_dir=args.out or Path("runs") / args.task,
                       grad_accum=args.grad_accum, grad_clip=args.grad_clip, log_every=args.log_every,
                       eval_every=args.eval_every, eval_batches=args.eval_batches, save_every=args.save_every,
                       stop_at=args.stop_at)
    trainer = Trainer(model, optimizer, scheduler, task, opts, ctx, _run_meta(args, config))
    if args.resume is not None:
        trainer.resume(trainer.checkpoint_path if args.resume == "auto" else Path(args.resume))
    return trainer


def run(args: argparse.Namespace) -> Trainer:
    """Train as ``args`` (from :func:`build_parser`) say; returns the finished :class:`Trainer`
    (its ``history`` holds the logged records, also written to ``<out>/log.jsonl``). The global
    RNGs are seeded with ``--seed`` for the run and restored to the caller's states on return."""
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = DistContext.from_env()
    try:
        with seeded_rng(args.seed, ctx):
            trainer = build_trainer(args, ctx)
            trainer.fit()
        return trainer
    finally:
        ctx.close()


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        parser.error(str(e))
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
