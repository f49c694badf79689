"""Timing and memory protocol for one configuration (runs inside the worker process).

Protocol, the same for every provider:

1. warm-up: one forward+backward call (one-time costs: thread pools, kernel caches and the
   ``.grad`` buffers of inputs/parameters, which then stay allocated like in a training loop);
2. peak memory: one forward+backward call measured by ``memory.peak_extra_bytes`` (on CPU with
   glibc in ``exact_rss_mode``, see ``memory.py``);
3. a second warm-up call after switching glibc to ``caching_mode`` (ordinary steady state),
   left out when a call takes longer than ``budget_s`` (filling the allocator's cache then
   costs a negligible share of the call);
4. forward time: median of ``n`` forward calls (autograd recording, as in a training step);
5. forward+backward time: median of ``n`` forward+backward calls.

``n`` is ``repeats``, reduced (to at least 1) when the warm-ups show that ``repeats`` calls
would take longer than ``budget_s``. CUDA calls are synchronised before reading the clock.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .memory import MIB, caching_mode, exact_rss_mode, peak_extra_bytes


@dataclass
class Workload:
    """One configuration ready to run.

    forward: runs the op or model once and returns its output: the attention output
        ``(B, H, N, D)``, or a scalar loss for a training step.
    """

    forward: Callable[[], Tensor]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[], object], device: torch.device, n: int) -> float:
    times = []
    for _ in range(n):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def training_step(workload: Workload, seed: int = 0) -> Callable[[], None]:
    """forward + backward; a non-scalar output is back-propagated with a fixed random gradient
    (created once, so it is part of the memory baseline)."""
    grad: dict[str, Optional[Tensor]] = {}

    def step() -> None:
        out = workload.forward()
        if "g" not in grad:
            gen = torch.Generator(device=out.device).manual_seed(seed)
            grad["g"] = None if out.dim() == 0 else torch.randn(out.shape, generator=gen, device=out.device,
                                                                 dtype=out.dtype)
        out.backward(grad["g"])

    return step


def measure(workload: Workload, device: torch.device, repeats: int, budget_s: float) -> dict:
    """Runs the protocol above; returns ``time_fwd_ms``, ``time_fwdbwd_ms``, ``peak_mem_mib``,
    ``repeats`` (the ``n`` used) and ``warmup_ms``."""
    step = training_step(workload)
    exact_rss_mode()
    warmup_ms = _median_ms(step, device, 1)
    peak = peak_extra_bytes(step, device)
    caching_mode()
    if warmup_ms < budget_s * 1e3:
        warmup_ms = _median_ms(step, device, 1)
    n = max(1, min(repeats, int(budget_s * 1e3 / max(warmup_ms, 1e-3))))
    return {
        "time_fwd_ms": _median_ms(workload.forward, device, n),
        "time_fwdbwd_ms": _median_ms(step, device, n),
        "peak_mem_mib": peak / MIB,
        "repeats": n,
        "warmup_ms": warmup_ms,
    }
