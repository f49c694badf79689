"""reformer: memory-efficient Transformer layers in the style of the Reformer (Kitaev et al. 2020).

Public names are imported lazily from their modules on first use, so ``import reformer`` stays
light and each layer lives in the file of its idea.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # baseline Transformer (the original description)
    "MultiHeadAttention": "attention",
    "TokenEmbedding": "positional",
    "SinusoidalPositionalEncoding": "positional",
    "FeedForward": "feedforward",
    "EncoderLayer": "transformer",
    "DecoderLayer": "transformer",
    "Encoder": "transformer",
    "Decoder": "transformer",
    "Transformer": "transformer",
    # Reformer parts
    "LSHSelfAttention": "lsh_attention",
    "LSHMultiheadAttention": "lsh_attention",
    "AxialPositionalEncoding": "positional",
    "ChunkedFeedForward": "feedforward",
    "ReversibleSequence": "reversible",
    "ReformerConfig": "config",
    "ReformerLM": "model",
    "ModelCache": "generation",
    "ReformerEncDec": "encdec",
    "EncDecConfig": "encdec",
    "lsh_attention_weights": "lsh_attention",
    "record_attention": "recorder",
    "plot_attention": "attention_plot",
    # tools
    "swap_attention": "swap",
    "swap_positional": "swap",
    "load_swapped": "swap",
    "SwapReport": "swap",
    "make_reversible": "swap_reversible",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'reformer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
