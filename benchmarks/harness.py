"""Timing and memory protocol for one configuration (runs inside the worker process).

Memory (``phase="memory"``, or the first half of ``phase="both"``): glibc in ``exact_rss_mode``
(see ``memory.py``), one warm-up forward+backward call (one-time costs: thread pools, kernel
caches and the ``.grad`` buffers of inputs/parameters, which then stay allocated like in a
training loop), then one forward+backward call measured by ``memory.peak_extra_bytes``.

Time (``phase="time"``, or the second half of ``phase="both"``), with the allocator a user's
process has: ``allocator="default"`` leaves glibc as it starts (the timing then runs in a
process of its own: ``exact_rss_mode`` cannot be undone); ``allocator="tuned"`` switches to
``caching_mode`` after the memory phase (glibc's settled steady state, about 20% faster for LSH
attention on CPU). A warm-up call (left out in ``both`` when the memory phase showed a call takes
longer than ``budget_s``), then the median of ``n`` forward calls (autograd recording, as in a
training step) and of ``n`` forward+backward calls. ``n`` is ``repeats``, reduced (to at least 1)
when the warm-up shows that ``repeats`` calls would take longer than ``budget_s``; when the
warm-up alone takes longer than ``budget_s``, it is the measurement (its first-call costs are
then a negligible share).

Single call (``single_call=True``, the ``--long`` preset where one call takes minutes): the
``.grad`` buffers are allocated up front (``Workload.leaves``) instead of by a warm-up. Memory: one
forward+backward call in ``exact_rss_mode`` (its time is not reported: every allocation there is
a fresh mapping, up to twice as slow as a user's process). Time, with the allocator a user's
process has (``"default"``: a process of its own, as above; ``"tuned"``: ``caching_mode`` after
the memory call): one forward+backward call, preceded by a warm-up call when the first call is
shorter than ``SINGLE_CALL_WARMUP_S`` (then the second call is the measurement).

CUDA calls are synchronised before reading the clock.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

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
    leaves: Sequence[Tensor] = field(default_factory=list)

    def allocate_grads(self) -> None:
        """Give every leaf that requires grad a zero ``.grad`` (what a warm-up call leaves behind)."""
        for t in self.leaves:
            if t.requires_grad and t.grad is None:
                t.grad = torch.zeros_like(t)


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


ALLOCATORS = ("default", "tuned")
SINGLE_CALL_WARMUP_S = 60.0  # single-call timing: a first call shorter than this is a warm-up
PHASES = ("both", "memory", "time")


def _timing(workload: Workload, step: Callable[[], None], device: torch.device, repeats: int, budget_s: float,
            warmup_ms: Optional[float], time_forward: bool) -> dict:
    """The time phase; ``warmup_ms``: an earlier call's time in this process (None: none yet)."""
    if warmup_ms is None or warmup_ms < budget_s * 1e3:
        warmup_ms = _median_ms(step, device, 1)
        if warmup_ms >= budget_s * 1e3:  # one call is over the budget: the warm-up is the measurement
            fwd = _median_ms(workload.forward, device, 1) if time_forward else None
            return {"time_fwd_ms": fwd, "time_fwdbwd_ms": warmup_ms, "repeats": 1, "warmup_ms": warmup_ms}
    n = max(1, min(repeats, int(budget_s * 1e3 / max(warmup_ms, 1e-3))))
    return {
        "time_fwd_ms": _median_ms(workload.forward, device, n) if time_forward else None,
        "time_fwdbwd_ms": _median_ms(step, device, n),
        "repeats": n,
        "warmup_ms": warmup_ms,
    }


def _single_call(workload: Workload, step: Callable[[], None], device: torch.device, phase: str, allocator: str,
                 result: dict) -> dict:
    """The single-call protocol (see the module docstring)."""
    workload.allocate_grads()
    if phase in ("both", "memory"):
        exact_rss_mode()
        result.update(peak_mem_mib=peak_extra_bytes(step, device) / MIB)
        if allocator == "tuned":
            caching_mode()
    if phase in ("both", "time"):
        first_ms = _median_ms(step, device, 1)
        if first_ms < SINGLE_CALL_WARMUP_S * 1e3:
            result.update(time_fwdbwd_ms=_median_ms(step, device, 1), repeats=1, warmup_ms=first_ms)
        else:
            result.update(time_fwdbwd_ms=first_ms, repeats=1, warmup_ms=0.0)
    return result


def measure(workload: Workload, device: torch.device, repeats: int, budget_s: float, *, phase: str = "both",
            allocator: str = "tuned", single_call: bool = False, time_forward: bool = True) -> dict:
    """Runs the protocol above; returns ``time_fwd_ms``, ``time_fwdbwd_ms``, ``peak_mem_mib``
    (those of the phase run; the others None), ``repeats`` (the ``n`` used) and ``warmup_ms``."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {ALLOCATORS}, got {allocator!r}")
    if phase == "both" and allocator == "default":
        raise ValueError("allocator='default' times in a process of its own: run phase='memory' and phase='time'")
    step = training_step(workload)
    result = {"time_fwd_ms": None, "time_fwdbwd_ms": None, "peak_mem_mib": None, "repeats": 0, "warmup_ms": None}
    if single_call:
        return _single_call(workload, step, device, phase, allocator, result)
    warmup_ms = None
    if phase in ("both", "memory"):
        exact_rss_mode()
        warmup_ms = _median_ms(step, device, 1)
        result.update(peak_mem_mib=peak_extra_bytes(step, device) / MIB, warmup_ms=warmup_ms)
    if phase in ("both", "time"):
        if allocator == "tuned":
            caching_mode()
        result.update(_timing(workload, step, device, repeats, budget_s, warmup_ms, time_forward))
    return result
