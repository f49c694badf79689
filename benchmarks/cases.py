"""Providers, cases and result records shared by the sub-benchmarks.

A *provider* is one implementation (naive attention, SDPA, LSH with the torch backend, a
ReformerLM variant...). A *case* is one provider at one set of parameters. Running a case
gives a *record*, one entry of ``results.json`` (schema in ``report.py``).
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from .harness import Workload

STATUSES = ("ok", "skipped", "unavailable", "timeout", "error")


@dataclass(frozen=True)
class Provider:
    """One implementation under test.

    build(params, device) -> Workload: allocates inputs/model (runs in the worker process).
    est_bytes(params): estimated peak extra bytes of a forward+backward call (for skipping).
    cost(params): forward FLOPs (documented per provider); predicts run time from a smaller
        measured case of the same series, and gives the GFLOP/s column.
    missing(): why the provider cannot run here (package not importable), or None.
    needs_cuda: Triton backends; reported as skipped on CPU.
    gflops: a rough forward+backward rate on a 2-core CPU, only used to estimate run times
        before anything has been measured (the plan printed before a run).
    base_bytes(params): memory the worker holds before the measured call (inputs and their
        ``.grad`` buffers); a case is skipped when ``est_bytes + base_bytes`` exceeds the limit.
    """

    name: str
    build: Callable[[dict, torch.device], Workload]
    est_bytes: Callable[[dict], float]
    cost: Callable[[dict], float]
    missing: Callable[[], Optional[str]] = lambda: None
    needs_cuda: bool = False
    gflops: float = 30.0
    base_bytes: Callable[[dict], float] = lambda params: 0.0


@dataclass(frozen=True)
class Case:
    """benchmark: module name (attention/model); series: the line it belongs to in tables
    and plots; params: JSON-serialisable parameters handed to ``Provider.build``."""

    benchmark: str
    provider: str
    series: str
    params: dict[str, Any] = field(default_factory=dict)


def make_record(case: Case, status: str, note: str = "", **values: Any) -> dict[str, Any]:
    """A ``results.json`` record; missing measurements are ``None``."""
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    record: dict[str, Any] = {
        "benchmark": case.benchmark,
        "provider": case.provider,
        "series": case.series,
        "params": dict(case.params),
        "status": status,
        "note": note,
        "time_fwd_ms": None,
        "time_fwdbwd_ms": None,
        "peak_mem_mib": None,
    }
    record.update(values)
    return record


def requires(*targets: str) -> Callable[[], Optional[str]]:
    """A ``Provider.missing`` checking ``"package.module"`` (found without importing it) or
    ``"package.module:name"`` (imported, then ``name`` looked up); reports the first missing one."""

    def missing() -> Optional[str]:
        for target in targets:
            module, _, attr = target.partition(":")
            try:
                if not attr:
                    if importlib.util.find_spec(module) is None:
                        return f"{module} not importable"
                elif not hasattr(importlib.import_module(module), attr):
                    return f"{module}.{attr} not found"
            except Exception as exc:  # a broken install is "unavailable", not a crash
                return f"{target}: {type(exc).__name__}: {exc}"
        return None

    return missing
