"""``ReformerLM``: a language model of reversible (attention, chunked feed-forward) blocks.

    tokens (B, N) -> embedding + positions (B, N, d) -> ReversibleSequence of `depth` blocks
    [f = PreNorm(attention), g = PreNorm(feed-forward)] over two streams -> concat (B, N, 2d)
    -> LayerNorm(2d) -> Linear(2d, vocab) -> logits (B, N, vocab)

As in trax's ReformerLM, the embedded input is duplicated into the two reversible streams and
their final values are concatenated before the output norm and head.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_key_padding_mask, check_positive, check_tokens
from .attention import MultiHeadAttention
from .chunked_loss import chunked_cross_entropy
from .config import ReformerConfig
from .feedforward import ChunkedFeedForward, FeedForward
from .generation import KVCache, ModelCache, decode_tokens, sampling_options
from .lsh_attention import LSHSelfAttention
from .positional import AxialPositionalEncoding, SinusoidalPositionalEncoding
from .pretrained import load_pretrained, save_pretrained
from .reversible import ReversibleSequence


class PreNorm(nn.Module):
    """A residual branch ``dropout(fn(LayerNorm(x), **fn_kwargs, **kwargs))``, ``(B, N, d) -> (B, N, d)``.

    The residual addition itself is done by the reversible coupling.
    """

    def __init__(self, d_model: int, fn: nn.Module, dropout: float = 0.0, **fn_kwargs: Any):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fn = fn
        self.dropout = nn.Dropout(dropout)
        self.fn_kwargs = fn_kwargs

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.dropout(self.fn(self.norm(x), **self.fn_kwargs, **kwargs))


def build_attention(config: ReformerConfig, layer: int = 0) -> PreNorm:
    """The ``f`` branch of block ``layer``: pre-norm LSH or full self-attention, causal per the
    config; LSH gets the config's hashing scheme (n_buckets, causal_mode) and the eval-mode
    rotation seed ``config.seed + layer`` (None without a seed)."""
    if config.attention == "lsh":
        seed = None if config.seed is None else config.seed + layer
        attn = LSHSelfAttention(config.d_model, config.n_heads, bucket_size=config.bucket_size,
                                n_hashes=config.n_hashes, causal=config.causal, dropout=config.dropout, seed=seed,
                                n_buckets=config.n_buckets, causal_mode=config.causal_mode)
        return PreNorm(config.d_model, attn, config.dropout)
    attn = MultiHeadAttention(config.d_model, config.n_heads, dropout=config.dropout)
    return PreNorm(config.d_model, attn, config.dropout, causal=config.causal)


def build_feedforward(config: ReformerConfig) -> PreNorm:
    """The ``g`` branch: pre-norm feed-forward, chunked when ``ff_chunks > 1``."""
    if config.ff_chunks > 1:
        ff = ChunkedFeedForward(config.d_model, config.d_ff, config.ff_chunks, dropout=config.dropout)
    else:
        ff = FeedForward(config.d_model, config.d_ff, dropout=config.dropout)
    return PreNorm(config.d_model, ff, config.dropout)


class ReformerLM(nn.Module):
    """Reformer language model built from a ``ReformerConfig`` (see the module docstring).

    With attention="lsh", eval-mode forwards are deterministic only when ``config.seed`` is set
    (fixed rotations); otherwise every call draws fresh rotations from the global RNG.

    Incremental decoding: ``cache = model.new_cache()`` then ``model(prompt, cache=cache)``
    (the prefill) and ``model(next_tokens (B, 1), cache=cache)`` per new token give the logits
    of one full forward over the same tokens (for full attention, and for LSH with
    ``causal_mode="bucket"``; the default ``"chunk"`` decodes uncached). ``generate`` does this
    for you. Saved models:
    ``save_pretrained(dir)`` / ``ReformerLM.from_pretrained(dir)`` (``reformer.pretrained``).
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config must be a ReformerConfig, got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.token_emb = nn.Embedding(config.vocab_size, d)
        if config.axial_shape is not None:
            self.pos_enc = AxialPositionalEncoding(d, config.axial_shape, config.axial_dims)
        else:
            self.pos_enc = SinusoidalPositionalEncoding(d, config.max_seq_len)
        self.emb_dropout = nn.Dropout(config.dropout)
        blocks = ((build_attention(config, layer), build_feedforward(config)) for layer in range(config.depth))
        self.layers = ReversibleSequence(blocks, reversible=config.reversible)
        self.norm = nn.LayerNorm(2 * d)
        self.head = nn.Linear(2 * d, config.vocab_size)

    def hidden(self, tokens: Tensor, *, key_padding_mask: Optional[Tensor] = None,
               cache: Optional[ModelCache] = None) -> Tensor:
        """tokens ``(B, N)`` ids, N <= max_seq_len -> normalised features ``(B, N, 2 * d_model)``.

        key_padding_mask: ``(B, N)`` bool, True = padding (ignored as attention keys).
        cache: see ``forward``.
        """
        if cache is not None:
            return self._cached_hidden(tokens, cache, key_padding_mask)
        check_tokens("tokens", tokens, self.config.vocab_size, self.config.max_seq_len)
        mask = check_key_padding_mask(key_padding_mask, tokens.shape[0], tokens.shape[1], tokens.device)
        x = self.emb_dropout(self.pos_enc(self.token_emb(tokens.long())))  # (B, N, d)
        kwargs = {} if mask is None else {"key_padding_mask": mask}
        return self.norm(self.layers(x, **kwargs))  # (B, N, 2d)

    def forward(self, tokens: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                cache: Optional[ModelCache] = None) -> Tensor:
        """tokens ``(B, N)`` -> logits ``(B, N, vocab_size)``; mask as in ``hidden``.

        cache: a ``ModelCache`` from :meth:`new_cache`. Then ``tokens`` are the positions AFTER
        the cached ones (all of the prompt for an empty cache, then one token per call with LSH
        attention) and the logits are theirs; the cache is extended. No key_padding_mask then.
        """
        return self.head(self.hidden(tokens, key_padding_mask=key_padding_mask, cache=cache))

    def supports_cache(self) -> bool:
        """True when cached decoding is exact: full attention, or LSH with ``causal_mode="bucket"``
        (causal models only)."""
        return self.config.causal and (self.config.attention == "full" or self.config.causal_mode == "bucket")

    def new_cache(self, capacity: Optional[int] = None, *, like: Optional[ModelCache] = None) -> ModelCache:
        """An empty ``ModelCache`` for up to ``capacity`` positions (default and maximum:
        ``max_seq_len``). LSH layers get rotations fixed for the cache's lifetime: those of
        ``like`` (another cache of this model) when given, else their eval rotations when
        ``config.seed`` is set, else fresh ones from the global RNG."""
        if not self.supports_cache():
            raise ValueError("cached decoding needs a causal model with attention='full' or causal_mode='bucket' "
                             f"(got causal={self.config.causal}, attention={self.config.attention!r}, "
                             f"causal_mode={self.config.causal_mode!r})")
        capacity = self.config.max_seq_len if capacity is None else check_positive("capacity", capacity)
        if capacity > self.config.max_seq_len:
            raise ValueError(f"capacity must be <= max_seq_len={self.config.max_seq_len}, got {capacity}")
        device = self.head.weight.device
        layers = []
        for i, block in enumerate(self.layers.blocks):
            attn = block.f.fn
            if isinstance(attn, LSHSelfAttention):
                layer = attn.new_cache(capacity, device=device)
                if like is not None:
                    layer.rotations = like.layers[i].rotations
            else:
                layer = KVCache(capacity)
            layers.append(layer)
        return ModelCache(layers)

    def _cached_hidden(self, tokens: Tensor, cache: ModelCache, key_padding_mask: Optional[Tensor]) -> Tensor:
        """Features ``(B, T, 2d)`` of ``tokens (B, T)``, the positions after the cached ones."""
        if not isinstance(cache, ModelCache) or len(cache.layers) != self.config.depth:
            raise TypeError(f"cache must be a ModelCache from new_cache() with {self.config.depth} layers")
        if key_padding_mask is not None:
            raise ValueError("key_padding_mask cannot be combined with a cache")
        check_tokens("tokens", tokens, self.config.vocab_size)
        start, n = cache.length, cache.length + tokens.shape[1]
        if n > cache.capacity:
            raise ValueError(f"the cache holds {start} of {cache.capacity} positions: {tokens.shape[1]} more "
                             f"tokens do not fit")
        x = self.token_emb(tokens.long())
        x = self.emb_dropout(x + self.pos_enc.encoding(n)[start:].to(x.dtype))  # (B, T, d)
        x1 = x2 = x
        for block, layer_cache in zip(self.layers.blocks, cache.layers):
            x1, x2 = block(x1, x2, cache=layer_cache)  # reversible or not: the same coupling
        return self.norm(torch.cat([x1, x2], dim=-1))  # (B, T, 2d)

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``tokens`` ``(B, N)``, B >= 1, N >= 2: position i predicts i + 1.

        With ``ff_chunks > 1`` the head and the loss run over that many slices of the positions
        (``chunked_cross_entropy``), so the ``(B, N, vocab)`` logits never exist whole.
        """
        self._check_causal("loss")
        check_tokens("tokens", tokens, self.config.vocab_size, self.config.max_seq_len)
        if tokens.shape[0] == 0:
            raise ValueError(f"tokens must hold at least one sequence for a loss, got shape {tuple(tokens.shape)}")
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens must have at least 2 positions for a next-token loss, got {tokens.shape[1]}")
        features = self.hidden(tokens)[:, :-1].reshape(-1, 2 * self.config.d_model)  # (B * (N-1), 2d)
        targets = tokens[:, 1:].reshape(-1).long()
        if self.config.ff_chunks > 1:
            return chunked_cross_entropy(features, self.head.weight, self.head.bias, targets, self.config.ff_chunks)
        return F.cross_entropy(self.head(features), targets)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: bool = True,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> Tensor:
        """Continue ``prompt`` ``(B, Np)`` by up to ``max_new_tokens`` tokens; returns ``(B, Np + T)``.

        Sampling (``reformer.generation.sample_next``): greedy when ``do_sample=False`` or
        ``temperature=0``; otherwise a draw from ``softmax(logits / temperature)`` limited to the
        ``top_k`` most likely ids and then to the nucleus of probability ``top_p``, with
        ``generator`` (a ``torch.Generator`` on the model's device) or the global RNG.
        ``eos_token_id``: a sequence that produced it gets ``pad_token_id`` (default: the eos id)
        afterwards, and generation stops once every sequence has, so T <= max_new_tokens.
        ``max_new_tokens=0`` returns the prompt unchanged (as a LongTensor).

        Context: the model sees at most the last ``max_seq_len`` tokens; a longer prompt is
        cropped to its last ``max_seq_len`` tokens for the model (the returned tensor still starts
        with the whole prompt). ``use_cache=True`` (default) runs one forward over the prompt and
        then one cached step per token (``new_cache``); once the sequence outgrows
        ``max_seq_len`` every step is a forward over the last ``max_seq_len`` tokens, exactly
        what ``use_cache=False`` does at every step. Models without exact caching (LSH with
        ``causal_mode="chunk"``) always run uncached. The LSH rotations are fixed for the whole
        call (the seeded ones when ``config.seed`` is set, else drawn once from the global RNG),
        so cached and uncached runs agree. Runs in eval mode and restores the previous mode.
        """
        self._check_causal("generate")
        check_tokens("prompt", prompt, self.config.vocab_size)
        options = sampling_options(self.config.vocab_size, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, do_sample=do_sample, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id, generator=generator)
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
        tokens = prompt.long()
        if max_new_tokens == 0:
            return tokens
        was_training = self.training
        self.eval()
        try:
            capacity = min(self.config.max_seq_len, tokens.shape[1] + max_new_tokens)
            return decode_tokens(tokens, max_new_tokens, _NextLogits(self, capacity, use_cache), options)
        finally:
            self.train(was_training)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``directory/config.json`` and ``directory/model.safetensors`` (no pickle)."""
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *,
                        device: Union[str, torch.device, None] = None) -> "ReformerLM":
        """The model saved by ``save_pretrained`` in ``directory`` (on ``device``, default CPU), in eval mode."""
        return load_pretrained(cls, ReformerConfig, directory, device=device)

    def _check_causal(self, what: str) -> None:
        if not self.config.causal:
            raise ValueError(f"{what} needs a causal model (config.causal=True): otherwise position i sees its target")


class _NextLogits:
    """``tokens (B, N) -> logits (B, V)`` of the next token for ``generate``: cached steps while
    the sequence fits the cache, a fresh prefill over the last ``max_seq_len`` tokens otherwise.
    Every cache of one call shares the first cache's LSH rotations."""

    def __init__(self, model: ReformerLM, capacity: int, use_cache: bool):
        self.model, self.capacity, self.use_cache = model, capacity, use_cache
        self.cache: Optional[ModelCache] = None

    def __call__(self, tokens: Tensor) -> Tensor:
        model = self.model
        if not model.supports_cache():  # no exact cache: a plain forward per step
            return model.head(model.hidden(tokens[:, -model.config.max_seq_len:])[:, -1])
        cache = self.cache
        if self.use_cache and cache is not None and cache.length == tokens.shape[1] - 1 < cache.capacity:
            new = tokens[:, -1:]
        else:
            new = tokens[:, -model.config.max_seq_len:]
            cache = self.cache = model.new_cache(self.capacity, like=self.cache)  # capacity >= len(new)
        return model.head(model.hidden(new, cache=cache)[:, -1])
