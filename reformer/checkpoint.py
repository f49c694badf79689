"""Crash-safe training checkpoints: atomic writes, ``weights_only`` loads, RNG state capture.

A checkpoint is written to a temporary file in the destination's directory, flushed and
fsync'ed, then moved over the destination with ``os.replace`` (atomic on POSIX), and the
directory is fsync'ed. A process killed at any point leaves either the previous checkpoint or
the new one at ``path``, never a partial file; a stray temporary file is never read and is
removed by the next save. Everything stored is a tensor or a plain Python value, so
``torch.load(..., weights_only=True)`` can read it.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch

PathLike = Union[str, "os.PathLike[str]"]


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}."


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(state: Mapping[str, Any], path: PathLike) -> None:
    """Write ``state`` (tensors and plain Python values) to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(_tmp_prefix(path) + "*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state() -> dict[str, Any]:
    """The process's RNG states (torch CPU, CUDA if present, Python ``random``, NumPy if
    installed) as tensors and plain values."""
    version, mt_state, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state["numpy"] = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        st = state["numpy"]
        np.random.set_state((st["kind"], st["keys"].numpy().astype(np.uint32), st["pos"], st["has_gauss"],
                             st["cached_gaussian"]))
