"""LSH attention inside Hugging Face ``transformers`` models (GPT-2, BERT and others).

Hugging Face attention modules do not use ``nn.MultiheadAttention``: they project queries,
keys and values themselves and hand ``(B, H, N, D)`` tensors to a function chosen by
``config._attn_implementation`` from ``transformers``' ``AttentionInterface``. This module
registers one more implementation, ``"reformer_lsh"``, and :func:`swap_hf_attention` switches a
model to it. Modules marked by the swap run shared-QK LSH attention on their *query* states
(the key states are ignored, like the key projection in ``LSHMultiheadAttention.from_torch``);
every other module (cross-attention, excluded ones) runs exact full attention. The padding mask
arrives as a ``(B, N)`` 2-D mask (the flash-attention mask format). Only full-sequence forward
passes are supported: generate with ``use_cache=False``. The LSH op has no attention-probability
dropout, so a model's attention dropout is not applied on the LSH path (residual dropout is).

Saving and loading: every swap of a Hugging Face model is recorded in ``model.config.reformer_swap``
(a JSON dict saved in ``config.json`` by ``save_pretrained``)::

    {"version": 1,
     "attention": {"transformer.h.0.attn": {"bucket_size": 64, "n_hashes": 4, "seed": 0,
                                            "n_buckets": null, "causal_mode": "bucket"}, ...},
     "positional": {"transformer.wpe": {"axial_shape": [64, 64], "axial_dims": null}}}

``from_pretrained`` alone cannot rebuild swapped layers (it builds the original architecture:
the axial tables would be reported unexpected and the position table missing), so
:func:`load_swapped` builds the model, re-applies the recorded swaps before the weights are
loaded, and then loads them. A model loaded with ``attn_implementation="reformer_lsh"`` but not
through :func:`load_swapped` raises on its first forward instead of silently running full
attention.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor, nn

from reformer.kernels import full_attention, lsh_attention

IMPLEMENTATION = "reformer_lsh"
CONFIG_KEY = "reformer_swap"
_UNSET = object()


@dataclass(frozen=True)
class LSHSettings:
    """The LSH parameters stored on a swapped Hugging Face attention module."""

    bucket_size: int
    n_hashes: int
    seed: Optional[int]
    n_buckets: Any = None  # None, an int or a tuple of 2 or 3 factors
    causal_mode: str = "chunk"

    def to_json(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        if isinstance(self.n_buckets, tuple):
            record["n_buckets"] = list(self.n_buckets)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "LSHSettings":
        n_buckets = record.get("n_buckets")
        return cls(int(record["bucket_size"]), int(record["n_hashes"]), record.get("seed"),
                   tuple(n_buckets) if isinstance(n_buckets, list) else n_buckets, record.get("causal_mode", "chunk"))


def is_hf_model(model: nn.Module) -> bool:
    """True for a ``transformers`` model that picks its attention function by name."""
    config = getattr(model, "config", None)
    return hasattr(config, "_attn_implementation") and hasattr(model, "set_attn_implementation")


def is_hf_attention(module: nn.Module) -> bool:
    """Hugging Face attention modules carry their ``config`` and an ``is_causal`` flag."""
    return hasattr(module, "config") and isinstance(getattr(module, "is_causal", None), bool)


def is_hf_cross_attention(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or "Cross" in type(module).__name__


def _attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Optional[Tensor], scaling: Optional[float] = None,
                       dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:
    """``AttentionInterface`` function: query ``(B, H, Nq, D)``, key/value ``(B, H, Nk, D)``,
    attention_mask None or ``(B, Nk)`` (True/1 = attend, 0 = padding). Returns ``(B, Nq, H, D)``."""
    settings = getattr(module, "reformer_lsh", _UNSET)
    if settings is _UNSET:
        if (getattr(getattr(module, "config", None), CONFIG_KEY, None) or {}).get("attention"):
            raise ValueError("this model was saved after reformer.swap_attention, but its attention modules were "
                             "not set up for LSH: load it with reformer.load_swapped(ModelClass, path) "
                             "(from_pretrained alone rebuilds the original layers)")
        settings = None
    causal = module.is_causal and query.shape[2] > 1
    if (settings is not None or causal) and query.shape[2] != key.shape[2]:
        raise ValueError("reformer_lsh attention runs full-sequence passes only (no key/value cache): "
                         "call the model with use_cache=False")
    padding = None if attention_mask is None else ~attention_mask.bool()
    # Multiplying queries by c scales the logits by c; LSH keys (unit-norm query directions) and buckets stay put.
    scale = 1.0 if scaling is None else scaling * math.sqrt(query.shape[-1])
    if settings is None:
        out = full_attention(query * scale, key, value, causal=causal, key_padding_mask=padding,
                             dropout_p=dropout, backend="torch")
    else:
        out = lsh_attention(query * scale, value, bucket_size=settings.bucket_size, n_hashes=settings.n_hashes,
                            causal=causal, key_padding_mask=padding, seed=settings.seed,
                            n_buckets=settings.n_buckets, causal_mode=settings.causal_mode)
    return out.transpose(1, 2), None


def register() -> None:
    """Make ``"reformer_lsh"`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)


def record_swap(model: nn.Module, kind: str, name: str, settings: dict[str, Any]) -> None:
    """Note in ``model.config.reformer_swap[kind][name]`` that module ``name`` was swapped with
    ``settings`` (JSON values), so that ``save_pretrained`` writes it to ``config.json``."""
    record = dict(getattr(model.config, CONFIG_KEY, None) or {})
    record["version"] = 1
    record[kind] = {**record.get(kind, {}), name: dict(settings)}
    setattr(model.config, CONFIG_KEY, record)


def _mark(model: nn.Module) -> None:
    """Attention modules not swapped run full attention (``reformer_lsh = None``, set explicitly)."""
    for module in model.modules():
        if is_hf_attention(module) and not hasattr(module, "reformer_lsh"):
            module.reformer_lsh = None


def swap_hf_attention(model: nn.Module, report: Any, *, lsh: dict[str, Any], seeds: Any,
                      selected: Callable[[str], bool]) -> None:
    """Mark the self-attention modules of a ``transformers`` model for LSH and switch the model
    to ``"reformer_lsh"``. ``lsh``: bucket_size, n_hashes, n_buckets, causal_mode;
    ``selected(name)`` applies the include/exclude filter; ``seeds.next()``
    gives each swapped module its seed; entries go to ``report`` (a ``SwapReport``); the swap is
    recorded in ``model.config.reformer_swap``."""
    register()
    for name, module in model.named_modules():
        if not is_hf_attention(module):
            continue
        if not selected(name):
            report.add(name, "skipped", "excluded by include/exclude (runs full attention)")
        elif is_hf_cross_attention(module):
            report.add(name, "skipped", f"cross-attention ({type(module).__name__}, runs full attention)")
        else:
            settings = LSHSettings(seed=seeds.next(), **lsh)
            module.reformer_lsh = settings
            record_swap(model, "attention", name, settings.to_json())
            report.add(name, "swapped", f"{type(module).__name__} -> LSH (bucket_size={settings.bucket_size}, "
                                        f"n_hashes={settings.n_hashes}, seed={settings.seed}, shared-QK from the "
                                        "query states)")
    _mark(model)
    model.set_attn_implementation(IMPLEMENTATION)


def apply_recorded_swaps(model: nn.Module, record: dict[str, Any]) -> None:
    """Re-apply the swaps of a ``config.reformer_swap`` record to a freshly built ``model``."""
    from .swap import swap_positional

    if not isinstance(record, dict) or record.get("version") != 1:
        raise ValueError(f"config.{CONFIG_KEY} must be a dict with version 1, got {record!r}")
    for name, opts in record.get("positional", {}).items():
        swap_positional(model, opts["axial_shape"], axial_dims=opts.get("axial_dims"), names=[name])
    attention = record.get("attention", {})
    if attention:
        register()
        for name, opts in attention.items():
            module = model.get_submodule(name)
            if not is_hf_attention(module):
                raise ValueError(f"config.{CONFIG_KEY} names {name!r} as swapped attention, but the model's "
                                 f"module there is a {type(module).__name__}")
            module.reformer_lsh = LSHSettings.from_json(opts)
        _mark(model)
        model.set_attn_implementation(IMPLEMENTATION)


def load_swapped(model_class: type, pretrained_model_name_or_path: Any, **kwargs: Any) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after :func:`reformer.swap_attention` /
    :func:`reformer.swap_positional`: the swaps recorded in its ``config.json`` are re-applied
    while the model is built, before the weights are loaded, so the trained axial tables and the
    LSH settings (bucket size, hashes, per-layer seeds) come back exactly.

    ``model_class`` is the ``transformers`` class it was saved from (e.g. ``GPT2LMHeadModel``);
    ``kwargs`` go to ``model_class.from_pretrained`` (``dtype``, ``config``, ...). Returns an
    instance of ``model_class`` in eval mode, like ``from_pretrained``.

    Raises ValueError when the checkpoint's config has no ``reformer_swap`` record.
    """
    if not (isinstance(model_class, type) and hasattr(model_class, "from_pretrained")
            and hasattr(model_class, "config_class")):
        raise TypeError(f"model_class must be a transformers model class, got {model_class!r}")
    config = kwargs.pop("config", None)
    if config is None:
        config = model_class.config_class.from_pretrained(pretrained_model_name_or_path)
    record = getattr(config, CONFIG_KEY, None)
    if not record:
        raise ValueError(f"{pretrained_model_name_or_path}: config has no {CONFIG_KEY!r} record (the model was not "
                         f"saved after reformer.swap_attention/swap_positional); use {model_class.__name__}"
                         ".from_pretrained")

    class Swapped(model_class):  # type: ignore[misc, valid-type]
        def __init__(self, config: Any, *args: Any, **kw: Any):
            super().__init__(config, *args, **kw)
            apply_recorded_swaps(self, getattr(config, CONFIG_KEY))

    Swapped.__name__, Swapped.__qualname__ = model_class.__name__, model_class.__qualname__
    model = Swapped.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)
    model.__class__ = model_class  # the subclass only differs in __init__
    return model

