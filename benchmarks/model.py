"""Training-step memory and time of whole models, and of the feed-forward layer alone.

One training step = ``loss(tokens)`` forward + backward (no optimizer update) at batch 1.

Providers:

- ``transformer``: the baseline Transformer (Vaswani et al.) as a decoder-only LM: ``reformer.TokenEmbedding`` +
  sinusoidal positions, ``depth`` causal ``reformer.EncoderLayer`` s (naive full attention,
  post-norm residuals, unchunked feed-forward), linear head. Same d_model, heads, d_ff, depth
  and vocabulary as the ReformerLM it is compared with.
- ``reformer_lm``: ``reformer.ReformerLM`` with ``attention``, ``reversible`` and ``ff_chunks``
  from the case's parameters.
- ``ffn``: ``reformer.FeedForward`` (``chunks=1``) or ``reformer.ChunkedFeedForward`` on a
  ``(1, N, d_model)`` input; forward+backward of the layer alone.

Sweeps: ``depth`` (memory versus depth at a fixed length, reversible or not), ``length``
(versus sequence length at a fixed depth, chunked feed-forward on and off), ``ffn`` and
``long`` (``model --long``: one training step of a small reversible ReformerLM with LSH and
axial positions at N = 1,048,576).

FLOP formula (forward, used to predict run times and shown as GFLOP/s): ``2 * P * N`` for the
``P`` weights of the blocks, plus per layer the attention formula of ``attention.py``.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import full_flops, lsh_flops
from .cases import Case, Provider, requires
from .harness import Workload

BENCHMARK = "model"


class TransformerLM(nn.Module):
    """The baseline Transformer's encoder layers, causal, as a language model:
    tokens ``(B, N)`` -> logits ``(B, N, vocab_size)``."""

    def __init__(self, vocab_size: int, d_model: int, n_heads: int, d_ff: int, depth: int, max_len: int):
        super().__init__()
        import reformer

        self.embed = reformer.TokenEmbedding(vocab_size, d_model)
        self.positions = reformer.SinusoidalPositionalEncoding(d_model, max_len)
        self.layers = nn.ModuleList(
            reformer.EncoderLayer(d_model, n_heads, d_ff, dropout=0.0) for _ in range(depth)
        )
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.positions(self.embed(tokens))  # (B, N, d_model)
        for layer in self.layers:
            x = layer(x, causal=True)
        return self.head(x)

    def loss(self, tokens: Tensor) -> Tensor:
        """Next-token cross-entropy, as ``ReformerLM.loss``."""
        logits = self(tokens)[:, :-1]  # (B, N-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _tokens(params: dict, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(params["vocab_size"], (1, params["seq_len"]), generator=gen).to(device)


def _build_transformer(params: dict, device: torch.device) -> Workload:
    model = TransformerLM(params["vocab_size"], params["d_model"], params["n_heads"], params["d_ff"],
                          params["depth"], params["seq_len"]).to(device, getattr(torch, params["dtype"]))
    tokens = _tokens(params, device)
    return Workload(lambda: model.loss(tokens), leaves=list(model.parameters()))


def _build_reformer(params: dict, device: torch.device) -> Workload:
    import reformer

    config = reformer.ReformerConfig(
        vocab_size=params["vocab_size"], d_model=params["d_model"], n_heads=params["n_heads"],
        depth=params["depth"], d_ff=params["d_ff"], max_seq_len=params["seq_len"], attention=params["attention"],
        bucket_size=params["bucket_size"], n_hashes=params["n_hashes"], causal=True,
        reversible=params["reversible"], ff_chunks=params["ff_chunks"], dropout=0.0,
        axial_shape=tuple(params["axial_shape"]) if params.get("axial_shape") else None)
    model = reformer.ReformerLM(config).to(device, getattr(torch, params["dtype"]))
    tokens = _tokens(params, device)
    return Workload(lambda: model.loss(tokens), leaves=list(model.parameters()))


def _build_ffn(params: dict, device: torch.device) -> Workload:
    import reformer

    d, d_ff, chunks = params["d_model"], params["d_ff"], params["ff_chunks"]
    layer = reformer.FeedForward(d, d_ff) if chunks == 1 else reformer.ChunkedFeedForward(d, d_ff, chunks)
    layer = layer.to(device, getattr(torch, params["dtype"]))
    gen = torch.Generator().manual_seed(1234)
    x = torch.randn(1, params["seq_len"], d, generator=gen).to(device, getattr(torch, params["dtype"]))
    x.requires_grad_()
    return Workload(lambda: layer(x), leaves=[x, *layer.parameters()])


def _attention_params(params: dict) -> dict:
    return dict(batch=1, heads=params["n_heads"], seq_len=params["seq_len"],
                head_dim=params["d_model"] // params["n_heads"], causal=True,
                bucket_size=params.get("bucket_size"), n_hashes=params.get("n_hashes"))


def model_flops(params: dict) -> float:
    """``2 * P * N`` (P = block weights, ~4 d^2 + 2 d d_ff per layer) plus attention per layer."""
    d, n = params["d_model"], params["seq_len"]
    weights = params["depth"] * (4 * d * d + 2 * d * params["d_ff"])
    attn = lsh_flops if params.get("attention") == "lsh" else full_flops
    recompute = 2 if params.get("reversible") else 1  # reversible backward recomputes the forward
    return recompute * (2.0 * weights * n + params["depth"] * attn(_attention_params(params)))


def ffn_flops(params: dict) -> float:
    """``4 * N * d_model * d_ff`` (two matmuls)."""
    return 4.0 * params["seq_len"] * params["d_model"] * params["d_ff"]


def model_mem_bytes(params: dict) -> float:
    """Saved activations per layer (all layers unless reversible) plus the logits; about 1.5x
    the measured peak of a reversible LSH ReformerLM step (d_model 64, N = 4K..32K)."""
    n, d, heads = params["seq_len"], params["d_model"], params["n_heads"]
    if params.get("attention") == "lsh":
        attn = heads * n * 2 * params["bucket_size"] * 4 * 4
    else:
        attn = 3.5 * heads * n * n * 4
    per_layer = attn + n * (16 * d + 3 * params["d_ff"]) * 4
    # reversible: one layer's activations at a time; chunked loss: one chunk of logits at a time
    layers = 1 if params.get("reversible") else params["depth"]
    logit_chunks = params.get("ff_chunks", 1) if params.get("reversible") else 1
    return layers * per_layer + 3 * n * params["vocab_size"] * 4 / max(1, logit_chunks)


def ffn_bytes(params: dict) -> float:
    """Hidden activation and its gradient, per chunk."""
    n, d = params["seq_len"], params["d_model"]
    return (4 * n * params["d_ff"] / params["ff_chunks"] + 4 * n * d) * 4


_NEEDS_REFORMER_LM = requires("reformer:ReformerLM", "reformer:ReformerConfig", "reformer:LSHSelfAttention")
PROVIDERS: dict[str, Provider] = {
    "transformer": Provider("transformer", _build_transformer, model_mem_bytes, model_flops,
                            requires("reformer:EncoderLayer"), gflops=40),
    "reformer_lm": Provider("reformer_lm", _build_reformer, model_mem_bytes, model_flops, _NEEDS_REFORMER_LM,
                            gflops=30),
    "ffn": Provider("ffn", _build_ffn, ffn_bytes, ffn_flops, requires("reformer:ChunkedFeedForward"), gflops=60),
}


def _reformer_case(sweep: str, params: dict, *, reversible: bool, ff_chunks: int) -> Case:
    series = f"reformer_lm {'reversible' if reversible else 'plain'} ff_chunks={ff_chunks}"
    return Case(BENCHMARK, "reformer_lm", series,
                dict(params, sweep=sweep, attention="lsh", reversible=reversible, ff_chunks=ff_chunks))


def long_case(seq_len: int, axial_shape: Iterable[int], dims: dict[str, Any], dtype: str) -> Case:
    """One training step of a reversible LSH ReformerLM with axial positions at ``seq_len``;
    ``dims``: vocab_size, d_model, n_heads, d_ff, bucket_size, n_hashes, depth, ff_chunks."""
    params = dict(dims, dtype=dtype, seq_len=seq_len, sweep="long", attention="lsh", reversible=True,
                  axial_shape=list(axial_shape))
    return Case(BENCHMARK, "reformer_lm", f"reformer_lm reversible axial ff_chunks={dims['ff_chunks']}", params)


def plan(depths: Iterable[int], depth_len: int, lengths: Iterable[int], length_depth: int, ffn_len: int,
         ffn_d_model: int, ffn_d_ff: int, ffn_chunks: int, *, dims: dict[str, Any], dtype: str) -> list[Case]:
    """The depth sweep, the length sweep and the feed-forward cases. ``dims``: vocab_size,
    d_model, n_heads, d_ff, bucket_size, n_hashes shared by all model cases."""
    base = dict(dims, dtype=dtype)
    cases = []
    for depth in depths:
        params = dict(base, depth=depth, seq_len=depth_len)
        cases.append(Case(BENCHMARK, "transformer", "transformer", dict(params, sweep="depth")))
        for reversible in (False, True):
            cases.append(_reformer_case("depth", params, reversible=reversible, ff_chunks=ffn_chunks))
    for n in lengths:
        params = dict(base, depth=length_depth, seq_len=n)
        cases.append(Case(BENCHMARK, "transformer", "transformer", dict(params, sweep="length")))
        for chunks in (1, ffn_chunks):
            cases.append(_reformer_case("length", params, reversible=True, ff_chunks=chunks))
    ffn = dict(seq_len=ffn_len, d_model=ffn_d_model, d_ff=ffn_d_ff, dtype=dtype, sweep="ffn")
    for chunks in (1, ffn_chunks) if ffn_len else ():
        cases.append(Case(BENCHMARK, "ffn", f"ffn ff_chunks={chunks}", dict(ffn, ff_chunks=chunks)))
    return cases
