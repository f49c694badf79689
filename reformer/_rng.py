"""Capture and replay the global RNG state, for layers that recompute activations in backward.

A recomputed forward must draw the same random numbers as the original one (dropout masks,
LSH rotations). ``RngState.capture()`` records the CPU generator and, when CUDA has been
initialised, every CUDA device's generator; ``replay()`` runs a block from that state inside
``torch.random.fork_rng``, so the caller's RNG stream is left exactly as it was. The global
seed is never reset.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class RngState:
    """A snapshot of the CPU RNG state and the CUDA RNG states (None when CUDA is not in use)."""

    cpu: Tensor
    cuda: Optional[list[Tensor]]

    @classmethod
    def capture(cls) -> "RngState":
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the block with the RNG as it was at ``capture()``; restore the current state after."""
        devices = list(range(len(self.cuda))) if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state_all(self.cuda)
            yield
