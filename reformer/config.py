"""``ReformerConfig``: every hyper-parameter of ``ReformerLM`` in one validated dataclass."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

from reformer.kernels import default_n_buckets

from ._validation import check_axes, check_dropout, check_heads, check_positive, check_seed

ATTENTIONS = ("lsh", "full")  # the attention kinds of ReformerLM and ReformerEncDec (config.attention)
CAUSAL_MODES = ("bucket", "chunk")

PRESETS: dict[str, dict[str, Any]] = {
    # for tests and demos: trains in seconds on a CPU
    "tiny": dict(vocab_size=256, d_model=64, n_heads=4, depth=2, d_ff=128, max_seq_len=256,
                 bucket_size=16, n_hashes=2, ff_chunks=2, axial_shape=(16, 16)),
    # a small byte-level LM for 4K-token contexts
    "small": dict(vocab_size=256, d_model=256, n_heads=4, depth=6, d_ff=1024, max_seq_len=4096,
                  bucket_size=64, n_hashes=4, ff_chunks=4, axial_shape=(64, 64), dropout=0.1),
    # the shape of the paper's enwik8 model: 12 layers, d_model 1024, d_ff 4096, 8 heads, 64K tokens
    "enwik8-like": dict(vocab_size=256, d_model=1024, n_heads=8, depth=12, d_ff=4096, max_seq_len=65536,
                        bucket_size=64, n_hashes=4, ff_chunks=64, axial_shape=(128, 512), dropout=0.1),
}


@dataclass(frozen=True)
class ReformerConfig:
    """Hyper-parameters of ``ReformerLM``; checked on construction, immutable afterwards.

    Fields:
        vocab_size: number of token ids. d_model: model width. n_heads: attention heads
            (must divide d_model). depth: number of (attention, feed-forward) blocks.
        d_ff: feed-forward hidden width. max_seq_len: longest accepted sequence.
        attention: ``"lsh"`` (``LSHSelfAttention``) or ``"full"`` (``MultiHeadAttention``).
        bucket_size, n_hashes: LSH chunk length and hash rounds (used when attention="lsh").
        n_buckets: the LSH hashing scheme, fixed for the model's lifetime so that a saved model
            keeps its behaviour: an even int (plain hashing into that many buckets) or a tuple
            ``(n1, n2)`` / ``(n1, n2, n3)`` of even ints (factorised hashing, bucket ``b1 * n2 + b2``
            / ``(b1 * n2 + b2) * n3 + b3``). None resolves
            at construction to ``reformer.kernels.default_n_buckets(max_seq_len, bucket_size)``
            and the resolved value is stored. The bucket count never depends on the input
            length, so a position's hash does not change as a sequence grows.
        causal_mode: how causal LSH picks keys (see docs/lsh.md). ``"chunk"`` (default): the
            chunked look-back of the Reformer paper, where later tokens can move an earlier
            position's chunk boundary. ``"bucket"``: each query attends, per round, to the most
            recent ``bucket_size`` positions of its own bucket, so its key set depends on
            earlier positions only and cached decoding (``generate(use_cache=True)``) is exact;
            it learns less at the same ``bucket_size`` (docs/experiments.md), so give it about
            twice the ``bucket_size`` of a chunk-mode model.
        causal: position i sees only positions <= i (needed by ``loss`` and ``generate``).
        reversible: reversible blocks (activation memory independent of depth) or the same
            two-stream network with ordinary autograd.
        ff_chunks: the feed-forward, and the head + loss of ``ReformerLM.loss``, run over this many
            slices of the positions (1 = whole).
        axial_shape: learned axial positions over this grid (product >= max_seq_len;
            d_model is split evenly across the axes, so it must be divisible by their count);
            None = fixed sinusoidal positions.
        dropout: dropout rate in attention, feed-forward, residual branches and embeddings.
        seed: None, or an int that fixes the LSH rotations in eval mode: layer ``i``'s
            ``LSHSelfAttention`` gets ``seed + i``, so eval forwards (and ``generate`` with a
            seeded ``torch.Generator``) are reproducible. Training always draws fresh rotations
            from the global RNG; with ``seed=None`` eval does too. Unused when attention="full".

    Causal LSH with ``causal_mode="chunk"``: a future position's value never reaches a past
    position's output, but the future positions' hashes can change which sorted chunk a past
    position falls into, and so which earlier positions it attends to. So the outputs for a
    prefix can depend on what follows it. ``causal_mode="bucket"`` has no such look-ahead.

    Use ``dataclasses.replace(config, depth=12)`` to derive a changed (re-validated) copy.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    depth: int = 6
    d_ff: int = 1024
    max_seq_len: int = 4096
    attention: str = "lsh"
    bucket_size: int = 64
    n_hashes: int = 4
    n_buckets: Optional[Union[int, tuple[int, ...]]] = None
    causal_mode: str = "chunk"
    causal: bool = True
    reversible: bool = True
    ff_chunks: int = 1
    axial_shape: Optional[tuple[int, ...]] = None
    dropout: float = 0.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "depth", "d_ff", "max_seq_len",
                     "bucket_size", "n_hashes", "ff_chunks"):
            check_positive(name, getattr(self, name))
        check_heads(self.d_model, self.n_heads)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        for name in ("causal", "reversible"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool):
            raise TypeError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        check_dropout(self.dropout)
        check_seed(self.seed)
        if self.causal_mode not in CAUSAL_MODES:
            raise ValueError(f"causal_mode must be one of {CAUSAL_MODES}, got {self.causal_mode!r}")
        n_buckets = default_n_buckets(self.max_seq_len, self.bucket_size) if self.n_buckets is None else self.n_buckets
        object.__setattr__(self, "n_buckets", check_n_buckets(n_buckets))
        if self.axial_shape is not None:
            object.__setattr__(self, "axial_shape", self._checked_axial_shape())

    def _checked_axial_shape(self) -> tuple[int, ...]:
        shape = check_axes("axial_shape", self.axial_shape)
        if math.prod(shape) < self.max_seq_len:
            raise ValueError(
                f"axial_shape {tuple(shape)} covers {math.prod(shape)} positions, fewer than "
                f"max_seq_len={self.max_seq_len}; its product must be >= max_seq_len"
            )
        if self.d_model % len(shape):
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by len(axial_shape) ({len(shape)}): each axis "
                f"gets an equal d_model/{len(shape)} slice of the axial positional encoding"
            )
        return shape

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-friendly values (tuples become lists); ``ReformerConfig(**d)``
        rebuilds the same config."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def axial_dims(self) -> Optional[tuple[int, ...]]:
        """Width of each axis' slice of the axial encoding (None without axial positions)."""
        if self.axial_shape is None:
            return None
        return (self.d_model // len(self.axial_shape),) * len(self.axial_shape)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ReformerConfig":
        """A named preset (``"tiny"``, ``"small"``, ``"enwik8-like"``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown ReformerConfig preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def check_n_buckets(n_buckets: object) -> Union[int, tuple[int, ...]]:
    """``n_buckets`` is an even int >= 2, or a list or tuple of 2 or 3 of them (factorised
    hashing); returns an int or a tuple. Raises ``TypeError`` for non-integers and ``ValueError``
    for bad values."""
    parts = tuple(n_buckets) if isinstance(n_buckets, (tuple, list)) else (n_buckets,)
    if isinstance(n_buckets, (tuple, list)) and not 2 <= len(parts) <= 3:
        raise ValueError(f"n_buckets must be an even int or a tuple of 2 or 3 even ints (n1, n2[, n3]), "
                         f"got {n_buckets!r}")
    for part in parts:
        if not isinstance(part, int) or isinstance(part, bool):
            raise TypeError(f"n_buckets must be an even int or a tuple of 2 or 3 even ints (n1, n2[, n3]), "
                            f"got {n_buckets!r}")
        if part < 2 or part % 2:
            raise ValueError(f"n_buckets entries must be even ints >= 2 (buckets come in +/- pairs), "
                             f"got {n_buckets!r}")
    return parts if len(parts) > 1 else parts[0]
