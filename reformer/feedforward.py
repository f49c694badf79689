"""Position-wise feed-forward network: FFN(x) = W2 act(W1 x + b1) + b2."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_dropout, check_positive

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu}


def get_activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class FeedForward(nn.Module):
    """Applied to each position independently: ``(..., d_model) -> (..., d_model)``.

    Dropout acts on the hidden activations (as in ``nn.TransformerEncoderLayer``).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.d_model = check_positive("d_model", d_model)
        self.d_ff = check_positive("d_ff", d_ff)
        self.activation = get_activation(activation)
        self.w1 = nn.Linear(d_model, d_ff)
        self.w2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(check_dropout(dropout))

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.dropout(self.activation(self.w1(x))))
