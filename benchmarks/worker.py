"""Each configuration runs in a fresh Python process, so memory left cached by a previous
configuration cannot hide or inflate its peak, a crash or an out-of-memory kill costs only
that configuration, and a hung one is stopped by a timeout.

``run_case`` (parent side) starts ``python -m benchmarks.worker``, sends the case as JSON on
stdin and reads one JSON result line back; ``main`` (child side) builds the workload and runs
``harness.measure``. With the default allocator a case takes two processes (memory, then
time; see ``harness``), with ``tuned`` one. The worker has no memory limit
of its own: cases estimated above the run's limit are skipped before they start.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

from .cases import Case, Provider, make_record

RESULT_PREFIX = "BENCH_RESULT "
_ROOT = str(Path(__file__).resolve().parent.parent)


def load_provider(case: Case) -> Provider:
    """The provider named by the case, from ``benchmarks.<case.benchmark>.PROVIDERS``."""
    module = importlib.import_module(f"{__package__}.{case.benchmark}")
    return module.PROVIDERS[case.provider]


def _error_note(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode in (-9, 137):
        return "killed by signal 9 (out of memory?)"
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"worker exited with code {proc.returncode}"


def _run_phase(case: Case, spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))
    try:
        proc = subprocess.run([sys.executable, "-m", f"{__package__}.worker"], input=json.dumps(spec),
                              capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"> {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    return {"status": "error", "note": _error_note(proc)}


def run_case(case: Case, *, device: str, repeats: int, budget_s: float, timeout_s: float,
             threads: Optional[int] = None, allocator: str = "default", single_call: bool = False,
             time_forward: bool = True, memory_only: bool = False) -> dict[str, Any]:
    """Runs one case in fresh processes; returns its record (``ok``, ``timeout`` or ``error``)
    with ``allocator`` ("default" or "tuned": the glibc mode of the timing) set.
    ``memory_only``: the memory phase alone (no time)."""
    spec = {"case": dataclasses.asdict(case), "device": device, "repeats": repeats, "budget_s": budget_s,
            "threads": threads, "allocator": allocator, "single_call": single_call, "time_forward": time_forward}
    phases = ["memory"] if memory_only else ["memory", "time"] if allocator == "default" else ["both"]
    merged: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    for phase in phases:
        result = _run_phase(case, dict(spec, phase=phase), max(1.0, deadline - time.monotonic()))
        if result["status"] != "ok":
            if result["status"] == "timeout":
                result["note"] = f"> {timeout_s:.0f} s"
            return make_record(case, result["status"], result["note"])
        merged.update({k: v for k, v in result.items() if v is not None or k not in merged})
    merged.pop("status"), merged.pop("note")
    return make_record(case, "ok", "", allocator=allocator, **merged)


def main() -> None:
    import torch

    from .harness import measure

    spec = json.loads(sys.stdin.read())
    case = Case(**spec["case"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)  # model weights: the same in every run (this is a throw-away process)
    device = torch.device(spec["device"])
    try:
        workload = load_provider(case).build(case.params, device)
        values = measure(workload, device, spec["repeats"], spec["budget_s"], phase=spec.get("phase", "both"),
                         allocator=spec.get("allocator", "tuned"), single_call=spec.get("single_call", False),
                         time_forward=spec.get("time_forward", True))
        result = {"status": "ok", "note": "", **values}
    except Exception as exc:  # reported as an "error" record, the suite goes on
        traceback.print_exc()
        result = {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
