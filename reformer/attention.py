"""Full multi-head attention (self and cross), built on ``reformer.kernels.full_attention``."""
from __future__ import annotations

from typing import Optional

import torch
from einops import rearrange
from torch import Tensor, nn

from reformer.kernels import full_attention

from ._validation import check_dropout, check_features, check_heads
from .generation import KVCache


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
        cache: Optional[KVCache] = None,
    ) -> Tensor:
        """x: ``(B, N, d_model)`` queries; context: ``(B, M, d_model)`` keys/values (default: x).

        key_padding_mask: ``(B, M)`` bool, True = padding. attn_mask: bool (True = masked) or
        additive float, ``(N, M)`` or broadcastable to ``(B, H, N, M)``. Returns ``(B, N, d_model)``.

        cache: a :class:`reformer.generation.KVCache` for incremental decoding. Self-attention
        (no context): x holds the positions after the cached ones; their keys and values are
        appended and the queries attend to every cached position (causally: to those not after
        themselves). Cross-attention: the cache is filled from ``context`` on the first call and
        reused afterwards (context may then be None); key_padding_mask masks the context. No
        attn_mask with a cache.
        """
        check_features("x", x, self.d_model)
        if cache is not None:
            return self._cached(x, context, cache, causal, key_padding_mask, attn_mask)
        context = x if context is None else check_features("context", context, self.d_model)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"context batch {context.shape[0]} does not match x batch {x.shape[0]}")
        q = self._heads(self.q_proj(x))
        k, v = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
        return self._attention(q, k, v, causal, key_padding_mask, attn_mask)

    def _heads(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n (h d) -> b h n d", h=self.n_heads)  # (B, H, N, Dh)

    def _attention(self, q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Optional[Tensor],
                   attn_mask: Optional[Tensor]) -> Tensor:
        out = full_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            backend="torch" if (self.training and self.dropout > 0) else self.backend,
        )  # (B, H, N, Dh)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))

    def _cached(self, x: Tensor, context: Optional[Tensor], cache: KVCache, causal: bool,
                key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor]) -> Tensor:
        """Attention of the new positions ``x (B, T, d)`` through ``cache`` (see ``forward``)."""
        if attn_mask is not None:
            raise ValueError("attn_mask cannot be combined with a cache")
        q = self._heads(self.q_proj(x))  # (B, H, T, Dh)
        if cache.static:  # cross-attention: keys and values of the context, computed once
            if cache.length == 0:
                if context is None:
                    raise ValueError("an empty cross-attention cache needs the context")
                check_features("context", context, self.d_model)
                cache.append(self._heads(self.k_proj(context)), self._heads(self.v_proj(context)))
            return self._attention(q, cache.keys, cache.values, False, key_padding_mask, None)
        if context is not None or key_padding_mask is not None:
            raise ValueError("a self-attention cache takes neither a context nor a key_padding_mask")
        start = cache.length
        k, v = cache.append(self._heads(self.k_proj(x)), self._heads(self.v_proj(x)))  # (B, H, L, Dh)
        t = x.shape[1]
        if not causal or t == 1 or start == 0:  # a single new query sees every cached key
            return self._attention(q, k, v, causal and t > 1, None, None)
        future = torch.arange(k.shape[2], device=x.device)[None, :] > start + torch.arange(t, device=x.device)[:, None]
        return self._attention(q, k, v, False, None, future)  # key j is after new query i when j > start + i

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
