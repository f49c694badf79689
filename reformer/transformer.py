"""The baseline encoder-decoder Transformer of the original Transformer description
(Vaswani et al. 2017, "Attention Is All You Need").

Each sub-layer is wrapped in residual + LayerNorm: post-norm ``LayerNorm(x + Sublayer(x))`` as
in that description, or pre-norm ``x + Sublayer(LayerNorm(x))`` with ``norm_first=True``.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ._validation import check_dropout, check_heads, check_non_negative, check_positive, check_tokens
from .attention import MultiHeadAttention
from .feedforward import FeedForward
from .positional import SinusoidalPositionalEncoding, TokenEmbedding


class _Residual(nn.Module):
    """Residual + LayerNorm around one sub-layer, post-norm or pre-norm."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """Self-attention then FFN, ``(B, N, d_model) -> (B, N, d_model)``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, activation=activation, dropout=dropout)
        self.res_attn = _Residual(d_model, dropout, norm_first)
        self.res_ff = _Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, *, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        """key_padding_mask: ``(B, N)`` bool, True = padding."""
        x = self.res_attn(x, lambda h: self.self_attn(h, causal=causal, key_padding_mask=key_padding_mask))
        return self.res_ff(x, self.ff)


class DecoderLayer(nn.Module):
    """Masked (causal) self-attention, cross-attention to the encoder memory, then FFN."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout=dropout)
        self.ff = FeedForward(d_model, d_ff, activation=activation, dropout=dropout)
        self.res_self = _Residual(d_model, dropout, norm_first)
        self.res_cross = _Residual(d_model, dropout, norm_first)
        self.res_ff = _Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, memory: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """x: ``(B, Nt, d_model)`` target; memory: ``(B, Ns, d_model)``; masks True = padding."""
        x = self.res_self(x, lambda h: self.self_attn(h, causal=True, key_padding_mask=key_padding_mask))
        x = self.res_cross(x, lambda h: self.cross_attn(h, memory, key_padding_mask=memory_key_padding_mask))
        return self.res_ff(x, self.ff)


class Encoder(nn.Module):
    """A stack of encoder layers (plus a final LayerNorm when pre-norm)."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, n_heads, d_ff, dropout, activation, norm_first) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()

    def forward(self, x: Tensor, *, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, key_padding_mask=key_padding_mask)
        return self.norm(x)


class Decoder(nn.Module):
    """A stack of decoder layers (plus a final LayerNorm when pre-norm)."""

    def __init__(self, n_layers: int, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1,
                 activation: str = "relu", norm_first: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, n_heads, d_ff, dropout, activation, norm_first) for _ in range(n_layers)
        )
        self.norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()

    def forward(self, x: Tensor, memory: Tensor, *, key_padding_mask: Optional[Tensor] = None,
                memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, memory, key_padding_mask=key_padding_mask, memory_key_padding_mask=memory_key_padding_mask)
        return self.norm(x)


class Transformer(nn.Module):
    """Encoder-decoder Transformer: token embedding * sqrt(d_model) + sinusoidal positions,
    encoder, decoder (causal self-attention, cross-attention), linear ``output_projection`` to
    ``tgt_vocab``.

    ``n_encoder_layers``/``n_decoder_layers`` are ints >= 0 (0: the stack is the identity, plus
    the final LayerNorm when ``norm_first``). State dicts saved before the output layer was
    renamed (keys ``generator.weight``/``generator.bias``) still load.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, d_model: int = 512, n_heads: int = 8,
                 n_encoder_layers: int = 6, n_decoder_layers: int = 6, d_ff: int = 2048,
                 dropout: float = 0.1, max_len: int = 5000, norm_first: bool = False,
                 activation: str = "relu"):
        super().__init__()
        check_dropout(dropout)
        check_heads(d_model, n_heads)
        check_positive("d_ff", d_ff)
        check_non_negative("n_encoder_layers", n_encoder_layers)
        check_non_negative("n_decoder_layers", n_decoder_layers)
        if not isinstance(norm_first, bool):
            raise TypeError(f"norm_first must be a bool, got {norm_first!r}")
        self.max_len = check_positive("max_len", max_len)
        self.src_embed = TokenEmbedding(src_vocab, d_model)
        self.tgt_embed = TokenEmbedding(tgt_vocab, d_model)
        self.positions = SinusoidalPositionalEncoding(d_model, max_len)
        self.embed_dropout = nn.Dropout(dropout)
        self.encoder = Encoder(n_encoder_layers, d_model, n_heads, d_ff, dropout, activation, norm_first)
        self.decoder = Decoder(n_decoder_layers, d_model, n_heads, d_ff, dropout, activation, norm_first)
        self.output_projection = nn.Linear(d_model, tgt_vocab)

    @property
    def generator(self) -> nn.Linear:
        """Deprecated name of :attr:`output_projection`."""
        warnings.warn("Transformer.generator was renamed output_projection", DeprecationWarning, stacklevel=2)
        return self.output_projection

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # state dicts from before the rename: generator.* -> output_projection.*
        for name in ("weight", "bias"):
            old, new = f"{prefix}generator.{name}", f"{prefix}output_projection.{name}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, src: Tensor, *, src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src: ``(B, Ns)`` ids -> memory ``(B, Ns, d_model)``."""
        check_tokens("src", src, self.src_embed.vocab_size, self.max_len)
        x = self.embed_dropout(self.positions(self.src_embed(src)))
        return self.encoder(x, key_padding_mask=src_key_padding_mask)

    def decode(self, tgt: Tensor, memory: Tensor, *, tgt_key_padding_mask: Optional[Tensor] = None,
               memory_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """tgt: ``(B, Nt)`` ids, memory: ``(B, Ns, d_model)`` -> logits ``(B, Nt, tgt_vocab)``."""
        check_tokens("tgt", tgt, self.tgt_embed.vocab_size, self.max_len)
        y = self.embed_dropout(self.positions(self.tgt_embed(tgt)))
        y = self.decoder(y, memory, key_padding_mask=tgt_key_padding_mask,
                         memory_key_padding_mask=memory_key_padding_mask)
        return self.output_projection(y)

    def forward(self, src: Tensor, tgt: Tensor, *, src_key_padding_mask: Optional[Tensor] = None,
                tgt_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """src ``(B, Ns)``, tgt ``(B, Nt)`` ids; masks ``(B, Ns)``/``(B, Nt)`` bool, True = padding.
        Returns logits ``(B, Nt, tgt_vocab)``; position t predicts tgt[t + 1]."""
        memory = self.encode(src, src_key_padding_mask=src_key_padding_mask)
        return self.decode(tgt, memory, tgt_key_padding_mask=tgt_key_padding_mask,
                           memory_key_padding_mask=src_key_padding_mask)

    @torch.no_grad()
    def generate(self, src: Tensor, max_new_tokens: int, *, bos_id: int, eos_id: Optional[int] = None,
                 src_key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """Greedy decoding in eval mode (the previous mode is restored): returns ``(B, 1 + T)`` ids
        starting with ``bos_id``, T <= max_new_tokens. Sequences that produced ``eos_id`` keep
        emitting it; decoding stops early once every sequence has.

        ``max_new_tokens`` is an int >= 0; with 0 the result is the ``(B, 1)`` column of
        ``bos_id`` (the decoder's prompt, as ``ReformerLM.generate(prompt, 0)`` returns its
        prompt). ``bos_id`` and ``eos_id`` are ints (``TypeError`` otherwise) in ``[0, tgt_vocab)``.
        """
        check_non_negative("max_new_tokens", max_new_tokens)
        if 1 + max_new_tokens > self.max_len:
            raise ValueError(f"1 + max_new_tokens = {1 + max_new_tokens} is longer than max_len={self.max_len}")
        vocab = self.tgt_embed.vocab_size
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is None and name == "eos_id":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be an int token id, got {value!r}")
            if not 0 <= value < vocab:
                raise ValueError(f"{name} must be in [0, {vocab}), got {value}")
        check_tokens("src", src, self.src_embed.vocab_size, self.max_len)
        out = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        if max_new_tokens == 0:
            return out
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(src, src_key_padding_mask=src_key_padding_mask)
            done = torch.zeros(src.shape[0], dtype=torch.bool, device=src.device)
            for _ in range(max_new_tokens):
                nxt = self.decode(out, memory, memory_key_padding_mask=src_key_padding_mask)[:, -1].argmax(-1)
                if eos_id is not None:
                    nxt = nxt.masked_fill(done, eos_id)
                    done |= nxt == eos_id
                out = torch.cat([out, nxt[:, None]], dim=1)
                if eos_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return out
