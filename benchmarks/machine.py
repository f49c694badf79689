"""What a run was measured on: device, library versions, CPU, threads, memory, git commit."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch

MEMORY_METHOD = {
    "cpu": "peak RSS (VmHWM, reset via /proc/self/clear_refs) above the RSS before the call, glibc set to mmap "
           "every block >= 128 KiB, one fresh process per case, after one warm-up call",
    "cuda": "torch.cuda.max_memory_allocated above memory_allocated before the call (peak stats reset), "
            "one fresh process per case, after one warm-up call",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def describe(device: str, dtype: str, quick: bool, threads: Optional[int] = None) -> dict[str, Any]:
    """Metadata for ``results.json`` and the banner; ``threads``: the workers' torch threads
    (None = torch's default)."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "command": " ".join([os.path.basename(sys.executable), "-m", __package__, *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "device": device,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else cpu_model(),
        "cpu": cpu_model(),
        "threads": threads or torch.get_num_threads(),
        "ram_gib": round(ram, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peers": {p: _version(p) for p in ("reformer-pytorch", "transformers")},
        "quick": quick,
        "dtype": dtype,
        "memory_method": MEMORY_METHOD[device],
    }


def banner(meta: dict[str, Any], shapes: list[str]) -> str:
    lines = [
        f"reformer benchmarks ({meta.get('preset', 'quick' if meta['quick'] else 'full')}) | {meta['date']} | "
        f"commit {meta['git_commit']}",
        f"device {meta['device']} ({meta['device_name']}) | {meta['threads']} threads | RAM {meta['ram_gib']} GiB",
        f"python {meta['python']} | torch {meta['torch']} | triton {meta['triton']} | "
        + " | ".join(f"{k} {v}" for k, v in meta["peers"].items()),
        f"dtype {meta['dtype']} | allocator (CPU timing): {meta.get('allocator', 'default')} | "
        f"memory: {meta['memory_method']}",
        *shapes,
    ]
    width = max(map(len, lines))
    return "\n".join(["=" * width, *lines, "=" * width])

