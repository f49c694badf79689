"""Model surgery: put the Reformer's layers into an existing ``nn.Module``.

* :func:`swap_attention` replaces self-attention ``nn.MultiheadAttention`` modules with
  ``LSHMultiheadAttention`` (same call signature, weights kept) and leaves cross-attention alone.
* :func:`swap_positional` replaces positional encodings with learned axial positions:
  ``AxialPositionalEncoding`` where the old module was *added* to ``(B, N, d_model)`` inputs,
  :class:`AxialPositionIdEmbedding` where it was an ``nn.Embedding`` *indexed by position ids*.
* :func:`make_reversible` (in ``reformer.swap_reversible``) turns a stack of pre-norm residual
  blocks into a ``ReversibleSequence``.

Each returns or prints a :class:`SwapReport` naming every module it touched or left alone, and why.

Hugging Face ``transformers`` models remember what was swapped in ``config.reformer_swap`` (saved
in ``config.json`` by ``save_pretrained``); :func:`load_swapped` loads such a checkpoint back
exactly (see ``docs/huggingface.md``).
"""
from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from torch import Tensor, nn

from ._validation import check_seed
from .kernels.checks import check_positive_int
from .kernels.hashing import check_n_buckets
from .lsh_attention import LSHMultiheadAttention
from .positional import AxialPositionalEncoding, SinusoidalPositionalEncoding
from .swap_hf import is_hf_attention, is_hf_model, load_swapped, record_swap, swap_hf_attention

__all__ = ["swap_attention", "swap_positional", "load_swapped", "SwapReport", "SwapEntry", "AxialPositionIdEmbedding",
           "SWAPPABLE_ATTENTIONS"]

# What swap_attention(attention=...) can put in place of a model's attention. Not the same list as
# reformer.config.ATTENTIONS, the attention kinds a ReformerLM / ReformerEncDec is built with.
SWAPPABLE_ATTENTIONS = ("lsh",)
CAUSAL_MODES = ("bucket", "chunk")
POSITIONAL_EMBEDDING_NAMES = ("wpe", "position_embeddings", "pos_emb", "pos_embedding", "positional_embedding",
                              "embed_positions")


@dataclass(frozen=True)
class SwapEntry:
    """One module considered: its qualified name, ``action`` (``"swapped"``, ``"skipped"`` or
    ``"changed"``: a setting adjusted) and the details."""

    name: str
    action: str
    detail: str


@dataclass
class SwapReport:
    """Modules swapped and skipped, in model order; ``print(report)`` shows a table."""

    title: str
    entries: list[SwapEntry] = field(default_factory=list)

    def add(self, name: str, action: str, detail: str) -> None:
        self.entries.append(SwapEntry(name, action, detail))

    @property
    def swapped(self) -> list[str]:
        """Qualified names of the replaced modules."""
        return [e.name for e in self.entries if e.action == "swapped"]

    @property
    def skipped(self) -> dict[str, str]:
        """Qualified name -> why it was left alone."""
        return {e.name: e.detail for e in self.entries if e.action == "skipped"}

    def __str__(self) -> str:
        lines = [f"{self.title}: {len(self.swapped)} swapped, {len(self.skipped)} skipped"]
        width = max((len(e.name) for e in self.entries), default=0)
        lines += [f"  {e.action:<8} {e.name:<{width}}  {e.detail}" for e in self.entries]
        return "\n".join(lines)


def _named_children_of_type(model: nn.Module, kind: Union[type, tuple[type, ...]]
                            ) -> Iterator[tuple[str, nn.Module, str, nn.Module]]:
    """``(qualified name, parent, attribute, module)`` for every submodule of type ``kind``."""
    for parent_name, parent in list(model.named_modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, kind):
                yield (f"{parent_name}.{attr}" if parent_name else attr), parent, attr, child


def _matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    return patterns is not None and any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _patterns(arg: str, value: object) -> Optional[tuple[str, ...]]:
    """``None``, one glob string, or a sequence of glob strings -> a tuple of globs (or None)."""
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in value):
        return tuple(value)
    raise TypeError(f"{arg} must be a glob string or a sequence of glob strings, got {value!r}")


def _cross_attention_reason(parent: nn.Module, attr: str, mha: nn.MultiheadAttention) -> Optional[str]:
    """Why ``parent.attr`` is cross-attention, or None when it is taken as self-attention."""
    if isinstance(parent, nn.TransformerDecoderLayer) and attr == "multihead_attn":
        return "cross-attention (TransformerDecoderLayer.multihead_attn attends to the memory)"
    if not mha._qkv_same_embed_dim:
        return f"cross-attention (kdim={mha.kdim}, vdim={mha.vdim} differ from embed_dim={mha.embed_dim})"
    if "cross" in attr.lower():
        return f"cross-attention (attribute name {attr!r} contains 'cross')"
    return None


def swap_attention(
    model: nn.Module,
    *,
    attention: str = "lsh",
    bucket_size: int = 64,
    n_hashes: int = 4,
    seed: Optional[int] = 0,
    include: Union[str, Sequence[str], None] = None,
    exclude: Union[str, Sequence[str], None] = None,
    n_buckets: Union[int, tuple[int, ...], None] = None,
    causal_mode: str = "chunk",
) -> SwapReport:
    """Replace, in place, each self-attention ``nn.MultiheadAttention`` of ``model`` by
    ``LSHMultiheadAttention.from_torch(mha, bucket_size=..., n_hashes=..., seed=...)``.

    The new module takes the same arguments and returns the same ``(output, None)`` as the
    old one (``need_weights=False``); it is shared-QK attention, so the old query projection
    becomes the shared query/key projection, the value and output projections are kept and the
    key projection is dropped. ``batch_first``, device and dtype are kept.

    ``n_buckets`` and ``causal_mode`` are ``lsh_attention``'s (``None``: the automatic bucket
    rule; ``"chunk"``, the default: the chunked look-back, exact causal attention when
    ``bucket_size >= N``; ``"bucket"``: causal attention within a query's own bucket, no output
    depends on a later token).

    Seeds: the ``k``-th swapped module (in ``model.named_modules()`` order) gets ``seed + k``,
    which fixes its LSH rotations in eval mode, so eval outputs are reproducible by default
    (``seed=0``). Training forwards always draw fresh rotations. ``seed=None`` gives fresh
    rotations on every eval call too.

    Which modules are self-attention (the rule, applied in this order):

    1. names (as in ``model.named_modules()``) matching ``exclude`` (a glob string or a sequence
       of globs) are skipped; with ``include`` given, only names matching it are considered;
    2. ``nn.TransformerDecoderLayer.multihead_attn`` is cross-attention: skipped;
    3. a module with ``kdim``/``vdim`` different from ``embed_dim`` is cross-attention: skipped;
    4. a module whose attribute name contains ``"cross"`` is cross-attention: skipped;
    5. every other ``nn.MultiheadAttention`` (e.g. ``TransformerEncoderLayer.self_attn``,
       ``TransformerDecoderLayer.self_attn``, a user block's ``attn``) is self-attention: swapped.

    A module misjudged as self-attention fails loudly: ``LSHMultiheadAttention`` raises when
    called with ``key`` different from ``query``. Use ``exclude`` (or ``include``) to steer.
    Swapped ``nn.TransformerEncoder`` stacks get their eval-mode nested-tensor path turned off
    (it would call torch's fused kernel instead of the new module).

    Hugging Face ``transformers`` models (GPT-2, BERT, ...) have no ``nn.MultiheadAttention``:
    their self-attention modules are switched to LSH through ``transformers``' attention
    interface instead, cross-attention keeps full attention (see ``reformer.swap_hf``). The
    settings are recorded in ``model.config.reformer_swap`` so that ``save_pretrained`` followed
    by :func:`load_swapped` gives the same model back.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``include``/``exclude`` are not globs;
            ``seed``, ``bucket_size`` or ``n_hashes`` are not ints.
        ValueError: ``attention`` not in ``SWAPPABLE_ATTENTIONS`` (only ``"lsh"``); non-positive
            ``bucket_size``/``n_hashes``; nothing to swap.

    Returns:
        a :class:`SwapReport` listing the swapped and the skipped modules with reasons.
    """
    if attention not in SWAPPABLE_ATTENTIONS:
        raise ValueError(f"attention must be one of {SWAPPABLE_ATTENTIONS}, got {attention!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    include, exclude = _patterns("include", include), _patterns("exclude", exclude)
    _check_int("bucket_size", bucket_size)
    _check_int("n_hashes", n_hashes)
    check_positive_int("bucket_size", bucket_size)
    check_positive_int("n_hashes", n_hashes)
    check_seed(seed)
    lsh = dict(bucket_size=bucket_size, n_hashes=n_hashes, n_buckets=n_buckets, causal_mode=causal_mode)
    if n_buckets is not None:
        lsh["n_buckets"] = check_n_buckets(n_buckets)
    if not isinstance(causal_mode, str):
        raise TypeError(f"causal_mode must be a string, got {causal_mode!r}")
    if causal_mode not in CAUSAL_MODES:
        raise ValueError(f"causal_mode must be one of {CAUSAL_MODES}, got {causal_mode!r}")

    def selected(name: str) -> bool:
        return not _matches(name, exclude) and (include is None or _matches(name, include))

    if include is not None:
        candidates = [name for name, module in model.named_modules()
                      if isinstance(module, nn.MultiheadAttention) or (is_hf_model(model) and is_hf_attention(module))]
        if candidates and not any(_matches(name, include) for name in candidates):
            raise ValueError(f"include={list(include)} matches no attention module; the globs match qualified "
                             f"names such as {', '.join(map(repr, candidates[:3]))} (e.g. '*self_attn')")
    seeds = _SeedCounter(seed)
    report = SwapReport("swap_attention")
    _swap_torch_attention(model, report, lsh=lsh, seeds=seeds, selected=selected)
    if is_hf_model(model):
        swap_hf_attention(model, report, lsh=lsh, seeds=seeds, selected=selected)
    if not report.entries:
        raise ValueError(f"{type(model).__name__} has no torch.nn.MultiheadAttention "
                         "(nor Hugging Face attention) to swap")
    return report


def _check_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")


class _SeedCounter:
    """``next()`` gives ``seed + k`` for the ``k``-th call (None when ``seed`` is None)."""

    def __init__(self, seed: Optional[int]):
        self.seed, self.count = seed, 0

    def next(self) -> Optional[int]:
        if self.seed is None:
            return None
        self.count += 1
        return self.seed + self.count - 1


def _swap_torch_attention(model: nn.Module, report: SwapReport, *, lsh: dict[str, Any],
                          seeds: _SeedCounter, selected: Callable[[str], bool]) -> None:
    """The ``nn.MultiheadAttention`` part of :func:`swap_attention`."""
    for name, parent, attr, mha in _named_children_of_type(model, nn.MultiheadAttention):
        if not selected(name):
            report.add(name, "skipped", "excluded by include/exclude")
            continue
        reason = _cross_attention_reason(parent, attr, mha)
        if reason is not None:
            report.add(name, "skipped", reason)
            continue
        seed = seeds.next()
        new = LSHMultiheadAttention.from_torch(mha, seed=seed, **lsh)
        new.train(mha.training)
        setattr(parent, attr, new)
        report.add(name, "swapped", f"nn.MultiheadAttention -> LSHMultiheadAttention (bucket_size={lsh['bucket_size']}, "
                                    f"n_hashes={lsh['n_hashes']}, seed={seed}, shared-QK from the query projection)")
    for name, encoder in model.named_modules():
        if not isinstance(encoder, nn.TransformerEncoder):
            continue
        if isinstance(encoder.layers[0].self_attn, nn.MultiheadAttention):
            continue
        if getattr(encoder, "use_nested_tensor", False):
            # its eval-mode nested-tensor path would call the fused kernel, not the swapped attention
            encoder.use_nested_tensor = False
            report.add(name, "changed", "nn.TransformerEncoder nested-tensor fast path disabled")


class AxialPositionIdEmbedding(nn.Module):
    """Axial positions behind ``nn.Embedding``'s interface: position ids ``(...)`` -> ``(..., d_model)``.

    The drop-in replacement for a learned positional table that a model looks up by *position
    ids* (GPT-2's ``wpe``, BERT's ``position_embeddings``): ``forward(position_ids)`` returns the
    rows, which the model then adds itself; ids must be below ``prod(axial_shape)``. Its sibling
    ``reformer.AxialPositionalEncoding`` (held here as ``self.axial``, so the parameters are
    ``axial.weights.<axis>``) takes the *embeddings* ``(B, N, d_model)`` and returns them with the
    positions added. (Called ``AxialPositionEmbedding`` before; that name still works but warns.)
    """

    def __init__(self, d_model: int, axial_shape: Sequence[int], axial_dims: Optional[Sequence[int]] = None):
        super().__init__()
        self.axial = AxialPositionalEncoding(d_model, axial_shape, axial_dims)

    def forward(self, position_ids: Tensor) -> Tensor:
        n = int(position_ids.max()) + 1 if position_ids.numel() else 1
        return self.axial.encoding(n)[position_ids]


def _positional_replacement(name: str, module: nn.Module, axial_shape: Sequence[int],
                            axial_dims: Optional[Sequence[int]]) -> tuple[nn.Module, str]:
    """The axial module for a sinusoidal encoding or a positional ``nn.Embedding``, and a note."""
    size = math.prod(axial_shape)
    if isinstance(module, SinusoidalPositionalEncoding):
        new = AxialPositionalEncoding(module.d_model, axial_shape, axial_dims)
        old_len, kind = module.max_len, "Sinusoidal"
    else:
        new = AxialPositionIdEmbedding(module.embedding_dim, axial_shape, axial_dims)
        old_len, kind = module.num_embeddings, "nn.Embedding"
        if size < old_len:
            raise ValueError(f"{name}: axial_shape {tuple(axial_shape)} covers {size} positions, fewer than "
                             f"the {old_len} of the embedding table it replaces")
    note = f"{kind} (max {old_len}) -> axial {tuple(axial_shape)} (max {size}; new parameters, randomly initialised)"
    return new, note


def swap_positional(
    model: nn.Module,
    axial_shape: Sequence[int],
    *,
    axial_dims: Optional[Sequence[int]] = None,
    names: Union[str, Sequence[str], None] = None,
) -> SwapReport:
    """Replace, in place, positional encodings of ``model`` by learned axial positions.

    Targets: every ``SinusoidalPositionalEncoding`` (replaced by ``AxialPositionalEncoding``,
    which is also added to ``(B, N, d_model)`` inputs) and every ``nn.Embedding`` whose
    attribute name is one of ``POSITIONAL_EMBEDDING_NAMES`` (replaced by
    :class:`AxialPositionIdEmbedding`, which is also indexed by position ids). ``names`` (globs on
    qualified names; one string or a sequence) overrides that choice. The axial tables are new
    parameters: fine-tune after. On a Hugging Face model the swap is recorded in
    ``model.config.reformer_swap`` (see :func:`load_swapped`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = _patterns("names", names)
    if isinstance(axial_shape, (str, bytes)) or not isinstance(axial_shape, Sequence):
        raise TypeError(f"axial_shape must be a sequence of ints, got {axial_shape!r}")
    report = SwapReport("swap_positional")
    for name, parent, attr, module in _named_children_of_type(model, (SinusoidalPositionalEncoding, nn.Embedding)):
        chosen = _matches(name, names) if names is not None else (
            isinstance(module, SinusoidalPositionalEncoding) or attr in POSITIONAL_EMBEDDING_NAMES)
        if not chosen:
            report.add(name, "skipped", f"{type(module).__name__} not taken as a positional table")
            continue
        new, note = _positional_replacement(name, module, axial_shape, axial_dims)
        ref = next(module.parameters(), None) if isinstance(module, nn.Embedding) else module.pe
        setattr(parent, attr, new.to(device=ref.device, dtype=ref.dtype))
        report.add(name, "swapped", note)
        if is_hf_model(model):
            record_swap(model, "positional", name, {"axial_shape": [int(n) for n in axial_shape],
                                                    "axial_dims": None if axial_dims is None else
                                                    [int(d) for d in axial_dims]})
    if not report.swapped:
        raise ValueError(f"no positional encoding found to swap in {type(model).__name__}\n{report}")
    return report


_RENAMED = {"AxialPositionEmbedding": "AxialPositionIdEmbedding", "ATTENTIONS": "SWAPPABLE_ATTENTIONS"}


def __getattr__(name: str) -> Any:
    """The earlier names of :class:`AxialPositionIdEmbedding` and ``SWAPPABLE_ATTENTIONS``: still
    importable, with a ``DeprecationWarning``."""
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"reformer.swap.{name} is deprecated, use reformer.swap.{new}", DeprecationWarning,
                      stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
