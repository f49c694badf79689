"""Full multi-head attention (self and cross), built on ``reformer.kernels.full_attention``."""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from reformer.kernels import full_attention

from ._validation import check_dropout, check_features, check_heads


class MultiHeadAttention(nn.Module):
    """Multi-head scaled dot-product attention (Vaswani et al.), batch first.

    Args:
        d_model: model width; split into ``n_heads`` heads of ``d_model // n_heads``.
        n_heads: number of heads.
        dropout: dropout on the attention probabilities (training only).
        bias: whether the four projections have a bias.
        backend: ``reformer.kernels`` backend (``"auto"``, ``"torch"``, ``"triton"``).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, *, backend: str = "auto"):
        super().__init__()
        self.head_dim = check_heads(d_model, n_heads)
        self.d_model, self.n_heads = d_model, n_heads
        self.dropout = check_dropout(dropout)
        self.backend = backend
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self,
        x: Tensor,
        context: Optional[Tensor] = None,
        *,
        causal: bool = False,
        key_padding_mask: Optional[Tensor] = None,
        attn_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """x: ``(B, N, d_model)`` queries; context: ``(B, M, d_model)`` keys/values (default: x).

        key_padding_mask: ``(B, M)`` bool, True = padding. attn_mask: bool (True = masked) or
        additive float, ``(N, M)`` or broadcastable to ``(B, H, N, M)``. Returns ``(B, N, d_model)``.
        """
        check_features("x", x, self.d_model)
        context = x if context is None else check_features("context", context, self.d_model)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} does not match x batch {x.shape[0]}")
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        k = rearrange(self.k_proj(context), "b m (h d) -> b h m d", h=self.n_heads)
        v = rearrange(self.v_proj(context), "b m (h d) -> b h m d", h=self.n_heads)
        out = full_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            backend="torch" if (self.training and self.dropout > 0) else self.backend,
        )  # (B, H, N, Dh)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiHeadAttention":
        """A copy of a ``torch.nn.MultiheadAttention`` (same weights, same outputs)."""
        if not mha._qkv_same_embed_dim:
            raise ValueError("from_torch needs an nn.MultiheadAttention with kdim == vdim == embed_dim")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=bias)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for i, proj in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * mha.embed_dim:(i + 1) * mha.embed_dim])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[i * mha.embed_dim:(i + 1) * mha.embed_dim])
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new
