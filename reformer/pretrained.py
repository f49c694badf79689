"""Saving and loading models as ``config.json`` + ``model.safetensors`` (no pickle).

``config.json`` holds ``"model_type"`` (the class name) and every field of the model's config
dataclass; ``model.safetensors`` holds the ``state_dict`` (written with ``safetensors.torch``,
which also handles tied weights). Loading rebuilds the config (re-validated), builds the model
and loads the weights strictly, so a missing or unexpected tensor is an error.

    model.save_pretrained("my-model")
    same = ReformerLM.from_pretrained("my-model")
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

M = TypeVar("M", bound=nn.Module)


def save_pretrained(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write ``model.config`` and the weights of ``model`` into ``directory`` (created if needed).

    Returns the directory as a ``Path``. The model needs a ``config`` with ``to_dict()``.
    """
    from safetensors.torch import save_model

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"model must have a config with to_dict() (a ReformerLM or ReformerEncDec), "
                        f"got {type(model).__name__}")
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise ValueError(f"directory {str(path)!r} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    payload = {"model_type": type(model).__name__, **config.to_dict()}
    (path / CONFIG_NAME).write_text(json.dumps(payload, indent=2) + "\n")
    save_model(model, str(path / WEIGHTS_NAME), metadata={"format": "pt", "model_type": type(model).__name__})
    return path


def read_config(directory: Union[str, os.PathLike]) -> dict[str, Any]:
    """The parsed ``config.json`` of a saved model (with its ``"model_type"``)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r}: not a directory written by save_pretrained")
    payload = json.loads(path.read_text())
    if not isinstance(payload, dict) or "model_type" not in payload:
        raise ValueError(f"{path} is not a saved model config (no 'model_type')")
    return payload


def load_pretrained(cls: type[M], config_cls: type, directory: Union[str, os.PathLike], *,
                    device: Union[str, torch.device, None] = None) -> M:
    """Build ``cls(config_cls(**config.json))`` and load ``model.safetensors`` into it (strict).

    The model is returned in eval mode on ``device`` (default CPU).
    """
    from safetensors.torch import load_model

    payload = read_config(directory)
    model_type = payload.pop("model_type")
    if model_type != cls.__name__:
        raise ValueError(f"{str(directory)!r} holds a {model_type}, not a {cls.__name__}")
    known = set(config_cls.__dataclass_fields__)
    unknown = sorted(set(payload) - known)
    if unknown:
        raise ValueError(f"{CONFIG_NAME} in {str(directory)!r} has unknown {config_cls.__name__} fields {unknown}")
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {str(directory)!r}")
    model = cls(config_cls(**payload))
    device = torch.device("cpu") if device is None else torch.device(device)
    model.to(device)
    load_model(model, str(weights), strict=True, device=str(device))
    return model.eval()


def saved_model_type(directory: Union[str, os.PathLike]) -> Optional[str]:
    """The ``"model_type"`` recorded in ``directory/config.json``."""
    return read_config(directory)["model_type"]
