"""Token embedding and positional encodings (sinusoidal, learned axial)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ._validation import check_axes, check_features, check_positive, check_tokens


class TokenEmbedding(nn.Module):
    """Token ids ``(B, N)`` -> ``(B, N, d_model)``, scaled by sqrt(d_model) as in Vaswani et al."""

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int | None = None):
        super().__init__()
        self.vocab_size = check_positive("vocab_size", vocab_size)
        self.d_model = check_positive("d_model", d_model)
        self.embedding = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        self.scale = math.sqrt(d_model)

    def forward(self, tokens: Tensor) -> Tensor:
        check_tokens("tokens", tokens, self.vocab_size)
        return self.embedding(tokens.long()) * self.scale


class SinusoidalPositionalEncoding(nn.Module):
    """Fixed sinusoidal positions added to ``(B, N, d_model)`` inputs.

    PE[pos, 2i] = sin(pos / 10000^(2i/d_model)), PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model)),
    for N <= max_len. The table is a non-persistent buffer (not in the state_dict).
    """

    def __init__(self, d_model: int, max_len: int = 5000):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.max_len = check_positive("max_len", max_len)
        pos = torch.arange(max_len, dtype=torch.float64)[:, None]  # (max_len, 1)
        inv_freq = torch.pow(10000.0, -torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
        pe = torch.zeros(max_len, d_model, dtype=torch.float64)
        pe[:, 0::2] = torch.sin(pos * inv_freq)
        pe[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
        self.register_buffer("pe", pe.float(), persistent=False)

    def encoding(self, n: int) -> Tensor:
        """The ``(n, d_model)`` table for positions ``0..n-1``."""
        if n > self.max_len:
            raise ValueError(f"sequence length {n} is longer than max_len={self.max_len}")
        return self.pe[:n]

    def forward(self, x: Tensor) -> Tensor:
        check_features("x", x, self.d_model)
        return x + self.encoding(x.shape[1]).to(x.dtype)


class AxialPositionalEncoding(nn.Module):
    """Learned factorised ("axial") positions added to ``(B, N, d_model)`` inputs.

    Position ``p`` is read in row-major order as a point ``(i_1, ..., i_k)`` of the grid
    ``axial_shape = (n_1, ..., n_k)``, and axis ``j`` owns a learned table ``E_j`` of shape
    ``(n_j, d_j)``. The encoding of ``p`` is

    * ``axial_dims=None``: the sum ``E_1[i_1] + ... + E_k[i_k]`` (every ``d_j = d_model``);
    * ``axial_dims=(d_1, ..., d_k)``: the concatenation ``[E_1[i_1], ..., E_k[i_k]]``, with
      ``sum(axial_dims) == d_model`` (the Reformer paper's and trax's form).

    So ``prod(axial_shape)`` positions cost ``sum_j n_j * d_j`` parameters instead of
    ``prod(axial_shape) * d_model``. Any ``N <= prod(axial_shape)`` works: only the first
    ``ceil(N / (n_2 * ... * n_k))`` rows of the first axis are expanded. Tables start as
    N(0, 1) (concatenated) or N(0, 1/k) (summed), so each component has unit variance.

    Takes embeddings and adds the positions. Its sibling ``reformer.swap.AxialPositionIdEmbedding``
    (what ``swap_positional`` puts in place of an ``nn.Embedding`` position table) takes position
    ids instead and returns the position vectors only, as ``nn.Embedding`` does.
    """

    def __init__(self, d_model: int, axial_shape: Sequence[int], axial_dims: Optional[Sequence[int]] = None):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.axial_shape = check_axes("axial_shape", axial_shape)
        self.axial_dims = None if axial_dims is None else check_axes("axial_dims", axial_dims, min_len=1)
        if self.axial_dims is not None:
            if len(self.axial_dims) != len(self.axial_shape):
                raise ValueError(f"axial_dims {self.axial_dims} must have one entry per axis of {self.axial_shape}")
            if sum(self.axial_dims) != d_model:
                raise ValueError(
                    f"axial_dims {self.axial_dims} must sum to d_model={d_model}, got {sum(self.axial_dims)}"
                )
        dims = self.axial_dims or (d_model,) * len(self.axial_shape)
        std = 1.0 if self.axial_dims is not None else len(self.axial_shape) ** -0.5
        self.weights = nn.ParameterList(
            nn.Parameter(torch.randn(n, d) * std) for n, d in zip(self.axial_shape, dims)
        )
        self.max_len = math.prod(self.axial_shape)

    def encoding(self, n: int) -> Tensor:
        """The ``(n, d_model)`` table for positions ``0..n-1``."""
        if n > self.max_len:
            raise ValueError(
                f"sequence length {n} is longer than prod(axial_shape)={self.max_len} for {self.axial_shape}"
            )
        rows = -(-n // (self.max_len // self.axial_shape[0]))  # first-axis rows that are needed
        grid = (rows, *self.axial_shape[1:])
        parts = []
        for axis, table in enumerate(self.weights):
            table = table[:rows] if axis == 0 else table  # (n_axis, d_axis)
            shape = [1] * len(grid) + [table.shape[-1]]
            shape[axis] = table.shape[0]
            parts.append(table.view(shape))  # broadcastable to (*grid, d_axis)
        if self.axial_dims is None:
            table = sum(parts[1:], parts[0])  # (*grid, d_model)
        else:
            table = torch.cat([p.expand(*grid, p.shape[-1]) for p in parts], dim=-1)  # (*grid, d_model)
        return table.reshape(-1, self.d_model)[:n]

    def forward(self, x: Tensor) -> Tensor:
        """x: ``(B, N, d_model)`` -> ``x + encoding(N)``, same shape, N <= prod(axial_shape)."""
        check_features("x", x, self.d_model)
        return x + self.encoding(x.shape[1]).to(x.dtype)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, axial_shape={self.axial_shape}, axial_dims={self.axial_dims}"
