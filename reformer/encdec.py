"""``ReformerEncDec``: an encoder-decoder built from the Reformer parts (the paper trains a
reversible Transformer on translation).

    src (B, S) -> embedding + positions -> reversible encoder blocks
        [f = PreNorm(LSH or full self-attention, key padding), g = PreNorm(feed-forward)]
        -> mean of the two streams -> LayerNorm -> memory (B, S, d)
    tgt (B, T) -> embedding + positions -> reversible decoder blocks
        [f = PreNorm(causal self-attention) then PreNorm(full cross-attention to memory),
         g = PreNorm(feed-forward)] -> concat (B, T, 2d) -> LayerNorm -> Linear -> logits

Decoder self-attention is LSH in ``causal_mode="bucket"`` (or full), so ``generate`` decodes
with per-layer caches (``reformer.generation``): the encoder runs once, the cross-attention
keys and values are computed once, and each new token costs one cached step per layer.

Reversible decoder: the decoder is a ``ReversibleSequence`` whose blocks' ``f`` receive the
memory and its padding mask as keyword arguments; ``ReversibleSequence`` makes keyword tensors
inputs of its autograd function, so the memory gets its gradient (summed over the blocks) and
the encoder learns through the cross-attention exactly as with ordinary autograd.

``state_dict`` keys: the decoder blocks are ``decoder.blocks.<i>.*`` (as the encoder's
``encoder.blocks.<i>.*``); state dicts with the earlier ``decoder.<i>.*`` keys still load.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import (check_axes, check_dropout, check_heads, check_key_padding_mask, check_positive,
                          check_seed, check_tokens)
from .attention import MultiHeadAttention
from .config import ATTENTIONS, check_n_buckets, default_n_buckets
from .feedforward import ChunkedFeedForward, FeedForward
from .generation import KVCache, ModelCache, decode_tokens, sampling_options
from .lsh_attention import LSHSelfAttention
from .model import PreNorm
from .positional import AxialPositionalEncoding, SinusoidalPositionalEncoding
from .pretrained import load_pretrained, save_pretrained
from .reversible import ReversibleSequence


@dataclass(frozen=True)
class EncDecConfig:
    """Hyper-parameters of ``ReformerEncDec``; checked on construction, immutable afterwards.

    Fields: src_vocab_size, tgt_vocab_size; d_model, n_heads, d_ff; encoder_depth,
    decoder_depth; max_src_len, max_tgt_len (longest accepted source / target). attention:
    ``"lsh"`` or ``"full"`` for both self-attentions (cross-attention is always full).
    bucket_size, n_hashes: LSH parameters. src_n_buckets / tgt_n_buckets: the encoder's and
    decoder's hashing scheme (None resolves to ``default_n_buckets(max_len, bucket_size)``, stored
    resolved; an even int or a pair of even ints as in ``ReformerConfig.n_buckets``). The decoder
    uses ``causal_mode="bucket"`` (exact cached decoding). axial_shape: learned axial positions
    over this grid for both sides (product >= both max lengths) or None for sinusoidal ones.
    ff_chunks: feed-forward slices. reversible: reversible blocks (or the same network with
    ordinary autograd). dropout. seed: eval-mode LSH rotations (encoder layer i: seed + i,
    decoder layer i: seed + encoder_depth + i).
    """

    src_vocab_size: int = 256
    tgt_vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    encoder_depth: int = 6
    decoder_depth: int = 6
    d_ff: int = 1024
    max_src_len: int = 1024
    max_tgt_len: int = 1024
    attention: str = "lsh"
    bucket_size: int = 64
    n_hashes: int = 4
    src_n_buckets: Optional[Union[int, tuple[int, ...]]] = None
    tgt_n_buckets: Optional[Union[int, tuple[int, ...]]] = None
    axial_shape: Optional[tuple[int, ...]] = None
    ff_chunks: int = 1
    reversible: bool = True
    dropout: float = 0.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("src_vocab_size", "tgt_vocab_size", "d_model", "n_heads", "encoder_depth", "decoder_depth",
                     "d_ff", "max_src_len", "max_tgt_len", "bucket_size", "n_hashes", "ff_chunks"):
            check_positive(name, getattr(self, name))
        check_heads(self.d_model, self.n_heads)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if not isinstance(self.reversible, bool):
            raise TypeError(f"reversible must be a bool, got {self.reversible!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool):
            raise TypeError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        check_dropout(self.dropout)
        check_seed(self.seed)
        for name, length in (("src_n_buckets", self.max_src_len), ("tgt_n_buckets", self.max_tgt_len)):
            value = getattr(self, name)
            object.__setattr__(self, name, check_n_buckets(
                default_n_buckets(length, self.bucket_size) if value is None else value))
        if self.axial_shape is not None:
            shape = check_axes("axial_shape", self.axial_shape)
            if math.prod(shape) < max(self.max_src_len, self.max_tgt_len):
                raise ValueError(f"axial_shape {shape} covers {math.prod(shape)} positions, fewer than "
                                 f"max(max_src_len, max_tgt_len)={max(self.max_src_len, self.max_tgt_len)}")
            if self.d_model % len(shape):
                raise ValueError(f"d_model ({self.d_model}) must be divisible by len(axial_shape) ({len(shape)})")
            object.__setattr__(self, "axial_shape", shape)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-friendly values (tuples become lists)."""
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}


class DecoderAttention(nn.Module):
    """The ``f`` branch of a decoder block: ``a = SelfAttn(LN(x))`` (causal) then
    ``a + CrossAttn(LN(x + a), memory)``; ``(B, T, d) -> (B, T, d)``."""

    def __init__(self, self_attn: PreNorm, cross_attn: PreNorm):
        super().__init__()
        self.self_attn, self.cross_attn = self_attn, cross_attn

    def forward(self, x: Tensor, *, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                cache: Optional[tuple[Any, KVCache]] = None) -> Tensor:
        self_cache, cross_cache = (None, None) if cache is None else cache
        a = self.self_attn(x) if self_cache is None else self.self_attn(x, cache=self_cache)
        c = self.cross_attn(x + a, context=memory, key_padding_mask=memory_key_padding_mask, cache=cross_cache)
        return a + c


def _feedforward(config: EncDecConfig) -> PreNorm:
    if config.ff_chunks > 1:
        ff = ChunkedFeedForward(config.d_model, config.d_ff, config.ff_chunks, dropout=config.dropout)
    else:
        ff = FeedForward(config.d_model, config.d_ff, dropout=config.dropout)
    return PreNorm(config.d_model, ff, config.dropout)


def _self_attention(config: EncDecConfig, causal: bool, seed: Optional[int]) -> PreNorm:
    if config.attention == "full":
        return PreNorm(config.d_model, MultiHeadAttention(config.d_model, config.n_heads, dropout=config.dropout),
                       config.dropout, causal=causal)
    attn = LSHSelfAttention(config.d_model, config.n_heads, bucket_size=config.bucket_size, n_hashes=config.n_hashes,
                            causal=causal, dropout=config.dropout, seed=seed, causal_mode="bucket",
                            n_buckets=config.tgt_n_buckets if causal else config.src_n_buckets)
    return PreNorm(config.d_model, attn, config.dropout)


def _cross_attention(config: EncDecConfig) -> PreNorm:
    return PreNorm(config.d_model, MultiHeadAttention(config.d_model, config.n_heads, dropout=config.dropout),
                   config.dropout)


def _positions(config: EncDecConfig, length: int) -> nn.Module:
    if config.axial_shape is None:
        return SinusoidalPositionalEncoding(config.d_model, length)
    axes = len(config.axial_shape)
    return AxialPositionalEncoding(config.d_model, config.axial_shape, (config.d_model // axes,) * axes)


def _seed(config: EncDecConfig, layer: int) -> Optional[int]:
    return None if config.seed is None else config.seed + layer


class ReformerEncDec(nn.Module):
    """Encoder-decoder from Reformer parts (see the module docstring); built from an ``EncDecConfig``."""

    def __init__(self, config: EncDecConfig):
        super().__init__()
        if not isinstance(config, EncDecConfig):
            raise TypeError(f"config must be an EncDecConfig, got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.src_emb = nn.Embedding(config.src_vocab_size, d)
        self.tgt_emb = nn.Embedding(config.tgt_vocab_size, d)
        self.src_pos, self.tgt_pos = (_positions(config, length) for length in (config.max_src_len, config.max_tgt_len))
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = ReversibleSequence(
            ((_self_attention(config, False, _seed(config, i)), _feedforward(config))
             for i in range(config.encoder_depth)), reversible=config.reversible)
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder = ReversibleSequence(
            ((DecoderAttention(_self_attention(config, True, _seed(config, config.encoder_depth + i)),
                               _cross_attention(config)), _feedforward(config))
             for i in range(config.decoder_depth)), reversible=config.reversible)
        self.decoder_norm = nn.LayerNorm(2 * d)
        self.head = nn.Linear(2 * d, config.tgt_vocab_size)
        self._register_load_state_dict_pre_hook(_rename_flat_decoder_keys)

    def encode(self, src: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src ``(B, S)`` ids, mask ``(B, S)`` bool (True = padding) -> memory ``(B, S, d_model)``."""
        check_tokens("src", src, self.config.src_vocab_size, self.config.max_src_len)
        mask = check_key_padding_mask(src_key_padding_mask, src.shape[0], src.shape[1], src.device)
        x = self.dropout(self.src_pos(self.src_emb(src.long())))
        out = self.encoder(x, **({} if mask is None else {"key_padding_mask": mask}))  # (B, S, 2d)
        x1, x2 = out.chunk(2, dim=-1)
        return self.encoder_norm((x1 + x2) / 2)

    def decode(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None, *,
               cache: Optional[ModelCache] = None) -> Tensor:
        """tgt ``(B, T)`` ids attending causally to themselves and fully to ``memory (B, S, d)`` ->
        logits ``(B, T, tgt_vocab_size)``. With a ``cache`` (``new_cache``), tgt are the positions
        after the cached ones (one per call after the first with LSH)."""
        start = 0 if cache is None else cache.length
        check_tokens("tgt", tgt, self.config.tgt_vocab_size)
        n = start + tgt.shape[1]
        if n > self.config.max_tgt_len:
            raise ValueError(f"tgt reaches position {n}, beyond max_tgt_len={self.config.max_tgt_len}")
        x = self.tgt_emb(tgt.long())
        x = self.dropout(x + self.tgt_pos.encoding(n)[start:].to(x.dtype))
        if cache is None:
            out = self.decoder(x, memory=memory, memory_key_padding_mask=memory_key_padding_mask)
        else:  # one cached step per block (no gradients are kept across steps)
            x1 = x2 = x
            for block, self_cache, cross_cache in zip(self.decoder.blocks, cache.layers, cache.cross):
                x1, x2 = block(x1, x2, memory=memory, memory_key_padding_mask=memory_key_padding_mask,
                               cache=(self_cache, cross_cache))
            out = torch.cat([x1, x2], dim=-1)
        return self.head(self.decoder_norm(out))

    def forward(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Logits ``(B, T, tgt_vocab_size)`` of ``tgt (B, T)`` given ``src (B, S)``."""
        memory = self.encode(src, src_key_padding_mask)
        return self.decode(tgt, memory, src_key_padding_mask)

    def loss(self, src: Tensor, tgt: Tensor, src_key_padding_mask: Optional[Tensor] = None, *,
             ignore_index: Optional[int] = None) -> Tensor:
        """Teacher-forced cross-entropy: ``tgt[:, :-1]`` predicts ``tgt[:, 1:]`` (tgt starts with a
        BOS id); target ids equal to ``ignore_index`` (e.g. padding) are left out."""
        check_tokens("tgt", tgt, self.config.tgt_vocab_size, self.config.max_tgt_len)
        if tgt.shape[0] == 0 or tgt.shape[1] < 2:
            raise ValueError(f"tgt must hold at least one sequence of at least 2 positions, got {tuple(tgt.shape)}")
        logits = self(src, tgt[:, :-1], src_key_padding_mask)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1).long(),
                               ignore_index=-100 if ignore_index is None else ignore_index)

    def new_cache(self, capacity: Optional[int] = None, *, like: Optional[ModelCache] = None) -> ModelCache:
        """Empty decoder caches (self-attention and cross-attention) for ``capacity`` target
        positions (default ``max_tgt_len``), with LSH rotations fixed for the cache's lifetime:
        those of ``like`` when given, else the seeded ones or fresh draws from the global RNG."""
        capacity = self.config.max_tgt_len if capacity is None else check_positive("capacity", capacity)
        if capacity > self.config.max_tgt_len:
            raise ValueError(f"capacity must be <= max_tgt_len={self.config.max_tgt_len}, got {capacity}")
        device = self.head.weight.device
        layers = []
        for i, block in enumerate(self.decoder.blocks):
            attn = block.f.self_attn.fn
            if isinstance(attn, LSHSelfAttention):
                layers.append(attn.new_cache(capacity, device=device))
                if like is not None:
                    layers[-1].rotations = like.layers[i].rotations
            else:
                layers.append(KVCache(capacity))
        return ModelCache(layers, cross=[KVCache(capacity, static=True) for _ in self.decoder.blocks])

    @torch.no_grad()
    def generate(self, src: Tensor, max_new_tokens: int, *, bos_token_id: int,
                 src_key_padding_mask: Optional[Tensor] = None, temperature: float = 1.0,
                 top_k: Optional[int] = None, top_p: Optional[float] = None, do_sample: bool = True,
                 eos_token_id: Optional[int] = None, pad_token_id: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True) -> Tensor:
        """Decode ``(B, 1 + T)`` target ids starting with ``bos_token_id``, T <= max_new_tokens
        (``1 + max_new_tokens <= max_tgt_len``); options as in ``ReformerLM.generate`` (greedy
        with ``do_sample=False`` or ``temperature=0``; eos stops a sequence and pads the rest;
        ``max_new_tokens=0`` returns just the BOS column). The encoder runs once; with
        ``use_cache`` each new token is one cached decoder step."""
        options = sampling_options(self.config.tgt_vocab_size, max_new_tokens=max_new_tokens,
                                   temperature=temperature, top_k=top_k, top_p=top_p, do_sample=do_sample,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)
        if not isinstance(bos_token_id, int) or isinstance(bos_token_id, bool) \
                or not 0 <= bos_token_id < self.config.tgt_vocab_size:
            raise ValueError(f"bos_token_id must be an int in [0, {self.config.tgt_vocab_size}), got {bos_token_id!r}")
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache must be a bool, got {use_cache!r}")
        if 1 + max_new_tokens > self.config.max_tgt_len:
            raise ValueError(f"1 + max_new_tokens = {1 + max_new_tokens} is longer than "
                             f"max_tgt_len={self.config.max_tgt_len}")
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(src, src_key_padding_mask)
            tokens = torch.full((src.shape[0], 1), bos_token_id, dtype=torch.long, device=src.device)
            step = _NextTargetLogits(self, memory, src_key_padding_mask, 1 + max_new_tokens, use_cache)
            return decode_tokens(tokens, max_new_tokens, step, options)
        finally:
            self.train(was_training)

    def save_pretrained(self, directory: Union[str, os.PathLike]) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory``."""
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, os.PathLike], *,
                        device: Union[str, torch.device, None] = None) -> "ReformerEncDec":
        """The model saved by ``save_pretrained`` (eval mode, on ``device``, default CPU)."""
        return load_pretrained(cls, EncDecConfig, directory, device=device)


def _rename_flat_decoder_keys(state_dict: dict, prefix: str, *args: Any) -> None:
    """Load-time hook: map the earlier ``decoder.<i>.*`` keys to ``decoder.blocks.<i>.*``."""
    old = prefix + "decoder."
    for key in [k for k in state_dict if k.startswith(old) and k[len(old):].split(".", 1)[0].isdigit()]:
        state_dict[old + "blocks." + key[len(old):]] = state_dict.pop(key)


class _NextTargetLogits:
    """``tgt (B, T) -> logits (B, V)`` of the next target token for ``ReformerEncDec.generate``:
    one cached step per token, or (``use_cache=False``) a fresh prefill each time; every cache
    of one call shares the first cache's LSH rotations."""

    def __init__(self, model: ReformerEncDec, memory: Tensor, mask: Optional[Tensor], capacity: int,
                 use_cache: bool):
        self.model, self.memory, self.mask = model, memory, mask
        self.capacity, self.use_cache = capacity, use_cache
        self.cache: Optional[ModelCache] = None

    def __call__(self, tgt: Tensor) -> Tensor:
        if self.use_cache and self.cache is not None:
            new = tgt[:, -1:]
        else:
            new = tgt
            self.cache = self.model.new_cache(self.capacity, like=self.cache)
        return self.model.decode(new, self.memory, self.mask, cache=self.cache)[:, -1]
