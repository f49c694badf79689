"""Peak extra memory of one call, on CUDA and on CPU.

CUDA: ``torch.cuda.reset_peak_memory_stats`` before the call, then
``max_memory_allocated() - memory_allocated()`` measured before the call.

CPU (Linux, glibc): the peak resident set size of the process. Writing ``5`` to
``/proc/self/clear_refs`` resets the high-water mark ``VmHWM`` to the current RSS; after the
call, ``VmHWM - RSS before`` is everything the call made resident (activations, saved tensors,
workspace, outputs, gradients). For RSS to follow live allocations, glibc must not serve the
call from memory that earlier calls freed but kept: ``exact_rss_mode()`` (set before the
first call of the workload) gives every block >= 128 KiB its own ``mmap``, returned to the
kernel when freed, and ``malloc_trim(0)`` before the call releases what small blocks left
behind. Without it the peak depends on allocation history (naive attention at N=512, B=1, H=8
read 50-67 MiB instead of 26 MiB; switching modes late, after blocks were already cached, is
not enough either). Timing runs afterwards in ``caching_mode()``, the state glibc's adaptive
thresholds settle in by themselves, so times are those of an ordinary process.

The caller runs a warm-up call first (thread pools, kernel caches and ``.grad`` buffers then
belong to the baseline) and each configuration in a fresh process (``worker.py``).
``tests/test_benchmarks.py`` checks the method against allocations of known size.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable, Optional

import torch

MIB = 2**20
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(key: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``VmRSS``, ``VmHWM``) in bytes."""
    with open(_STATUS) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in {_STATUS}")


def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def exact_rss_mode() -> None:
    """Blocks >= 128 KiB get their own mmap and go back to the kernel when freed (glibc)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)


def caching_mode() -> None:
    """glibc's steady state after its adaptive thresholds have grown to their maximum:
    blocks < 32 MiB are reused from the heap, larger ones are mmapped (glibc)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * MIB)
        libc.mallopt(_M_TRIM_THRESHOLD, 64 * MIB)


def _malloc_trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def cpu_method_available() -> bool:
    """True on Linux kernels that let a process reset its own ``VmHWM``."""
    return os.path.exists(_CLEAR_REFS) and os.access(_CLEAR_REFS, os.W_OK)


def _cpu_peak(fn: Callable[[], object]) -> int:
    _malloc_trim()
    before = _status_bytes("VmRSS")
    with open(_CLEAR_REFS, "w") as f:
        f.write("5")
    fn()
    return max(0, _status_bytes("VmHWM") - before)


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by ``fn()`` at its peak, above what was allocated before the call
    (its outputs included: they are resident when the peak is read)."""
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type != "cpu":
        raise ValueError(f"device must be cpu or cuda, got {device}")
    if not cpu_method_available():
        raise RuntimeError(f"CPU peak memory needs a writable {_CLEAR_REFS} (Linux)")
    return _cpu_peak(fn)


def available_bytes(device: torch.device) -> int:
    """Memory a new configuration may use: free CUDA memory, or ``MemAvailable`` on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
