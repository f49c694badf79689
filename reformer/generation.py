"""Cached incremental decoding and token sampling, shared by ``ReformerLM`` and ``ReformerEncDec``.

Caches. A decoder run keeps one cache per attention layer:

* :class:`KVCache` (full attention): the keys and values ``(B, H, L, D)`` of every position seen
  so far; a new token's query attends to all of them. As a cross-attention cache it holds the
  encoder output's keys and values, computed once.
* :class:`LSHCache` (shared-QK LSH attention, ``causal_mode="bucket"``): the shared query/keys
  and values ``(B, H, L, D)``, every position's bucket in every hash round ``(B, H, R, L)`` and
  the layer's rotations, fixed for the whole run. In ``"bucket"`` mode a query attends, per
  round, to the most recent ``bucket_size`` positions of its own bucket up to and including
  itself (docs/lsh.md), so a new token's keys depend on earlier positions only: per round, the
  cache's bucket ids are compared with the new token's bucket and the last ``bucket_size - 1``
  matches by position are its keys (:func:`lsh_decode_attention`). One new token costs
  ``O(n_hashes * bucket_size * D)`` attention per layer plus that vectorised scan.

Reversible layers need no stored activations at inference: the caches hold only what attention
needs. Buffers are allocated once, with the capacity given when the cache is made.

Sampling. :func:`sample_next` turns the last position's logits into the next token: greedy
(``do_sample=False`` or ``temperature=0``) or a draw from ``softmax(logits / temperature)``
restricted to the ``top_k`` most likely ids and then to the smallest set whose probability
reaches ``top_p`` (nucleus). The scaled logits are computed in float64 after subtracting the row
maximum, so a tiny positive temperature (even 1e-300) gives an exact greedy-like distribution
instead of ``inf``/``NaN``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor

NBuckets = Union[int, tuple[int, ...]]


class _Buffers:
    """Preallocated per-position buffers ``(..., capacity, ...)`` filled left to right."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.length = 0
        self._data: dict[str, Tensor] = {}

    def _write(self, dim: dict[str, int], **new: Tensor) -> None:
        """Append ``new[name]`` along its dim ``dim[name]`` (all of equal length T)."""
        t = next(iter(new.values())).shape[dim[next(iter(new))]]
        if self.length + t > self.capacity:
            raise ValueError(f"the cache holds {self.length} of {self.capacity} positions and cannot take {t} more; "
                             f"make a cache with a larger capacity")
        for name, x in new.items():
            d = dim[name]
            if name not in self._data:
                shape = list(x.shape)
                shape[d] = self.capacity
                self._data[name] = x.new_empty(shape)
            self._data[name].narrow(d, self.length, t).copy_(x)
        self.length += t

    def _read(self, name: str, dim: int) -> Tensor:
        return self._data[name].narrow(dim, 0, self.length)


class KVCache(_Buffers):
    """Keys and values ``(B, H, L, D)`` of a full-attention layer.

    Self-attention appends each call's keys and values; a cross-attention cache is filled once
    (``static``) with the encoder output's keys and values and then only read.
    """

    def __init__(self, capacity: int, static: bool = False):
        super().__init__(capacity)
        self.static = static

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append ``k, v (B, H, T, D)``; returns all cached keys and values ``(B, H, L, D)``.
        A static cache takes one call (any length: ``capacity`` bounds only appended caches)."""
        if self.static:
            if self.length:
                raise ValueError("a static (cross-attention) cache is filled once")
            self._data, self.length = {"k": k, "v": v}, k.shape[2]
        else:
            self._write({"k": 2, "v": 2}, k=k, v=v)
        return self.keys, self.values

    @property
    def keys(self) -> Tensor:
        return self._read("k", 2)

    @property
    def values(self) -> Tensor:
        return self._read("v", 2)


class LSHCache(_Buffers):
    """Shared query/keys ``qk``, values ``v`` ``(B, H, L, D)`` and buckets ``(B, H, R, L)`` of an
    LSH layer, with the layer's ``rotations`` and ``n_buckets`` (fixed for the whole run)."""

    def __init__(self, capacity: int, rotations: Tensor, n_buckets: NBuckets):
        super().__init__(capacity)
        self.rotations, self.n_buckets = rotations, n_buckets

    def append(self, qk: Tensor, v: Tensor, buckets: Tensor) -> None:
        """Append ``qk, v (B, H, T, D)`` and their ``buckets (B, H, R, T)``."""
        self._write({"qk": 2, "v": 2, "buckets": 3}, qk=qk, v=v, buckets=buckets)

    @property
    def qk(self) -> Tensor:
        return self._read("qk", 2)

    @property
    def v(self) -> Tensor:
        return self._read("v", 2)

    @property
    def buckets(self) -> Tensor:
        return self._read("buckets", 3)

    def select(self, name: str, positions: Tensor) -> Tensor:
        """Rows of ``qk`` or ``v`` at ``positions (B, H, M)`` (each in ``[0, length)``): ``(B, H, M, D)``.
        One ``index_select`` on the flat buffer (several times faster than ``gather`` on CPU)."""
        data = self._data[name]  # (B, H, capacity, D), contiguous
        b, h, capacity, d = data.shape
        offsets = torch.arange(b * h, device=positions.device).view(b, h, 1) * capacity
        return data.view(-1, d).index_select(0, (positions + offsets).reshape(-1)).view(*positions.shape, d)


LayerCache = Union[KVCache, LSHCache]


class ModelCache:
    """The caches of a whole decoder: one per self-attention layer (``layers``) and, for an
    encoder-decoder, one static cross-attention cache per layer (``cross``). ``length`` is the
    number of positions cached, ``capacity`` the most it can hold."""

    def __init__(self, layers: list[LayerCache], cross: Optional[list[KVCache]] = None):
        if not layers:
            raise ValueError("a ModelCache needs at least one layer cache")
        self.layers, self.cross = layers, cross

    @property
    def length(self) -> int:
        return self.layers[0].length

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity


def lsh_decode_attention(qk: Tensor, v: Tensor, buckets: Tensor, cache: LSHCache, *, bucket_size: int) -> Tensor:
    """Causal ``"bucket"``-mode LSH attention of ONE new position against the cached ones.

    qk, v: ``(B, H, 1, D)`` of the new position; buckets: its ``(B, H, R, 1)`` bucket per round;
    cache: the earlier positions (the new one is appended here). Per round r the keys are the
    last ``bucket_size - 1`` cached positions whose round-r bucket equals the new position's;
    the rounds' key sets are concatenated WITH multiplicity (a key found in k rounds counts k
    times) and attended by one softmax of ``q . k / sqrt(D)`` with keys normalised to unit norm
    (``max(norm, 1e-6)``). A position with no such key in any round outputs its own value
    (docs/lsh.md, the self rule). Returns ``(B, H, 1, D)`` in qk's dtype.
    """
    d = qk.shape[-1]
    t = cache.length
    compute = torch.float32 if qk.dtype in (torch.float16, torch.bfloat16) else qk.dtype
    k_per_round = min(bucket_size - 1, t)
    if k_per_round == 0:
        cache.append(qk, v, buckets)
        return v.clone()
    position = torch.arange(t, device=qk.device)
    match = torch.where(cache.buckets == buckets, position, -1)  # (B, H, R, t): matching positions
    found = match.topk(k_per_round, dim=-1, sorted=False).values.flatten(2)  # (B, H, R*k), -1 = none
    index = found.clamp_min(0)
    keys = cache.select("qk", index).to(compute)  # (B, H, R*k, D)
    keys = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    logits = torch.matmul(qk.to(compute), keys.transpose(-1, -2)).mul_(d**-0.5)  # (B, H, 1, R*k)
    missing = (found < 0).unsqueeze(2)
    weights = torch.softmax(logits.masked_fill_(missing, float("-inf")), dim=-1).nan_to_num_(0.0)
    out = torch.matmul(weights, cache.select("v", index).to(compute)).to(qk.dtype)  # (B, H, 1, D)
    alone = missing.all(dim=-1, keepdim=True)  # (B, H, 1, 1): no key in any round
    cache.append(qk, v, buckets)
    return torch.where(alone, v, out)


# ----------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingOptions:
    """Validated options of ``generate`` (see :func:`sampling_options`)."""

    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    greedy: bool
    eos_token_id: Optional[int]
    pad_token_id: Optional[int]
    generator: Optional[torch.Generator]


def _check_number(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_token_id(name: str, value: object, vocab_size: int) -> Optional[int]:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int token id or None, got {value!r}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be in [0, {vocab_size}), got {value}")
    return value


def sampling_options(vocab_size: int, *, max_new_tokens: int, temperature: float = 1.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None, do_sample: bool = True, eos_token_id: Optional[int] = None,
                     pad_token_id: Optional[int] = None,
                     generator: Optional[torch.Generator] = None) -> SamplingOptions:
    """Check ``generate``'s arguments; raises ``TypeError``/``ValueError`` naming the bad one.

    max_new_tokens: int >= 0. temperature: finite number >= 0 (0 = greedy). top_k: int >= 1 or
    None. top_p: number in (0, 1] or None. do_sample: bool (False = greedy). eos/pad_token_id:
    ids in ``[0, vocab_size)`` or None; pad_token_id defaults to eos_token_id.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool):
        raise TypeError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    temperature = _check_number("temperature", temperature)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None:
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise TypeError(f"top_k must be a positive int or None, got {top_k!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None:
        top_p = _check_number("top_p", top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    eos_token_id = _check_token_id("eos_token_id", eos_token_id, vocab_size)
    pad_token_id = _check_token_id("pad_token_id", pad_token_id, vocab_size)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return SamplingOptions(temperature, top_k, top_p, greedy=not do_sample or temperature == 0,
                           eos_token_id=eos_token_id, generator=generator,
                           pad_token_id=eos_token_id if pad_token_id is None else pad_token_id)


def sample_next(logits: Tensor, options: SamplingOptions) -> Tensor:
    """Next token ids ``(B,)`` from the last position's logits ``(B, V)`` (see the module docstring)."""
    if options.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.double()
    scaled = (scaled - scaled.amax(dim=-1, keepdim=True)) / options.temperature  # <= 0, never NaN
    if options.top_k is not None and options.top_k < scaled.shape[-1]:
        kth = scaled.topk(options.top_k, dim=-1).values[:, -1:]  # (B, 1)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if options.top_p is not None and options.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely ids
        drop_sorted = before >= options.top_p  # the most likely id is always kept
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return torch.multinomial(probs, 1, generator=options.generator).squeeze(-1)


def decode_tokens(tokens: Tensor, max_new_tokens: int, next_logits: Callable[[Tensor], Tensor],
                  options: SamplingOptions) -> Tensor:
    """Append up to ``max_new_tokens`` tokens to ``tokens (B, N)``.

    ``next_logits(tokens)`` returns the logits ``(B, V)`` predicting the token after the last one.
    A sequence that produced ``eos_token_id`` gets ``pad_token_id`` from then on; the loop stops
    early once every sequence has finished (so the result may be shorter than
    ``N + max_new_tokens``). An empty batch is returned unchanged.
    """
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    for _ in range(max_new_tokens):
        if bool(done.all()):  # also true for an empty batch
            break
        next_token = sample_next(next_logits(tokens).float(), options)  # (B,)
        if options.eos_token_id is not None:
            next_token = next_token.masked_fill(done, options.pad_token_id)
            done |= next_token == options.eos_token_id
        tokens = torch.cat([tokens, next_token[:, None].to(tokens.dtype)], dim=1)
    return tokens
