"""The process group of a training run: one process, or ``torchrun`` data parallelism.

Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) :meth:`DistContext.from_env` joins
the process group (``nccl`` on GPU, ``gloo`` on CPU) and :meth:`DistContext.wrap` puts the
model in ``DistributedDataParallel``. Otherwise both are no-ops, so the training loop has one
code path.

Reversible layers need no special DDP mode: ``ReversibleSequence`` (and ``ChunkedFeedForward``)
take the parameters as explicit inputs of their ``autograd.Function`` and return their
gradients from its backward, so each parameter's gradient is accumulated once per backward and
DDP's per-parameter hooks fire as for any layer (no ``static_graph``, no
``find_unused_parameters``). Gradient accumulation uses ``no_sync`` on every micro-batch but the
last. :meth:`DistContext.check_replicas`, run at every checkpoint, turns a missed
synchronisation into an error instead of a silently forked model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .data import Shard


@dataclass(frozen=True)
class DistContext:
    """This process's ``rank`` of ``world_size`` and its ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls) -> "DistContext":
        """Read torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; join the group when world size > 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        if world_size > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(rank, world_size, local_rank, device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and the progress bar."""
        return self.rank == 0

    @property
    def shard(self) -> Shard:
        return Shard(self.rank, self.world_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in ``DistributedDataParallel`` when distributed (rank 0's weights are
        broadcast to every rank), else ``model`` itself."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def sum(self, x: Tensor) -> Tensor:
        """``x`` summed over ranks (in place when distributed)."""
        if self.distributed:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def check_replicas(self, model: nn.Module) -> None:
        """Raise if the ranks' parameters differ (gradients not synchronised): compares every
        parameter's float64 sum across ranks, exactly. A no-op in one process."""
        if not self.distributed:
            return
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(self.device)
        gathered = [torch.empty_like(sums) for _ in range(self.world_size)]
        dist.all_gather(gathered, sums)
        names = [n for n, _ in model.named_parameters()]
        for rank, other in enumerate(gathered):
            if not torch.equal(other, sums):
                bad = names[int((other != sums).nonzero()[0])]
                raise RuntimeError(f"rank {rank} and rank {self.rank} hold different parameters (first: {bad}): "
                                   "gradients were not synchronised")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
