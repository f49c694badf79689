"""Shared-QK LSH self-attention modules (Reformer), built on ``reformer.kernels.lsh_attention``.

``LSHSelfAttention`` is the plain module; ``LSHMultiheadAttention`` has the call signature and
return value of ``torch.nn.MultiheadAttention(batch_first=True)`` so it can replace one inside an
existing model (e.g. ``nn.TransformerEncoderLayer.self_attn``).

Rotations: in training every forward draws fresh rotations from the global RNG on the input's
device (so a reversible layer that saves and restores the RNG state replays them exactly); in
eval they are fixed when ``seed`` is set (same output on every call), fresh otherwise.

Dropout is applied to the attention output (per head, before the output projection), not to
the attention probabilities, which LSH attention never materialises.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from reformer.kernels import lsh_attention

from ._validation import check_dropout, check_features, check_heads, check_positive, check_seed


class _SharedQKAttention(nn.Module):
    """Projections (shared QK, V, output) and the LSH attention call common to both modules."""

    def __init__(self, d_model: int, n_heads: int, *, bucket_size: int, n_hashes: int, dropout: float,
                 seed: Optional[int], backend: str, bias: bool):
        super().__init__()
        self.head_dim = check_heads(d_model, n_heads)
        self.d_model, self.n_heads = d_model, n_heads
        self.bucket_size = check_positive("bucket_size", bucket_size)
        self.n_hashes = check_positive("n_hashes", n_hashes)
        self.dropout = check_dropout(dropout)
        self.seed, self.backend = check_seed(seed), backend
        self.qk_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _attend(self, x: Tensor, key_padding_mask: Optional[Tensor], causal: bool) -> Tensor:
        """x: ``(B, N, d_model)``; key_padding_mask: ``(B, N)`` bool, True = padding."""
        qk = rearrange(self.qk_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        out = lsh_attention(
            qk, v, bucket_size=self.bucket_size, n_hashes=self.n_hashes, causal=causal,
            key_padding_mask=key_padding_mask, seed=None if self.training else self.seed, backend=self.backend,
        )  # (B, H, N, Dh)
        out = F.dropout(out, self.dropout, self.training)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, bucket_size={self.bucket_size}, "
                f"n_hashes={self.n_hashes}, dropout={self.dropout}, seed={self.seed}, backend={self.backend!r}")


class LSHSelfAttention(_SharedQKAttention):
    """Multi-head shared-QK LSH self-attention (Kitaev et al. 2020), batch first.

    Args:
        d_model: model width, split into ``n_heads`` heads of ``d_model // n_heads``.
        n_heads: number of heads.
        bucket_size: LSH chunk length (``n_buckets = 2 * ceil(N / bucket_size)``).
        n_hashes: hash rounds; more rounds approximate full attention better.
        causal: position i attends only to positions <= i.
        dropout: dropout on the attention output (training only).
        seed: fixed rotations in eval mode (training always draws fresh ones).
        backend: ``reformer.kernels`` backend (``"auto"``, ``"torch"``, ``"triton"``).
        bias: whether the three projections have a bias.
    """

    def __init__(self, d_model: int, n_heads: int, *, bucket_size: int = 64, n_hashes: int = 4, causal: bool = False,
                 dropout: float = 0.0, seed: Optional[int] = None, backend: str = "auto", bias: bool = True):
        super().__init__(d_model, n_heads, bucket_size=bucket_size, n_hashes=n_hashes, dropout=dropout, seed=seed,
                         backend=backend, bias=bias)
        self.causal = bool(causal)

    def forward(self, x: Tensor, *, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: ``(B, N, d_model)``; key_padding_mask: ``(B, N)`` bool, True = padding (ignored as a
        key; its output row is the output projection of zeros). Returns ``(B, N, d_model)``."""
        check_features("x", x, self.d_model)
        return self._attend(x, key_padding_mask, self.causal)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, causal={self.causal}"


def _padding_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """An ``nn.MultiheadAttention`` key_padding_mask as bool (True = padding): bool as is, float
    with 0 = keep and -inf = padding (what ``nn.TransformerEncoderLayer`` passes)."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"key_padding_mask must be bool (True = padding) or float (-inf = padding), got {mask.dtype}")
    padded = mask == float("-inf")
    if not torch.all(padded | (mask == 0)):
        raise ValueError("a float key_padding_mask must hold only 0 (keep) and -inf (padding); "
                         "LSH attention cannot add other biases to its logits")
    return padded


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    """``a`` is ``b``, or a view of exactly the same memory (e.g. ``x[:1]`` written three times)."""
    if a is b:
        return True
    if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.is_nested or b.is_nested:
        return False
    layout = lambda t: (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device)
    return layout(a) == layout(b)


def _is_causal(attn_mask: Optional[Tensor], is_causal: bool, n: int) -> bool:
    """True for ``is_causal`` or an ``(N, N)`` causal attn_mask (bool True above the diagonal, or
    float -inf above and 0 on/below it); any other attn_mask raises."""
    if attn_mask is None:
        return bool(is_causal)
    future = torch.ones(n, n, dtype=torch.bool, device=attn_mask.device).triu(1)
    if tuple(attn_mask.shape) != (n, n):
        causal = False
    elif attn_mask.dtype == torch.bool:
        causal = torch.equal(attn_mask, future)
    else:
        causal = torch.equal(attn_mask == float("-inf"), future) and bool(torch.all(attn_mask[~future] == 0))
    if not causal:
        raise ValueError(f"LSH attention supports only the causal attn_mask (an ({n}, {n}) mask that is True / -inf "
                         f"exactly above the diagonal) or None, got shape {tuple(attn_mask.shape)}, {attn_mask.dtype}")
    return True


class LSHMultiheadAttention(_SharedQKAttention):
    """Drop-in replacement for ``torch.nn.MultiheadAttention`` (self-attention) using shared-QK
    LSH attention: same constructor prefix, call signature and return value ``(output, None)``.

    It cannot honour everything ``nn.MultiheadAttention`` can, and raises ``ValueError`` for:
    ``key``/``value`` other than the tensor passed as ``query`` (the same object or a view of
    the same memory; shared-QK LSH is self-attention only); ``need_weights=True`` (LSH never
    forms the ``(N, N)`` weight matrix, so the default here is ``False``); an ``attn_mask``
    other than the causal mask; a float ``key_padding_mask`` with values other than 0 and -inf.

    Differences: ``dropout`` acts on the attention output, not the probabilities; there is no
    key projection (keys are the normalised shared QK projection). There is no packed
    in-projection, so ``in_proj_weight``/``in_proj_bias`` are None and ``_qkv_same_embed_dim`` is
    False: torch's fused ``nn.TransformerEncoderLayer`` fast path checks these and declines, so
    this module's forward always runs. Nested-tensor inputs (what ``nn.TransformerEncoder``
    passes in eval mode with a padding mask) are accepted.

    Args:
        embed_dim, num_heads, dropout, bias, batch_first: as in ``nn.MultiheadAttention``.
        bucket_size, n_hashes, seed, backend: as in :class:`LSHSelfAttention`.
    """

    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = True, *, bucket_size: int = 64, n_hashes: int = 4, seed: Optional[int] = None,
                 backend: str = "auto"):
        super().__init__(embed_dim, num_heads, bucket_size=bucket_size, n_hashes=n_hashes, dropout=dropout,
                         seed=seed, backend=backend, bias=bias)
        self.embed_dim, self.num_heads, self.batch_first = embed_dim, num_heads, bool(batch_first)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, None]:
        """query (= key = value): ``(B, N, E)`` if batch_first, ``(N, B, E)`` otherwise, ``(N, E)``
        unbatched, or a nested tensor of ``(N_i, E)`` sequences. key_padding_mask: ``(B, N)`` bool
        (True = padding) or float (-inf = padding). attn_mask: None or the causal mask.
        average_attn_weights is accepted for compatibility and ignored (no weights are returned).
        Returns ``(output shaped like query, None)``."""
        if not isinstance(query, Tensor):
            raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
        if need_weights:
            raise ValueError("need_weights=True is not supported: LSH attention never forms the attention weights")
        if not (_same_tensor(key, query) and _same_tensor(value, query)):
            raise ValueError("LSHMultiheadAttention is shared-QK self-attention: key and value must be the same "
                             "tensor as query (no cross-attention)")
        if query.is_nested:
            if attn_mask is not None or key_padding_mask is not None:
                raise ValueError("a nested query carries its own padding: pass no attn_mask or key_padding_mask")
            return self._nested_forward(query, bool(is_causal)), None
        unbatched = query.dim() == 2
        x = query.unsqueeze(0) if unbatched else (query if self.batch_first else query.transpose(0, 1))
        check_features("query", x, self.embed_dim)
        mask = _padding_mask(key_padding_mask)
        mask = mask.unsqueeze(0) if unbatched and mask is not None else mask
        out = self._attend(x, mask, _is_causal(attn_mask, is_causal, x.shape[1]))
        out = out.squeeze(0) if unbatched else (out if self.batch_first else out.transpose(0, 1))
        return out, None

    def _nested_forward(self, x: Tensor, causal: bool) -> Tensor:
        """Nested ``(B, N_i, E)`` -> padded ``(B, N, E)`` with a padding mask -> nested output."""
        if x.dim() != 3 or x.size(-1) != self.embed_dim:
            raise ValueError(f"a nested query must be batched with last dim embed_dim={self.embed_dim}")
        keep = torch.ones_like(x).to_padded_tensor(0.0)[..., 0] > 0  # (B, N), left-aligned sequences
        out = self._attend(x.to_padded_tensor(0.0), ~keep, causal)
        return torch._nested_tensor_from_mask(out, keep, mask_check=False)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, bucket_size: int = 64, n_hashes: int = 4,
                   seed: Optional[int] = None, backend: str = "auto") -> "LSHMultiheadAttention":
        """Build from a trained ``nn.MultiheadAttention``: its query projection becomes the shared
        QK projection; its value and output projections are reused; its KEY PROJECTION IS DROPPED
        (shared-QK attention has none). Same embed_dim, num_heads, dropout, bias, batch_first,
        device and dtype."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_torch needs an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("from_torch needs an nn.MultiheadAttention with kdim == vdim == embed_dim, "
                             "add_bias_kv=False and add_zero_attn=False")
        e, bias = mha.embed_dim, mha.in_proj_bias is not None
        new = cls(e, mha.num_heads, dropout=mha.dropout, bias=bias, batch_first=mha.batch_first,
                  bucket_size=bucket_size, n_hashes=n_hashes, seed=seed, backend=backend)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for proj, rows in ((new.qk_proj, slice(0, e)), (new.v_proj, slice(2 * e, 3 * e))):
                proj.weight.copy_(mha.in_proj_weight[rows])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[rows])
            new.out_proj.load_state_dict(mha.out_proj.state_dict())
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_first={self.batch_first}"
