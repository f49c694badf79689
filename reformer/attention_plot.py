"""Plot recorded LSH attention: one layer and head's combined attention weights as a heat map,
and each hash round's bucket of every position along the sequence.

    with torch.no_grad(), reformer.record_attention(model) as rec:
        model(tokens)
    reformer.plot_attention(rec, "attention.png", layer=0, head=1)

The records come from :func:`reformer.record_attention` (docs/generation.md, "Inspecting LSH
attention"). matplotlib is imported only when a plot is made; it is the ``bench`` extra
(``pip install "reformer-attention[bench]"``). The figure is drawn on a ``matplotlib.figure.Figure``
without pyplot, so plotting neither changes the backend nor opens windows.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .recorder import AttentionRecord, AttentionRecorder

__all__ = ["plot_attention", "select_record"]


def _matplotlib_figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:  # matplotlib is optional
        raise ImportError("reformer.plot_attention needs matplotlib, which is not installed: install the "
                          "'bench' extra, pip install \"reformer-attention[bench]\" (or pip install matplotlib)"
                          ) from error
    return Figure


def _index(name: str, value: object, size: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not -size <= value < size:
        raise ValueError(f"{name}={value} is out of range: the record has {size} {what}")
    return value % size


def select_record(recorded: Union[AttentionRecorder, AttentionRecord], layer: Union[int, str] = 0) -> AttentionRecord:
    """The record to plot: ``recorded`` itself when it is an ``AttentionRecord``; from an
    ``AttentionRecorder``, the first call of layer ``layer``, an index into the recorded layers
    in call order (``0`` = the first LSH layer called, negative counts from the end) or a
    layer's qualified name (``"layers.blocks.1.f.fn"``)."""
    if isinstance(recorded, AttentionRecord):
        return recorded
    if not isinstance(recorded, AttentionRecorder):
        raise TypeError("recorded must be an AttentionRecorder (from reformer.record_attention) or one of its "
                        f"AttentionRecords, got {type(recorded).__name__}")
    layers = recorded.by_layer()
    if not layers:
        raise ValueError("nothing was recorded: run the model inside the record_attention block")
    if isinstance(layer, str):
        if layer not in layers:
            raise ValueError(f"layer {layer!r} was not recorded; recorded layers: {list(layers)}")
        return layers[layer][0]
    return list(layers.values())[_index("layer", layer, len(layers), "recorded layers")][0]


def plot_attention(recorded: Union[AttentionRecorder, AttentionRecord], path: Union[str, os.PathLike], *,
                   layer: Union[int, str] = 0, head: int = 0, batch: int = 0, title: Optional[str] = None,
                   dpi: int = 100) -> Path:
    """Write a PNG (or any format matplotlib infers from ``path``'s suffix) of one recorded LSH
    layer call and return ``path``.

    Top panel: the combined attention weights ``weights[batch, head]`` ``(N, N)`` (query
    position down, key position across; the weights of one softmax over every round's keys,
    so each row sums to 1; colours span 0..1 on a square-root scale, which keeps small weights
    visible and makes plots of different heads comparable). Bottom
    panel: ``buckets[batch, head]`` ``(n_hashes, N)``, the bucket of every position in each
    round, on the same position axis. A record without weights (N above ``record_attention``'s
    ``max_len``, or ``weights=False``) gets the bucket panel only.

    recorded, layer: see :func:`select_record`. head, batch: indices into the record (negative
    counts from the end). title: figure title (default: the layer name, head and shapes).

    Raises ImportError naming the ``bench`` extra when matplotlib is missing; TypeError /
    ValueError for bad ``recorded``, ``layer``, ``head`` or ``batch``.
    """
    record = select_record(recorded, layer)
    buckets = record.buckets
    batch = _index("batch", batch, buckets.shape[0], "sequences in the batch")
    head = _index("head", head, buckets.shape[1], "heads")
    if not isinstance(dpi, int) or isinstance(dpi, bool) or dpi < 1:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")
    Figure = _matplotlib_figure()
    from matplotlib import colormaps
    from matplotlib.colors import PowerNorm

    rounds = buckets[batch, head].detach().to("cpu", torch.int64)  # (R, N)
    n_hashes, n = rounds.shape
    weights = None if record.weights is None else record.weights[batch, head].detach().to("cpu", torch.float32)
    # a fixed figure size and colour range, so that the layout never depends on the data
    if weights is None:
        fig = Figure(figsize=(7, 1.6 + 0.35 * n_hashes), layout="constrained")
        axes = [None, fig.add_subplot(1, 1, 1)]
    else:
        fig = Figure(figsize=(7, 7.6 + 0.35 * n_hashes), layout="constrained")
        grid = fig.add_gridspec(2, 1, height_ratios=[6, 0.6 + 0.35 * n_hashes])
        axes = [fig.add_subplot(grid[0])]
        axes.append(fig.add_subplot(grid[1], sharex=axes[0]))
        image = axes[0].imshow(weights.numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0.0, vmax=1.0),
                               interpolation="nearest", aspect="auto", extent=(-0.5, n - 0.5, n - 0.5, -0.5))
        axes[0].set_ylabel("query position")
        axes[0].tick_params(labelbottom=False)
        fig.colorbar(image, ax=axes[0], label="attention weight (square-root scale)", fraction=0.04, pad=0.01)
    n_buckets = int(rounds.max()) + 1
    cmap = colormaps["tab20" if n_buckets <= 20 else "nipy_spectral"].resampled(n_buckets)  # one colour per bucket
    strip = axes[1].imshow(rounds.numpy(), cmap=cmap, vmin=-0.5, vmax=n_buckets - 0.5, interpolation="nearest",
                           aspect="auto", extent=(-0.5, n - 0.5, n_hashes - 0.5, -0.5))
    axes[1].set_yticks(range(n_hashes), [f"round {r}" for r in range(n_hashes)])
    axes[1].set_xlabel("position" if weights is None else "key position / position")
    fig.colorbar(strip, ax=axes[1], label="bucket", fraction=0.04, pad=0.01)
    shapes = f"N={n}, n_hashes={n_hashes}" + ("" if weights is not None else " (weights not recorded)")
    fig.suptitle(title if title is not None else f"{record.name}, head {head} | {shapes}", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    return path
