"""The training loop behind ``python -m reformer.train``: steps, evaluation, checkpoints, logs.

Determinism contract (what makes ``--resume`` exact): batch ``s`` is a pure function of the
seed and ``s`` (``reformer.data``), evaluation runs under ``torch.random.fork_rng`` so it never
moves the training RNG stream, and a checkpoint holds the model, optimizer, scheduler, step and
the RNG states. Every rank seeds its global RNG identically, so LSH rotations agree across ranks
(as they would in one process on the whole batch) and rank 0's RNG state stands for all ranks.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .checkpoint import save_training_checkpoint
from .data import Shard
from .train_dist import DistContext


class Task(Protocol):
    vocab_size: int
    seq_len: int

    def batch(self, index: int, global_batch: int, *, split: str = "train", shard: Shard = Shard()
              ) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class LoopOptions:
    """How to train: ``steps`` optimizer steps on global batches of ``batch_size`` sequences
    (split over ranks, then into ``grad_accum`` micro-batches per rank)."""

    steps: int
    batch_size: int
    out_dir: Path
    grad_accum: int = 1
    grad_clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    save_every: int = 500
    stop_at: Optional[int] = None


def masked_lm_loss(logits: Tensor, tokens: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token loss over the scored positions.

    logits ``(B, N, V)``, tokens ``(B, N)``, loss_mask ``(B, N - 1)`` bool (True = the prediction
    of ``tokens[:, t + 1]`` at position ``t`` counts). Returns (mean loss over scored positions,
    number correct, number scored); the counts are float tensors, for summing over ranks.
    """
    pred, target = logits[:, :-1], tokens[:, 1:]  # (B, N-1, V), (B, N-1)
    ce = F.cross_entropy(pred.reshape(-1, pred.shape[-1]).float(), target.reshape(-1), reduction="none")
    weight = loss_mask.reshape(-1).to(ce.dtype)
    count = weight.sum()
    loss = (ce * weight).sum() / count.clamp_min(1.0)
    correct = ((pred.argmax(-1) == target) & loss_mask).sum().to(ce.dtype)
    return loss, correct, count


def _summary(stats: Tensor) -> dict[str, float]:
    """``stats`` = (loss * count, correct, count) summed over ranks -> mean loss and accuracy."""
    loss_sum, correct, count = stats.tolist()
    return {"loss": loss_sum / max(count, 1.0), "acc": correct / max(count, 1.0)}


def train_step(model: nn.Module, task: Task, step: int, opts: LoopOptions, ctx: DistContext) -> Tensor:
    """Forward/backward of global batch ``step`` (this rank's rows, in ``grad_accum`` parts).

    Gradients are averaged over ranks by DDP on the last part only (``no_sync`` before it).
    Returns this rank's (loss * count, correct, count).
    """
    tokens, mask = task.batch(step, opts.batch_size, shard=ctx.shard)
    stats = torch.zeros(3, dtype=torch.float64)
    parts = list(zip(tokens.chunk(opts.grad_accum), mask.chunk(opts.grad_accum)))
    for i, (t, m) in enumerate(parts):
        sync = nullcontext() if (not ctx.distributed or i == len(parts) - 1) else model.no_sync()
        with sync:
            t, m = t.to(ctx.device), m.to(ctx.device)
            loss, correct, count = masked_lm_loss(model(t), t, m)
            (loss / len(parts)).backward()
        stats += torch.stack([loss.detach() * count, correct, count]).double().cpu()
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, opts: LoopOptions, ctx: DistContext) -> dict[str, float]:
    """Mean loss and accuracy on the first ``eval_batches`` validation batches (every rank its
    shard), without moving the training RNG stream."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(3, dtype=torch.float64)
    devices = [ctx.device.index] if ctx.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for index in range(opts.eval_batches):
            tokens, mask = task.batch(index, opts.batch_size, split="val", shard=ctx.shard)
            tokens, mask = tokens.to(ctx.device), mask.to(ctx.device)
            loss, correct, count = masked_lm_loss(model(tokens), tokens, mask)
            stats += torch.stack([loss * count, correct, count]).double().cpu()
    model.train(was_training)
    return _summary(ctx.sum(stats))


class Trainer:
    """Owns one run: model (unwrapped), optimizer, LR scheduler, step counter, checkpoint and log.

    ``meta`` (``{"setup": ..., "settings": ...}`` of plain values, see ``reformer.train_config``)
    is stored in each checkpoint (format: ``reformer.checkpoint``). Only rank 0 writes the
    checkpoint ``out_dir/checkpoint.pt`` and the JSON-lines log ``out_dir/log.jsonl`` (appending;
    ``reformer.train.run`` makes sure a new run starts in a folder without a run); every rank
    reads the checkpoint on resume (``reformer.train`` loads it into the trainer, then calls
    :meth:`repair_log`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, task: Task,
                 opts: LoopOptions, ctx: DistContext, meta: dict[str, Any]):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.task, self.opts, self.ctx, self.meta = task, opts, ctx, meta
        self.step = 0
        self.history: list[dict[str, Any]] = []

    @property
    def checkpoint_path(self) -> Path:
        return self.opts.out_dir / "checkpoint.pt"

    @property
    def log_path(self) -> Path:
        return self.opts.out_dir / "log.jsonl"

    def save(self) -> None:
        """Write the checkpoint (rank 0), after checking that the ranks hold the same weights."""
        self.ctx.check_replicas(self.model)
        if self.ctx.is_main:
            save_training_checkpoint(self.checkpoint_path, step=self.step, meta=self.meta, model=self.model,
                                     optimizer=self.optimizer, scheduler=self.scheduler)
        self.ctx.barrier()

    def repair_log(self) -> None:
        """Make the log agree with a checkpoint just loaded at ``self.step`` (rank 0): drop records
        written after that step (a crash between saves) and lines that are not complete JSON
        records (a crash in the middle of a write), with a warning naming them."""
        if not self.ctx.is_main or not self.log_path.exists():
            return
        kept, bad = [], []
        for number, line in enumerate(self.log_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                step = json.loads(line)["step"]
                if not isinstance(step, int):
                    raise TypeError(step)
            except (ValueError, KeyError, TypeError, IndexError):
                bad.append(number)
                continue
            if step <= self.step:
                kept.append(line)
        if bad:
            warnings.warn(f"{self.log_path}: dropped {len(bad)} incomplete line(s) (line {', '.join(map(str, bad))}; "
                          "a write was interrupted); the checkpoint is intact", RuntimeWarning, stacklevel=2)
        tmp = self.log_path.with_name(f".{self.log_path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.log_path)

    def record(self, record: dict[str, Any], bar: Optional[tqdm] = None) -> None:
        """Append ``record`` to ``history`` and (rank 0) to the log file."""
        self._log(record, bar)

    def _log(self, record: dict[str, Any], bar: Optional[tqdm]) -> None:
        self.history.append(record)
        if not self.ctx.is_main:
            return
        with self.log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if bar is not None:
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"}, refresh=False)

    def _update(self, model: nn.Module) -> Tensor:
        """One optimizer step on global batch ``self.step``; returns this rank's loss statistics."""
        stats = train_step(model, self.task, self.step, self.opts, self.ctx)
        if self.opts.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.opts.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return stats

    def fit(self) -> None:
        """Train until ``opts.steps`` (or ``opts.stop_at``), checkpointing every ``save_every``
        steps and at the end; records go to ``history`` (and the log file)."""
        opts, ctx = self.opts, self.ctx
        end = opts.steps if opts.stop_at is None else min(opts.stop_at, opts.steps)
        if ctx.is_main:
            opts.out_dir.mkdir(parents=True, exist_ok=True)
        model = ctx.wrap(self.model)
        model.train()
        meter = _Meter(opts.batch_size * self.task.seq_len)
        with tqdm(total=opts.steps, initial=self.step, disable=not ctx.is_main, unit="step", dynamic_ncols=True,
                  mininterval=1.0) as bar:
            while self.step < end:
                meter.add(self._update(model))
                bar.update(1)
                if self.step % opts.log_every == 0 or self.step == end:
                    lr = self.scheduler.get_last_lr()[0]
                    self._log({"step": self.step, **meter.summary(ctx), "lr": lr}, bar)
                if opts.eval_every and self.step % opts.eval_every == 0:
                    metrics = evaluate(model, self.task, opts, ctx)
                    self._log({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}}, bar)
                if self.step % opts.save_every == 0 or self.step == end:
                    self.save()


class _Meter:
    """Loss statistics and throughput since the last summary."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self._reset()

    def _reset(self) -> None:
        self.stats, self.steps, self.tic = torch.zeros(3, dtype=torch.float64), 0, time.perf_counter()

    def add(self, stats: Tensor) -> None:
        self.stats += stats
        self.steps += 1

    def summary(self, ctx: DistContext) -> dict[str, float]:
        """Global mean loss and accuracy over the window, and tokens per second (all ranks)."""
        out = _summary(ctx.sum(self.stats))
        out["tokens_per_s"] = self.steps * self.tokens_per_step / max(time.perf_counter() - self.tic, 1e-9)
        self._reset()
        return out
