"""Shared-QK LSH self-attention modules (Reformer), built on ``reformer.kernels.lsh_attention``.

``LSHSelfAttention`` is the plain module (batch first); ``LSHMultiheadAttention`` has the
constructor prefix, call signature, defaults (``batch_first=False``) and return value of
``torch.nn.MultiheadAttention`` so it can replace one inside an existing model (e.g.
``nn.TransformerEncoderLayer.self_attn``).

Hashing scheme: ``n_buckets`` (None = the kernels' automatic rule from the input length; an
even int = plain hashing; ``(n1, n2)`` or ``(n1, n2, n3)`` = factorised hashing) and, for causal attention,
``causal_mode`` (``"chunk"``, the default: the paper's chunked look-back; ``"bucket"``: per round
the most recent ``bucket_size`` positions of a query's own bucket, no look-ahead, exact cached
decoding).
The semantics are in docs/lsh.md.

Rotations: in training every forward draws fresh rotations from the global RNG on the input's
device (so a reversible layer that saves and restores the RNG state replays them exactly); in
eval they are fixed when ``seed`` is set (same output on every call), fresh otherwise. Cached
decoding (``cache=``, see ``reformer.generation``) uses the rotations stored in the cache.

Dropout is applied to the attention output (per head, before the output projection), not to
the attention probabilities, which LSH attention never materialises.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from reformer.kernels import default_n_buckets, lsh_attention, lsh_buckets

from ._validation import check_dropout, check_features, check_heads, check_positive, check_seed
from .config import CAUSAL_MODES, check_n_buckets
from .generation import LSHCache, NBuckets, lsh_decode_attention
from .recorder import MAX_DENSE_LEN


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_dropout_number(dropout: object) -> float:
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
        raise TypeError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return check_dropout(float(dropout))


def rotation_width(n_buckets: NBuckets) -> int:
    """Last dim of the rotations for ``n_buckets``: ``n // 2`` for plain hashing, ``n1 // 2 +
    n2 // 2`` (the two rotations side by side) for factorised hashing."""
    return n_buckets // 2 if isinstance(n_buckets, int) else n_buckets[0] // 2 + n_buckets[1] // 2


def _lsh(qk: Tensor, v: Tensor, *, bucket_size: int, n_hashes: int, causal: bool, causal_mode: str,
         n_buckets: Optional[NBuckets], key_padding_mask: Optional[Tensor], rotations: Optional[Tensor] = None,
         seed: Optional[int] = None, backend: str = "auto") -> Tensor:
    """``reformer.kernels.lsh_attention`` with the module's hashing scheme."""
    return lsh_attention(qk, v, bucket_size=bucket_size, n_hashes=n_hashes, causal=causal, causal_mode=causal_mode,
                         n_buckets=n_buckets, key_padding_mask=key_padding_mask, rotations=rotations, seed=seed,
                         backend=backend)


def draw_rotations(heads: int, head_dim: int, n_hashes: int, n_buckets: NBuckets, *, seed: Optional[int],
                   device: torch.device) -> Tensor:
    """Random rotations ``(H, Dh, n_hashes, rotation_width(n_buckets))`` in float32 for
    ``reformer.kernels.lsh_attention(rotations=...)``: from a CPU generator seeded with ``seed``
    (the rotations ``lsh_attention(seed=seed)`` draws) or, without a seed, the global RNG of ``device``."""
    shape = (heads, head_dim, n_hashes, rotation_width(n_buckets))
    if seed is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _sorted_slots(buckets: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """Slot of every position ``(B, H, N)`` when one round's positions are sorted by (bucket,
    position), padding positions last."""
    n = buckets.shape[-1]
    if key_padding_mask is not None:
        buckets = buckets.masked_fill(key_padding_mask[:, None, :], int(buckets.max()) + 1)
    order = (buckets * n + torch.arange(n, device=buckets.device)).argsort(dim=-1)
    return order.argsort(dim=-1)


def _round_keys(buckets: Tensor, bucket_size: int, causal: bool, causal_mode: str) -> Tensor:
    """Permitted (query, key) pairs ``(B, H, N, N)`` of one round, own position excluded
    (padding is applied by the caller). buckets ``(B, H, N)`` with padding in a bucket of its own."""
    n = buckets.shape[-1]
    slots = _sorted_slots(buckets, None)
    gap = slots[..., :, None] - slots[..., None, :]  # slot_i - slot_j
    if causal and causal_mode == "bucket":  # the W - 1 most recent earlier positions of the own bucket
        same = buckets[..., :, None] == buckets[..., None, :]
        return same & (gap > 0) & (gap < bucket_size)
    chunk = slots // bucket_size
    n_chunks = -(-n // bucket_size)
    ci, cj = chunk[..., :, None], chunk[..., None, :]
    keys = (ci == cj) | ((ci - 1) % n_chunks == cj) if n_chunks > 1 else ci == cj
    keys = keys & ~torch.eye(n, dtype=torch.bool, device=buckets.device)
    if causal:
        keys = keys & torch.ones(n, n, dtype=torch.bool, device=buckets.device).tril()
    return keys


def lsh_attention_weights(qk: Tensor, *, bucket_size: int, n_hashes: int, n_buckets: NBuckets, rotations: Tensor,
                          causal: bool = False, causal_mode: str = "chunk",
                          key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """The combined LSH attention weights as a dense ``(B, H, N, N)`` matrix (docs/lsh.md).

    For inspection and small N: ``weights @ v`` is the output of ``reformer.kernels.lsh_attention``
    with the same arguments. Row i gives, per key j, the softmax weight of one softmax over the
    concatenation of every round's key set (a key found in k rounds counts k times, so its
    weight is k times larger), keys ``qk`` normalised to unit norm, logits ``q.k / sqrt(D)``; the
    own position is no key, and a position with no key in any round gets weight 1 on itself
    (the self rule). Padded rows are zero. qk: ``(B, H, N, D)``; rotations as for ``lsh_buckets``.
    Memory ``O(B H N^2)``. Returns float32 (float64 for float64 qk).
    """
    b, h, n, d = qk.shape
    compute = torch.float64 if qk.dtype == torch.float64 else torch.float32
    buckets = lsh_buckets(qk, n_buckets=n_buckets, n_hashes=n_hashes, rotations=rotations)  # (B, H, R, N)
    if key_padding_mask is not None:
        buckets = buckets.masked_fill(key_padding_mask[:, None, None, :], int(buckets.max()) + 1)
    count = torch.zeros(b, h, n, n, dtype=compute, device=qk.device)
    for r in range(n_hashes):  # one (B, H, N, N) mask per round
        count += _round_keys(buckets[:, :, r], bucket_size, causal, causal_mode)
    x = qk.to(compute)
    keys = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    logits = torch.matmul(x, keys.transpose(-1, -2)) * d**-0.5 + count.log()  # -inf where never permitted
    if key_padding_mask is not None:
        logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    alone = torch.isinf(logits).all(dim=-1, keepdim=True)  # no key in any round: the self rule
    weights = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    weights = weights + alone * torch.eye(n, dtype=compute, device=qk.device)
    if key_padding_mask is not None:
        weights = weights.masked_fill(key_padding_mask[:, None, :, None], 0.0)
    return weights


class _SharedQKAttention(nn.Module):
    """Projections (shared QK, V, output) and the LSH attention call common to both modules."""

    def __init__(self, d_model: int, n_heads: int, *, bucket_size: int, n_hashes: int, dropout: float,
                 seed: Optional[int], backend: str, bias: bool, n_buckets: Optional[NBuckets] = None,
                 causal_mode: str = "chunk"):
        super().__init__()
        self.head_dim = check_heads(d_model, n_heads)
        self.d_model, self.n_heads = d_model, n_heads
        self.bucket_size = check_positive("bucket_size", bucket_size)
        self.n_hashes = check_positive("n_hashes", n_hashes)
        self.dropout = _check_dropout_number(dropout)
        self.seed, self.backend = check_seed(seed), backend
        self.n_buckets = None if n_buckets is None else check_n_buckets(n_buckets)
        if causal_mode not in CAUSAL_MODES:
            raise ValueError(f"causal_mode must be one of {CAUSAL_MODES}, got {causal_mode!r}")
        self.causal_mode = causal_mode
        _check_bool("bias", bias)
        self.qk_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)
        self._recorder = None  # set by reformer.record_attention

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x ``(B, N, d_model)`` -> shared qk and v ``(B, H, N, Dh)``."""
        weight = self.qk_proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the module's parameters are {weight.dtype}; "
                            f"convert one of them (e.g. module.to({x.dtype})) or run under torch.autocast")
        qk = rearrange(self.qk_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.n_heads)
        return qk, v

    def _attend(self, x: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                cache: Optional[LSHCache] = None, want_weights: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """x: ``(B, N, d_model)``; key_padding_mask: ``(B, N)`` bool, True = padding. Returns the
        output ``(B, N, d_model)`` and, when ``want_weights``, the dense weights ``(B, H, N, N)``."""
        qk, v = self._project(x)
        weights = None
        if cache is not None:
            out = self._cached(qk, v, key_padding_mask, causal, cache)
        elif want_weights or self._recorder is not None:
            out, weights = self._attend_inspected(qk, v, key_padding_mask, causal, want_weights)
        else:
            out = _lsh(
                qk, v, bucket_size=self.bucket_size, n_hashes=self.n_hashes, causal=causal,
                causal_mode=self.causal_mode, n_buckets=self.n_buckets, key_padding_mask=key_padding_mask,
                seed=None if self.training else self.seed, backend=self.backend,
            )  # (B, H, N, Dh)
        out = F.dropout(out, self.dropout, self.training)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)")), weights

    def _attend_inspected(self, qk: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                          want_weights: bool) -> tuple[Tensor, Optional[Tensor]]:
        """LSH attention with rotations drawn here (the ones the kernel would draw), recording
        buckets/weights for ``reformer.record_attention`` and returning the weights when asked."""
        n = qk.shape[2]
        if want_weights and n > MAX_DENSE_LEN:
            raise ValueError(f"need_weights=True forms a dense (B, H, N, N) matrix and is limited to "
                             f"N <= {MAX_DENSE_LEN}, got N={n}")
        n_buckets = default_n_buckets(n, self.bucket_size) if self.n_buckets is None else self.n_buckets
        rotations = draw_rotations(self.n_heads, self.head_dim, self.n_hashes, n_buckets,
                                   seed=None if self.training else self.seed, device=qk.device)
        out = _lsh(qk, v, bucket_size=self.bucket_size, n_hashes=self.n_hashes, causal=causal,
                   causal_mode=self.causal_mode, n_buckets=n_buckets, key_padding_mask=key_padding_mask,
                   rotations=rotations, backend=self.backend)
        recorder = self._recorder
        weights = None
        if want_weights or (recorder is not None and recorder.wants_weights(n)):
            weights = lsh_attention_weights(qk.detach(), bucket_size=self.bucket_size, n_hashes=self.n_hashes,
                                            n_buckets=n_buckets, rotations=rotations, causal=causal,
                                            causal_mode=self.causal_mode, key_padding_mask=key_padding_mask)
        if recorder is not None:
            buckets = lsh_buckets(qk.detach(), n_buckets=n_buckets, n_hashes=self.n_hashes, rotations=rotations)
            recorder.add(self, buckets, weights if recorder.wants_weights(n) else None)
        return out, weights

    def _cached(self, qk: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                cache: LSHCache) -> Tensor:
        """Prefill (empty cache: one full forward with the cache's rotations, then store qk, v and
        buckets) or one decoding step (a single new position, ``lsh_decode_attention``)."""
        if not (causal and self.causal_mode == "bucket"):
            raise ValueError("cached LSH attention needs causal=True and causal_mode='bucket' (the only "
                             "mode in which a position's keys do not depend on later positions)")
        if key_padding_mask is not None:
            raise ValueError("cached LSH attention takes no key_padding_mask")
        buckets = lsh_buckets(qk, n_buckets=cache.n_buckets, n_hashes=self.n_hashes, rotations=cache.rotations)
        if cache.length == 0:
            out = _lsh(qk, v, bucket_size=self.bucket_size, n_hashes=self.n_hashes, causal=True,
                       causal_mode="bucket", n_buckets=cache.n_buckets, key_padding_mask=None,
                       rotations=cache.rotations, backend=self.backend)
            cache.append(qk, v, buckets)
            return out
        if qk.shape[2] != 1:
            raise ValueError(f"after the prefill, cached LSH attention takes one new position per call, "
                             f"got {qk.shape[2]}")
        return lsh_decode_attention(qk, v, buckets, cache, bucket_size=self.bucket_size)

    def new_cache(self, capacity: int, n_buckets: Optional[NBuckets] = None, *,
                  device: Optional[torch.device] = None) -> LSHCache:
        """An empty :class:`reformer.generation.LSHCache` for ``capacity`` positions with rotations
        fixed for its lifetime: from ``seed`` when set (the rotations an eval forward uses), else
        drawn from the global RNG of ``device`` (default: the parameters' device).
        ``n_buckets`` defaults to the module's (one of the two must be set)."""
        n_buckets = self.n_buckets if n_buckets is None else check_n_buckets(n_buckets)
        if n_buckets is None:
            raise ValueError("a cache needs a fixed bucket count: construct the module with n_buckets=... "
                             "or pass n_buckets")
        device = self.qk_proj.weight.device if device is None else device
        rotations = draw_rotations(self.n_heads, self.head_dim, self.n_hashes, n_buckets, seed=self.seed,
                                   device=device)
        return LSHCache(capacity, rotations, n_buckets)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, bucket_size={self.bucket_size}, "
                f"n_hashes={self.n_hashes}, n_buckets={self.n_buckets}, dropout={self.dropout}, seed={self.seed}, "
                f"backend={self.backend!r}")


class LSHSelfAttention(_SharedQKAttention):
    """Multi-head shared-QK LSH self-attention (Kitaev et al. 2020), batch first.

    Args:
        d_model: model width, split into ``n_heads`` heads of ``d_model // n_heads``.
        n_heads: number of heads.
        bucket_size: LSH chunk length (``"bucket"`` mode: how many of its bucket's most recent
            positions a causal query attends to per round).
        n_hashes: hash rounds; more rounds approximate full attention better.
        causal: bool; position i attends only to positions <= i.
        dropout: dropout on the attention output (training only).
        seed: fixed rotations in eval mode (training always draws fresh ones).
        backend: ``reformer.kernels`` backend (``"auto"``, ``"torch"``, ``"triton"``).
        bias: whether the three projections have a bias.
        n_buckets: None (automatic from the input length), an even int, or a tuple ``(n1, n2)`` / ``(n1, n2, n3)``
            of even ints (factorised hashing). Fix it when outputs must not depend on the
            length through the bucket count (cached decoding needs a fixed count).
        causal_mode: ``"chunk"`` (default; the paper's chunked look-back) or ``"bucket"`` (no
            look-ahead, exact cached decoding); used when causal.
    """

    def __init__(self, d_model: int, n_heads: int, *, bucket_size: int = 64, n_hashes: int = 4, causal: bool = False,
                 dropout: float = 0.0, seed: Optional[int] = None, backend: str = "auto", bias: bool = True,
                 n_buckets: Optional[NBuckets] = None, causal_mode: str = "chunk"):
        super().__init__(d_model, n_heads, bucket_size=bucket_size, n_hashes=n_hashes, dropout=dropout, seed=seed,
                         backend=backend, bias=bias, n_buckets=n_buckets, causal_mode=causal_mode)
        self.causal = _check_bool("causal", causal)

    def forward(self, x: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                cache: Optional[LSHCache] = None) -> Tensor:
        """x: ``(B, N, d_model)``; key_padding_mask: ``(B, N)`` bool, True = padding (ignored as a
        key; its output row is the output projection of zeros). Returns ``(B, N, d_model)``.

        cache: an :class:`reformer.generation.LSHCache` from :meth:`new_cache` (causal
        ``"bucket"`` mode only): an empty cache takes the whole prompt (the prefill), after that
        each call takes one new position ``(B, 1, d_model)`` and attends to the cached ones."""
        check_features("x", x, self.d_model)
        return self._attend(x, key_padding_mask, self.causal, cache)[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, causal={self.causal}, causal_mode={self.causal_mode!r}"


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
    LSH attention: same constructor prefix, call signature and return value ``(output, weights)``.

    ``need_weights`` defaults to False (weights None): LSH attention never forms the ``(N, N)``
    matrix. With ``need_weights=True`` (N <= 4096) the combined LSH weights are formed densely
    from the same rotations (``lsh_attention_weights``): ``(B, N, N)`` averaged over heads, or
    ``(B, H, N, N)`` with ``average_attn_weights=False``; they are the weights before dropout.

    It cannot honour everything ``nn.MultiheadAttention`` can, and raises ``ValueError`` for:
    ``key``/``value`` other than the tensor passed as ``query`` (the same object or a view of
    the same memory; shared-QK LSH is self-attention only); ``need_weights=True`` with N > 4096
    or a nested query; an ``attn_mask`` other than the causal mask; a float
    ``key_padding_mask`` with values other than 0 and -inf.

    Differences: ``dropout`` acts on the attention output, not the probabilities; there is no
    key projection (keys are the normalised shared QK projection). There is no packed
    in-projection: ``in_proj_weight``/``in_proj_bias`` are empty tensors (torch's encoder
    inspects them; they take no part in the computation) and ``_qkv_same_embed_dim`` is False,
    so torch's fused ``nn.TransformerEncoderLayer`` fast path declines and this module's forward
    always runs. Nested-tensor inputs (what ``nn.TransformerEncoder`` passes in eval mode with
    a padding mask under ``torch.no_grad``) are accepted; with grad enabled the encoder passes
    padded inputs and the mask instead.

    Args:
        embed_dim, num_heads, dropout, bias, batch_first: as in ``nn.MultiheadAttention``
            (``batch_first=False`` by default, like torch: inputs ``(N, B, E)``).
        bucket_size, n_hashes, seed, backend, n_buckets, causal_mode: as in
            :class:`LSHSelfAttention` (causal when ``is_causal`` or a causal ``attn_mask`` is given).
    """

    _qkv_same_embed_dim = False

    @property
    def in_proj_weight(self) -> Tensor:
        """An empty tensor: there is no packed in-projection (``qk_proj``, ``v_proj`` instead)."""
        return self.qk_proj.weight.new_empty(0)

    @property
    def in_proj_bias(self) -> Tensor:
        """An empty tensor, like ``in_proj_weight``."""
        return self.qk_proj.weight.new_empty(0)

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, *, bucket_size: int = 64, n_hashes: int = 4, seed: Optional[int] = None,
                 backend: str = "auto", n_buckets: Optional[NBuckets] = None, causal_mode: str = "chunk"):
        super().__init__(embed_dim, num_heads, bucket_size=bucket_size, n_hashes=n_hashes, dropout=dropout,
                         seed=seed, backend=backend, bias=bias, n_buckets=n_buckets, causal_mode=causal_mode)
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.batch_first = _check_bool("batch_first", batch_first)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        """query (= key = value): ``(B, N, E)`` if batch_first, ``(N, B, E)`` otherwise, ``(N, E)``
        unbatched, or a nested tensor of ``(N_i, E)`` sequences. key_padding_mask: ``(B, N)`` bool
        (True = padding) or float (-inf = padding). attn_mask: None or the causal mask.
        Returns ``(output shaped like query, weights)``: weights None unless ``need_weights``,
        then ``(B, N, N)`` (head average) or ``(B, H, N, N)`` (``average_attn_weights=False``),
        without the batch dim for unbatched input."""
        if not isinstance(query, Tensor):
            raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
        if not (_same_tensor(key, query) and _same_tensor(value, query)):
            raise ValueError("LSHMultiheadAttention is shared-QK self-attention: key and value must be the same "
                             "tensor as query (no cross-attention)")
        if query.is_nested:
            if need_weights:
                raise ValueError("need_weights=True is not supported for nested queries")
            if attn_mask is not None or key_padding_mask is not None:
                raise ValueError("a nested query carries its own padding: pass no attn_mask or key_padding_mask")
            return self._nested_forward(query, bool(is_causal)), None
        unbatched = query.dim() == 2
        x = query.unsqueeze(0) if unbatched else (query if self.batch_first else query.transpose(0, 1))
        check_features("query", x, self.embed_dim)
        mask = _padding_mask(key_padding_mask)
        mask = mask.unsqueeze(0) if unbatched and mask is not None else mask
        out, weights = self._attend(x, mask, _is_causal(attn_mask, is_causal, x.shape[1]),
                                    want_weights=bool(need_weights))
        out = out.squeeze(0) if unbatched else (out if self.batch_first else out.transpose(0, 1))
        if weights is not None:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            weights = weights.squeeze(0) if unbatched else weights
        return out, weights

    def _nested_forward(self, x: Tensor, causal: bool) -> Tensor:
        """Nested ``(B, N_i, E)`` -> padded ``(B, N, E)`` with a padding mask -> nested output."""
        if x.dim() != 3 or x.size(-1) != self.embed_dim:
            raise ValueError(f"a nested query must be batched with last dim embed_dim={self.embed_dim}")
        keep = torch.ones_like(x).to_padded_tensor(0.0)[..., 0] > 0  # (B, N), left-aligned sequences
        out = self._attend(x.to_padded_tensor(0.0), ~keep, causal)[0]
        return torch._nested_tensor_from_mask(out, keep, mask_check=False)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, *, bucket_size: int = 64, n_hashes: int = 4,
                   seed: Optional[int] = None, backend: str = "auto", n_buckets: Optional[NBuckets] = None,
                   causal_mode: str = "chunk") -> "LSHMultiheadAttention":
        """Build from a trained ``nn.MultiheadAttention``: its query projection becomes the shared
        QK projection; its value and output projections are reused; its KEY PROJECTION IS DROPPED
        (shared-QK attention has none). Same embed_dim, num_heads, dropout, bias, batch_first,
        device, dtype and train/eval mode (an eval-mode ``mha`` gives an eval-mode module, which
        with a ``seed`` uses fixed rotations)."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"from_torch needs an nn.MultiheadAttention, got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("from_torch needs an nn.MultiheadAttention with kdim == vdim == embed_dim, "
                             "add_bias_kv=False and add_zero_attn=False")
        e, bias = mha.embed_dim, mha.in_proj_bias is not None
        new = cls(e, mha.num_heads, dropout=mha.dropout, bias=bias, batch_first=mha.batch_first,
                  bucket_size=bucket_size, n_hashes=n_hashes, seed=seed, backend=backend, n_buckets=n_buckets,
                  causal_mode=causal_mode)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            for proj, rows in ((new.qk_proj, slice(0, e)), (new.v_proj, slice(2 * e, 3 * e))):
                proj.weight.copy_(mha.in_proj_weight[rows])
                if bias:
                    proj.bias.copy_(mha.in_proj_bias[rows])
            new.out_proj.load_state_dict(mha.out_proj.state_dict())
        return new.train(mha.training)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_first={self.batch_first}"
