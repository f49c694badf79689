"""``ReformerLM``: a language model of reversible (attention, chunked feed-forward) blocks.

    tokens (B, N) -> embedding + positions (B, N, d) -> ReversibleSequence of `depth` blocks
    [f = PreNorm(attention), g = PreNorm(feed-forward)] over two streams -> concat (B, N, 2d)
    -> LayerNorm(2d) -> Linear(2d, vocab) -> logits (B, N, vocab)

As in trax's ReformerLM, the embedded input is duplicated into the two reversible streams and
their final values are concatenated before the output norm and head.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._validation import check_key_padding_mask, check_non_negative, check_positive, check_tokens
from .attention import MultiHeadAttention
from .chunked_loss import chunked_cross_entropy
from .config import ReformerConfig
from .feedforward import ChunkedFeedForward, FeedForward
from .lsh_attention import LSHSelfAttention
from .positional import AxialPositionalEncoding, SinusoidalPositionalEncoding
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
    config; LSH gets the eval-mode rotation seed ``config.seed + layer`` (None without a seed)."""
    if config.attention == "lsh":
        seed = None if config.seed is None else config.seed + layer
        attn = LSHSelfAttention(config.d_model, config.n_heads, bucket_size=config.bucket_size,
                                n_hashes=config.n_hashes, causal=config.causal, dropout=config.dropout, seed=seed)
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

    Causal LSH caveat (inherent to the Reformer): a future position's VALUE never reaches a
    past position's output, but future positions' hashes can change which chunk a past position
    falls into after sorting, and so which earlier positions it attends to. Logits for a prefix
    can therefore depend on the tokens after it, and ``generate`` (one forward per new token
    over the growing context) can differ from a single full-sequence forward.
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

    def hidden(self, tokens: Tensor, *, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """tokens ``(B, N)`` ids, N <= max_seq_len -> normalised features ``(B, N, 2 * d_model)``.

        key_padding_mask: ``(B, N)`` bool, True = padding (ignored as attention keys).
        """
        check_tokens("tokens", tokens, self.config.vocab_size, self.config.max_seq_len)
        mask = check_key_padding_mask(key_padding_mask, tokens.shape[0], tokens.shape[1], tokens.device)
        x = self.emb_dropout(self.pos_enc(self.token_emb(tokens.long())))  # (B, N, d)
        kwargs = {} if mask is None else {"key_padding_mask": mask}
        return self.norm(self.layers(x, **kwargs))  # (B, N, 2d)

    def forward(self, tokens: Tensor, *, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """tokens ``(B, N)`` -> logits ``(B, N, vocab_size)``; mask as in ``hidden``."""
        return self.head(self.hidden(tokens, key_padding_mask=key_padding_mask))

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy of ``tokens`` ``(B, N)``, N >= 2: position i predicts i + 1.

        With ``ff_chunks > 1`` the head and the loss run over that many slices of the positions
        (``chunked_cross_entropy``), so the ``(B, N, vocab)`` logits never exist whole.
        """
        self._check_causal("loss")
        check_tokens("tokens", tokens, self.config.vocab_size, self.config.max_seq_len)
        if tokens.shape[1] < 2:
            raise ValueError(f"tokens must have at least 2 positions for a next-token loss, got {tokens.shape[1]}")
        features = self.hidden(tokens)[:, :-1].reshape(-1, 2 * self.config.d_model)  # (B * (N-1), 2d)
        targets = tokens[:, 1:].reshape(-1).long()
        if self.config.ff_chunks > 1:
            return chunked_cross_entropy(features, self.head.weight, self.head.bias, targets, self.config.ff_chunks)
        return F.cross_entropy(self.head(features), targets)

    @torch.no_grad()
    def generate(self, prompt: Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> Tensor:
        """Sample ``max_new_tokens`` tokens after ``prompt`` ``(B, Np)``; returns ``(B, Np + max_new_tokens)``.

        Each step samples from ``softmax(logits / temperature)`` restricted to the ``top_k`` most
        likely ids (all ids when None), with ``generator`` (a ``torch.Generator`` on the model's
        device) or the global RNG. The model attends to at most the last ``max_seq_len`` tokens.
        Runs in eval mode (no dropout) and restores the previous mode afterwards. Reproducible
        with equally seeded generators for attention="full", and for attention="lsh" when
        ``config.seed`` is set (otherwise the LSH rotations come from the global RNG).
        """
        self._check_causal("generate")
        check_tokens("prompt", prompt, self.config.vocab_size, self.config.max_seq_len)
        _check_sampling(max_new_tokens, temperature, top_k, generator)
        was_training = self.training
        self.eval()
        try:
            tokens = prompt.long()
            for _ in range(max_new_tokens):
                context = tokens[:, -self.config.max_seq_len:]
                logits = self.head(self.hidden(context)[:, -1]).float() / temperature  # (B, V)
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_token = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
                tokens = torch.cat([tokens, next_token], dim=1)
        finally:
            self.train(was_training)
        return tokens

    def _check_causal(self, what: str) -> None:
        if not self.config.causal:
            raise ValueError(f"{what} needs a causal model (config.causal=True): otherwise position i sees its target")


def _check_sampling(max_new_tokens: int, temperature: float, top_k: Optional[int],
                    generator: Optional[torch.Generator]) -> None:
    check_non_negative("max_new_tokens", max_new_tokens)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None:
        check_positive("top_k", top_k)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
