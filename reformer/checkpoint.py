"""Training checkpoints: the one place that defines their format, writes and reads them.

Writing is crash-safe: a checkpoint is written to a temporary file in the destination's
directory, flushed and fsync'ed, then moved over the destination with ``os.replace`` (atomic on
POSIX), and the directory is fsync'ed. A process killed at any point leaves either the previous
checkpoint or the new one at ``path``, never a partial file; a stray temporary file is never
read and is removed by the next save. Everything stored is a tensor or a plain Python value, so
``torch.load(..., weights_only=True)`` reads it and no code from the file ever runs.

Reading never lets a raw ``torch``/``pickle``/``zipfile`` error through: a missing file raises
``FileNotFoundError``, and a file that is empty, truncated, corrupted, holds non-tensor objects,
has the wrong structure or another format version raises :class:`CheckpointError` (a
``ValueError``) whose message names the file and what is wrong with it.

A training checkpoint (:func:`save_training_checkpoint`, format version :data:`FORMAT_VERSION`)
is a dict::

    {"format": 2,                        # FORMAT_VERSION, checked on load
     "step": int,                        # optimizer steps done
     "meta": {"setup": {...},            # what must not change on resume (model, data, batch, seed)
              "settings": {...}},        # what may change on resume (lr, schedule, steps, eval, ...)
     "model": state_dict, "optimizer": state_dict, "scheduler": state_dict,
     "rng": capture_process_rng()}       # torch CPU (+ CUDA), Python ``random``, NumPy

Format history: 1 had a flat ``meta`` (no setup/settings split); 2 is the current one. Files of
another version are refused with a message saying which version they have.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any, Mapping, Union

import torch
from torch import nn

PathLike = Union[str, "os.PathLike[str]"]

FORMAT_VERSION = 2
"""Version of the training checkpoint layout written by :func:`save_training_checkpoint`."""

# key -> required type of its value, in a training checkpoint
_LAYOUT: dict[str, type] = {"format": int, "step": int, "meta": dict, "model": dict, "optimizer": dict,
                            "scheduler": dict, "rng": dict}


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be used: empty, truncated, corrupted, not written by
    ``torch.save``, holding non-tensor objects, of the wrong structure or format version, or
    written by a different run setup. ``path`` is the file."""

    def __init__(self, path: PathLike, problem: str):
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"checkpoint {self.path}: {problem}")


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0] if text else ""  # torch's zip errors continue with generic advice
    return f"{type(e).__name__}: {first}".rstrip(": ")


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    Raises ``FileNotFoundError`` when there is no file and :class:`CheckpointError` when the
    file is not a readable checkpoint dict (empty, truncated, corrupted, foreign objects).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if not path.is_file():
        raise CheckpointError(path, "is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(path, "is empty (0 bytes): it was never written completely; "
                                    "delete it, or restore a backup")
    with path.open("rb") as f:
        head = f.read(4)
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise CheckpointError(path, f"is not a torch.save file (it starts with {head!r}, not a zip header): "
                                    "corrupted, or another kind of file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise CheckpointError(path, "holds objects other than tensors and plain Python values, so it was "
                                        "not written by reformer; refusing to load it (weights_only=True)") from e
        raise CheckpointError(path, f"is corrupted ({_first_line(e)})") from e
    except Exception as e:  # zip, unpickling, EOF and OS errors of a damaged file, whatever their type
        raise CheckpointError(path, f"is truncated or corrupted ({_first_line(e)})") from e
    if not isinstance(state, dict):
        raise CheckpointError(path, f"holds a {type(state).__name__}, expected a dict")
    return state


def save_training_checkpoint(path: PathLike, *, step: int, meta: Mapping[str, Any], model: nn.Module,
                             optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    """Write a training checkpoint (layout in the module docstring) atomically.

    ``meta`` must be ``{"setup": {...}, "settings": {...}}`` of plain values; the process's RNG
    states are captured here.
    """
    _check_meta(path, meta)
    save_checkpoint({"format": FORMAT_VERSION, "step": step, "meta": dict(meta), "model": model.state_dict(),
                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": capture_process_rng()}, path)


def _check_meta(path: PathLike, meta: Any) -> None:
    if not isinstance(meta, Mapping) or not all(isinstance(meta.get(k), Mapping) for k in ("setup", "settings")):
        raise CheckpointError(path, "meta must be a dict with 'setup' and 'settings' dicts")


def load_training_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read and validate a training checkpoint: readable (see :func:`load_checkpoint`), of
    :data:`FORMAT_VERSION` and with every key of the layout, of the right type. Tensors are on
    the CPU (the RNG states must be; the caller copies weights to its device)."""
    state = load_checkpoint(path)
    if "format" not in state:
        raise CheckpointError(path, f"has no 'format' entry: not a reformer training checkpoint "
                                    f"(keys: {sorted(map(str, state))[:8]})")
    version = state["format"]
    if version != FORMAT_VERSION:
        raise CheckpointError(path, f"has format version {version!r}; this version of reformer reads version "
                                    f"{FORMAT_VERSION} only (see docs/training.md): start a new run")
    missing = [k for k in _LAYOUT if k not in state]
    if missing:
        raise CheckpointError(path, f"is incomplete: missing {', '.join(missing)}")
    wrong = [f"{k} is a {type(state[k]).__name__}, expected {t.__name__}" for k, t in _LAYOUT.items()
             if not isinstance(state[k], t) or isinstance(state[k], bool)]
    if wrong:
        raise CheckpointError(path, "has the wrong structure: " + "; ".join(wrong))
    if state["step"] < 0:
        raise CheckpointError(path, f"has a negative step {state['step']}")
    _check_meta(path, state["meta"])
    rng = state["rng"]
    if not isinstance(rng.get("torch"), torch.Tensor) or not isinstance(rng.get("python"), dict):
        raise CheckpointError(path, "has the wrong structure: rng lacks the torch or python state")
    return state


def restore_training_state(path: PathLike, state: Mapping[str, Any], *, model: nn.Module,
                           optimizer: torch.optim.Optimizer, scheduler: Any,
                           restore_rng: bool = True) -> None:
    """Load ``state`` (from :func:`load_training_checkpoint` of ``path``) into the objects,
    turning mismatches into :class:`CheckpointError`."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(path, f"its model weights do not fit this model ({_first_line(e)})") from e
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(path, f"its optimizer or scheduler state does not fit ({_first_line(e)})") from e
    if restore_rng:
        try:
            restore_process_rng(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(path, f"its RNG state is malformed ({_first_line(e)})") from e


def capture_process_rng() -> dict[str, Any]:
    """Every RNG of the process (torch CPU, CUDA if present, Python ``random``, NumPy if
    installed) as tensors and plain values, for a checkpoint. Compare ``reformer._rng.RngState``,
    which snapshots torch's generators only, for recomputing a layer inside one step."""
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


def restore_process_rng(state: Mapping[str, Any]) -> None:
    """Set every RNG of the process to ``state`` (from :func:`capture_process_rng`)."""
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

