"""``make_reversible``: turn an existing stack of pre-norm residual blocks into reversible layers.

A pre-norm block computes ``h = x + f(x)``, ``out = h + g(h)`` with ``f = dropout . attention .
norm1`` and ``g = dropout . feed-forward . norm2``. The reversible stack reuses the very same
``f`` and ``g`` modules (same parameters) in the RevNet coupling ``y1 = x1 + f(x2)``,
``y2 = x2 + g(y1)`` over two copies of the input, and returns the mean of the two streams
(followed by the stack's final norm, if it had one). This is a different function of the
weights than the residual stack, so a converted pre-trained model needs fine-tuning; a model
trained from scratch is simply a reversible model. Post-norm blocks
(``LayerNorm(x + f(x))``) normalise the residual stream itself, which the coupling cannot
express: they raise.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

from torch import Tensor, nn

from .reversible import ReversibleSequence
from .transformer import Encoder, EncoderLayer


class _TorchAttentionSublayer(nn.Module):
    """``f`` of a pre-norm ``nn.TransformerEncoderLayer``: ``dropout1(self_attn(norm1(x)))``.

    Takes ``nn.TransformerEncoder``'s keyword names: ``mask``, ``src_key_padding_mask``, ``is_causal``.
    """

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.norm, self.attn, self.dropout = layer.norm1, layer.self_attn, layer.dropout1

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        h = self.norm(x)
        out = self.attn(h, h, h, attn_mask=mask, key_padding_mask=src_key_padding_mask, need_weights=False,
                        is_causal=bool(is_causal))[0]
        return self.dropout(out)


class _TorchFeedForwardSublayer(nn.Module):
    """``g`` of a pre-norm ``nn.TransformerEncoderLayer``: its ``_ff_block(norm2(x))``."""

    def __init__(self, layer: nn.TransformerEncoderLayer):
        super().__init__()
        self.norm, self.linear1, self.linear2 = layer.norm2, layer.linear1, layer.linear2
        self.activation, self.dropout, self.dropout2 = layer.activation, layer.dropout, layer.dropout2

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(self.norm(x))))))


class _AttentionSublayer(nn.Module):
    """``f`` of a pre-norm ``reformer.EncoderLayer``; takes ``key_padding_mask`` and ``causal``."""

    def __init__(self, layer: EncoderLayer):
        super().__init__()
        self.norm, self.attn, self.dropout = layer.res_attn.norm, layer.self_attn, layer.res_attn.dropout

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None, causal: bool = False) -> Tensor:
        return self.dropout(self.attn(self.norm(x), causal=causal, key_padding_mask=key_padding_mask))


class _FeedForwardSublayer(nn.Module):
    """``g`` of a pre-norm ``reformer.EncoderLayer``: ``dropout(ff(norm(x)))``."""

    def __init__(self, layer: EncoderLayer):
        super().__init__()
        self.norm, self.ff, self.dropout = layer.res_ff.norm, layer.ff, layer.res_ff.dropout

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.ff(self.norm(x)))


class ReversibleStack(nn.Module):
    """``(..., d) -> (..., d)``: the blocks as a ``ReversibleSequence``, the mean of its two
    streams, then ``norm``. Keyword arguments of ``forward`` (masks) go to every attention."""

    def __init__(self, blocks: Iterable[tuple[nn.Module, nn.Module]], norm: Optional[nn.Module] = None,
                 reversible: bool = True):
        super().__init__()
        self.layers = ReversibleSequence(blocks, reversible=reversible)
        self.norm = norm if norm is not None else nn.Identity()

    def forward(self, x: Tensor, **attention_kwargs: Any) -> Tensor:
        y1, y2 = self.layers(x, **attention_kwargs).chunk(2, dim=-1)
        return self.norm((y1 + y2) / 2)


def _split(index: int, layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The ``(f, g)`` sub-layers of a supported block, or a clear error."""
    if isinstance(layer, nn.TransformerEncoderLayer):
        if not layer.norm_first:
            raise ValueError(_post_norm_message(index, "nn.TransformerEncoderLayer"))
        return _TorchAttentionSublayer(layer), _TorchFeedForwardSublayer(layer)
    if isinstance(layer, EncoderLayer):
        if not layer.res_attn.norm_first:
            raise ValueError(_post_norm_message(index, "reformer.EncoderLayer"))
        return _AttentionSublayer(layer), _FeedForwardSublayer(layer)
    raise TypeError(
        f"layer {index} is a {type(layer).__name__}; make_reversible supports pre-norm nn.TransformerEncoderLayer "
        "and reformer.EncoderLayer blocks (two residual sub-layers: self-attention and feed-forward). For other "
        "blocks build reformer.ReversibleSequence([(f, g), ...]) from their sub-layers directly."
    )


def _post_norm_message(index: int, kind: str) -> str:
    return (f"layer {index} ({kind}) is post-norm (norm_first=False): LayerNorm(x + f(x)) normalises the residual "
            "stream, which a reversible coupling y1 = x1 + f(x2) cannot express. Only pre-norm blocks "
            "(norm_first=True) can be made reversible.")


def make_reversible(stack: nn.Module, *, reversible: bool = True) -> ReversibleStack:
    """A :class:`ReversibleStack` built from the blocks of ``stack``, sharing their parameters.

    ``stack`` is an ``nn.TransformerEncoder`` or ``reformer.Encoder`` (its final norm is kept),
    or an ``nn.ModuleList``/``nn.Sequential`` of blocks. Blocks must be pre-norm
    ``nn.TransformerEncoderLayer`` (the result takes ``mask``, ``src_key_padding_mask``,
    ``is_causal`` keywords, like ``nn.TransformerEncoder``) or pre-norm ``reformer.EncoderLayer``
    (it takes ``key_padding_mask`` and ``causal``). ``reversible=False`` gives the same network
    with ordinary autograd. Raises ValueError for post-norm blocks, TypeError for other blocks.
    """
    if isinstance(stack, (nn.TransformerEncoder, Encoder)):
        layers, norm = list(stack.layers), stack.norm
    elif isinstance(stack, (nn.ModuleList, nn.Sequential)):
        layers, norm = list(stack), None
    else:
        raise TypeError(f"stack must be nn.TransformerEncoder, reformer.Encoder, nn.ModuleList or nn.Sequential, "
                        f"got {type(stack).__name__}")
    if not layers:
        raise ValueError("stack has no layers")
    return ReversibleStack([_split(i, layer) for i, layer in enumerate(layers)], norm, reversible)
