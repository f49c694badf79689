"""Token embedding and positional encodings."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._validation import check_features, check_positive, check_tokens


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
