"""Inspect LSH attention: record each LSH layer's buckets and (small N) dense attention weights.

    with reformer.record_attention(model) as rec:
        model(tokens)
    rec.records[0].buckets   # (B, H, n_hashes, N) bucket of every position per round, layer 0
    rec.records[0].weights   # (B, H, N, N) combined attention weights (None when N > max_len)

While recording, every ``LSHSelfAttention`` / ``LSHMultiheadAttention`` in ``model`` draws its
rotations itself (exactly the ones the kernel would draw: the eval seed, or the global RNG, with
the same RNG consumption) and passes them to the kernel, so outputs are unchanged; the buckets
come from ``reformer.kernels.lsh_buckets`` and the weights from
``reformer.lsh_attention_weights`` with the same rotations, so ``weights @ v`` is the layer's
attention output before the output projection (docs/lsh.md gives the semantics). Each forward
call of a layer adds one record (a reversible layer recomputed in backward adds another: record
in eval mode or under ``torch.no_grad``). Cached decoding steps are not recorded.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional

from torch import Tensor, nn

MAX_DENSE_LEN = 4096


@dataclass
class AttentionRecord:
    """One forward call of one LSH layer: its qualified ``name`` in the model, ``buckets``
    ``(B, H, n_hashes, N)`` and ``weights`` ``(B, H, N, N)`` (None above ``max_len``)."""

    name: str
    buckets: Tensor
    weights: Optional[Tensor]


@dataclass
class AttentionRecorder:
    """The records of a ``record_attention`` block, in call order."""

    max_len: int = MAX_DENSE_LEN
    weights: bool = True
    records: list[AttentionRecord] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)

    def add(self, module: nn.Module, buckets: Tensor, weights: Optional[Tensor]) -> None:
        self.records.append(AttentionRecord(self.names.get(id(module), type(module).__name__), buckets, weights))

    def wants_weights(self, n: int) -> bool:
        return self.weights and n <= self.max_len

    def by_layer(self) -> dict[str, list[AttentionRecord]]:
        """Records grouped by layer name."""
        grouped: dict[str, list[AttentionRecord]] = {}
        for record in self.records:
            grouped.setdefault(record.name, []).append(record)
        return grouped


@contextmanager
def record_attention(model: nn.Module, *, weights: bool = True,
                     max_len: int = MAX_DENSE_LEN) -> Iterator[AttentionRecorder]:
    """Record every LSH layer of ``model`` for the forwards run inside the block.

    weights: also form the dense ``(B, H, N, N)`` weights (only for N <= ``max_len``; memory
    ``O(B H N^2)``). Yields an :class:`AttentionRecorder`; recording stops when the block exits.
    """
    from .lsh_attention import _SharedQKAttention

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, _SharedQKAttention)]
    recorder = AttentionRecorder(max_len=max_len, weights=bool(weights),
                                 names={id(m): name or type(m).__name__ for name, m in layers})
    previous = [m._recorder for _, m in layers]
    for _, m in layers:
        m._recorder = recorder
    try:
        yield recorder
    finally:
        for (_, m), old in zip(layers, previous):
            m._recorder = old
