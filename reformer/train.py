r"""Train a ``ReformerLM`` on long sequences: ``python -m reformer.train --help`` or, from Python,
``reformer.train.run(TrainConfig(...))`` (:class:`reformer.train_config.TrainConfig`).

Tasks: ``duplication`` (the Reformer paper's ``0 w 0 w`` copy task, scored on the second copy)
and ``text`` (byte-level language modelling on a local file or folder; by default the Python
standard library's sources, so nothing is downloaded).

A run lives in one folder (``out``): ``checkpoint.pt`` (see :mod:`reformer.checkpoint`),
``log.jsonl`` and, at the end, ``model/`` (``ReformerLM.save_pretrained``). A new run refuses a
folder that holds one unless ``overwrite``; ``resume`` continues it exactly, refusing changed
model/data options and applying changed optimisation options (docs/training.md).

``batch_size`` is the global batch: it is split over the ranks (and ``grad_accum`` parts), so
the same command trains the same model on 1 or W processes (``torchrun --nproc_per_node=W``).
"""
from __future__ import annotations

import math
import random
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .checkpoint import CheckpointError, load_training_checkpoint, restore_training_state
from .data import make_task
from .model import ReformerLM
from .train_config import TrainConfig, build_parser, config_from_namespace
from .train_dist import DistContext
from .train_loop import LoopOptions, Trainer

__all__ = ["TrainConfig", "TrainSetupError", "RunExistsError", "build_parser", "run", "main"]

RUN_FILES = ("checkpoint.pt", "log.jsonl", "model")


class TrainSetupError(ValueError):
    """A run cannot start as configured (its folder, its resumption, its batch split); nothing
    was trained or written. The command line prints the message and exits with status 2."""


class RunExistsError(TrainSetupError):
    """A new run was asked for in a folder that holds a run (neither resume nor overwrite)."""


def lr_factor(config: TrainConfig) -> Callable[[int], float]:
    """The learning-rate multiplier after ``step`` scheduler steps: linear warm-up over
    ``warmup`` steps, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    warmup, total, floor = config.warmup, config.steps, config.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: nn.Module, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (weight decay on matrices only) and the :func:`lr_factor` schedule."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.98))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))


def apply_optimisation_settings(optimizer: torch.optim.Optimizer, scheduler: Any, config: TrainConfig) -> None:
    """After loading a checkpoint's optimizer and scheduler state, make ``config``'s ``lr``,
    schedule (``warmup``, ``min_lr_ratio``, ``steps``) and ``weight_decay`` the ones in force
    from the checkpoint's step on. With unchanged values this sets exactly the restored values."""
    factor = lr_factor(config)
    scheduler.lr_lambdas = [factor] * len(optimizer.param_groups)
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    lrs = [base * factor(scheduler.last_epoch) for base in scheduler.base_lrs]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["initial_lr"], group["lr"] = config.lr, lr
    optimizer.param_groups[0]["weight_decay"] = config.weight_decay  # group 1 (vectors) never decays
    scheduler._last_lr = lrs  # what get_last_lr() reports until the next step


@contextmanager
def seeded_global_rng(seed: int, ctx: DistContext) -> Iterator[None]:
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


def _notice(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        print(f"reformer.train: {message}", file=sys.stderr, flush=True)


def prepare_run_folder(config: TrainConfig, ctx: DistContext) -> None:
    """Check up front that the run folder can be used: a new run refuses a folder holding a run
    (unless ``overwrite``, which deletes it), ``resume`` needs its checkpoint, and rank 0 must be
    able to write there (a probe file is created and removed)."""
    out = config.out_dir
    if config.resume is False:
        existing = [name for name in RUN_FILES if (out / name).exists()]
        if existing and not config.overwrite:
            raise RunExistsError(
                f"{out} already holds a run ({', '.join(existing)}): pass --resume (resume=True) to continue "
                "it, or --overwrite (overwrite=True) to delete it and start a new run there")
    elif not config.checkpoint_path.exists():
        raise TrainSetupError(f"cannot resume: no checkpoint at {config.checkpoint_path} (start without "
                              "--resume to begin a new run)")
    if not ctx.is_main:
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out, prefix=".write-probe-"):
            pass
    except OSError as e:
        raise TrainSetupError(f"run folder --out {out} is not usable: {e.strerror or e} "
                              f"({type(e).__name__})") from e
    if config.resume is False and config.overwrite:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


def _differences(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (saved.get(k), v) for k, v in given.items() if saved.get(k) != v}


def _resume(trainer: Trainer, config: TrainConfig, ctx: DistContext) -> None:
    """Load the checkpoint into ``trainer``: refuse changed setup fields and a ``steps`` or
    ``stop_at`` not after the saved step; apply and log changed settings."""
    path = config.checkpoint_path
    state = load_training_checkpoint(path)
    setup_diff = _differences(state["meta"]["setup"], trainer.meta["setup"])
    if setup_diff:
        fields = ", ".join(f"--{k.replace('_', '-')} (saved {a!r}, given {b!r})" for k, (a, b) in setup_diff.items())
        raise CheckpointError(path, f"was written by a run with other model/data options: {fields}; these cannot "
                                    "change on resume: use the saved values, or start a new run in another --out")
    saved_step = state["step"]
    if config.steps < saved_step:
        raise TrainSetupError(f"--steps {config.steps} is below the checkpoint's step {saved_step} ({path}): "
                              f"give --steps >= {saved_step} to resume")
    if config.stop_at is not None and config.stop_at <= saved_step:
        raise TrainSetupError(f"--stop-at {config.stop_at} is not after the checkpoint's step {saved_step} "
                              f"({path}): nothing to train")
    restore_training_state(path, state, model=trainer.model, optimizer=trainer.optimizer,
                           scheduler=trainer.scheduler)
    trainer.step = saved_step
    apply_optimisation_settings(trainer.optimizer, trainer.scheduler, config)
    trainer.repair_log()
    changed = _differences(state["meta"]["settings"], trainer.meta["settings"])
    if changed:
        trainer.record({"step": saved_step, "resumed_with": {k: [a, b] for k, (a, b) in changed.items()}})
        _notice(ctx, f"resuming at step {saved_step} with changed settings (applied from here on): "
                + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
    if saved_step == config.steps:
        _notice(ctx, f"the checkpoint is already at --steps {config.steps}: nothing to train")


def build_trainer(config: TrainConfig, ctx: DistContext) -> Trainer:
    """Task, model, optimizer and schedule of ``config``, resumed when ``config.resume`` says so."""
    if config.batch_size % (ctx.world_size * config.grad_accum):
        raise TrainSetupError(f"--batch-size {config.batch_size} must be divisible by world size x --grad-accum "
                              f"= {ctx.world_size * config.grad_accum}")
    try:
        task = make_task(config.task, config.seq_len, seed=config.seed, vocab_size=config.vocab_size,
                         text_path=config.text, text_pattern=config.text_pattern, max_bytes=config.max_bytes)
        model_config = config.model_config(task.vocab_size)
    except (ValueError, FileNotFoundError) as e:
        raise TrainSetupError(str(e)) from e
    model = ReformerLM(model_config).to(ctx.device)
    optimizer, scheduler = build_optimizer(model, config)
    opts = LoopOptions(steps=config.steps, batch_size=config.batch_size, out_dir=config.out_dir,
                       grad_accum=config.grad_accum, grad_clip=config.grad_clip, log_every=config.log_every,
                       eval_every=config.eval_every, eval_batches=config.eval_batches, save_every=config.save_every,
                       stop_at=config.stop_at)
    meta = {"setup": config.setup(), "settings": config.settings()}
    trainer = Trainer(model, optimizer, scheduler, task, opts, ctx, meta)
    if config.resume is not False:
        _resume(trainer, config, ctx)
    return trainer


def export_model(trainer: Trainer, config: TrainConfig) -> Optional[Path]:
    """Save the trained model to ``out/model`` with ``ReformerLM.save_pretrained`` (rank 0);
    returns the folder, or None when there is nothing to export (no ``save_pretrained``)."""
    save = getattr(trainer.model, "save_pretrained", None)
    if save is None:
        return None
    folder = config.out_dir / "model"
    if trainer.ctx.is_main:
        save(folder)
    trainer.ctx.barrier()
    return folder


def run(config: TrainConfig) -> Trainer:
    """Train as ``config`` says; returns the finished :class:`Trainer` (its ``history`` holds the
    logged records, also written to ``<out>/log.jsonl``).

    Before anything is built, the run folder is checked (:func:`prepare_run_folder`); a
    problem with the folder, the checkpoint or the resumption raises :class:`TrainSetupError`
    or :class:`reformer.checkpoint.CheckpointError` (both ``ValueError``). The global RNGs are
    seeded with ``config.seed`` for the run and restored to the caller's states on return.
    When the run reaches ``steps`` and ``config.export`` is set, the model is saved to
    ``<out>/model``.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (TrainConfig.from_args(argv) parses command-line "
                        f"strings), got {type(config).__name__}")
    if config.threads:
        torch.set_num_threads(config.threads)
    ctx = DistContext.from_env()
    try:
        prepare_run_folder(config, ctx)
        ctx.barrier()
        with seeded_global_rng(config.seed, ctx):
            trainer = build_trainer(config, ctx)
            trainer.fit()
        if config.export and trainer.step >= config.steps:
            export_model(trainer, config)
        return trainer
    finally:
        ctx.close()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """The ``reformer-train`` command: option errors and run-setup problems (an occupied or
    unwritable folder, a damaged or mismatching checkpoint) print one line and exit with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = config_from_namespace(args)
        except (ValueError, TypeError) as e:
            parser.error(str(e))
    for w in caught:
        print(f"{parser.prog}: warning: {w.message}", file=sys.stderr)
    try:
        run(config)
    except (TrainSetupError, CheckpointError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
