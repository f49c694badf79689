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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import Tensor, nn

from reformer.kernels import full_attention, lsh_attention

IMPLEMENTATION = "reformer_lsh"


@dataclass(frozen=True)
class LSHSettings:
    """The LSH parameters stored on a swapped Hugging Face attention module."""

    bucket_size: int
    n_hashes: int
    seed: Optional[int]


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
    settings: Optional[LSHSettings] = getattr(module, "reformer_lsh", None)
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
                            causal=causal, key_padding_mask=padding, seed=settings.seed)
    return out.transpose(1, 2), None


def register() -> None:
    """Make ``"reformer_lsh"`` a valid ``attn_implementation`` (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)


def swap_hf_attention(model: nn.Module, report: Any, *, bucket_size: int, n_hashes: int, seed: Optional[int],
                      selected: Callable[[str], bool]) -> None:
    """Mark the self-attention modules of a ``transformers`` model for LSH and switch the model
    to ``"reformer_lsh"``. ``selected(name)`` applies the include/exclude filter; entries go to
    ``report`` (a ``SwapReport``)."""
    register()
    settings = LSHSettings(bucket_size, n_hashes, seed)
    for name, module in model.named_modules():
        if not is_hf_attention(module):
            continue
        if not selected(name):
            report.add(name, "skipped", "excluded by include/exclude (runs full attention)")
        elif is_hf_cross_attention(module):
            report.add(name, "skipped", f"cross-attention ({type(module).__name__}, runs full attention)")
        else:
            module.reformer_lsh = settings
            report.add(name, "swapped", f"{type(module).__name__} -> LSH (bucket_size={bucket_size}, "
                                        f"n_hashes={n_hashes}, shared-QK from the query states)")
    model.set_attn_implementation(IMPLEMENTATION)

