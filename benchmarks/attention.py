"""Attention ops: forward and forward+backward time and peak memory versus sequence length.

Providers (the baseline first; ``--providers`` takes these names or shell patterns such as
``'lsh*'``; the older spellings ``lsh[torch]``, ``full_attention[triton]``, ``reformer_pytorch``,
``hf_reformer`` still select the same providers):

====================  ==================================================================
``naive``             ``reformer.kernels.full_attention(backend="torch")``: materialises
                      the ``(B, H, N, N)`` scores (the textbook formula)
``sdpa``              ``torch.nn.functional.scaled_dot_product_attention`` (fused, O(N) memory)
``full-triton``       ``full_attention(backend="triton")`` (CUDA only)
``lsh-torch``         ``reformer.kernels.lsh_attention(backend="torch")``, shared QK
``lsh-triton``        ``lsh_attention(backend="triton")`` (CUDA only)
``reformer-pytorch``  ``reformer_pytorch.LSHAttention`` (peer, when installed)
``hf-reformer``       ``transformers``' Reformer ``LSHSelfAttention`` (peer, when installed;
                      random weights, includes its QK and V input projections)
====================  ==================================================================

All get inputs of shape ``(B, H, N, D)`` (the peers the same numbers in their own layout);
shared-QK providers get ``qk`` and ``v`` only.

FLOP formulas (forward; backward counted as 2.5x forward, as in flash-attention's benchmark):
full attention ``4 * B * H * N^2 * D`` (halved when causal); LSH attention
``4 * B * H * N * (2 * bucket_size) * D * n_hashes`` (each query scores the keys of its own
chunk and of the chunk before it, in each round) plus hashing ``2 * B * H * N * D * W * n_hashes``
with ``W`` the rotations per position of the default bucket rule (``n_buckets / 2`` up to 256
buckets, ``sum(n_i)/2`` for the factorised ``(n1, n2[, n3])`` beyond; see ``docs/lsh.md``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .cases import Case, Provider, requires
from .harness import Workload

BENCHMARK = "attention"
FULL_PROVIDERS = ("naive", "sdpa", "full-triton")
LSH_PROVIDERS = ("lsh-torch", "lsh-triton", "reformer-pytorch", "hf-reformer")
# earlier provider names (still accepted by --providers)
OLD_NAMES = {"full-triton": "full_attention[triton]", "lsh-torch": "lsh[torch]", "lsh-triton": "lsh[triton]",
             "reformer-pytorch": "reformer_pytorch", "hf-reformer": "hf_reformer"}

# Calibrated on this suite's own measurements (CPU, float32), rounded up so that skipping errs
# on the safe side: naive fwd+bwd peaks at ~3.1 score matrices; the peers keep a few (N, 2*bs)
# score blocks per round plus O(N * D) per round for sort indices and gathered rows.
_NAIVE_SCORE_COPIES = 3.5
_LINEAR_COPIES = 12
# lsh-torch: the rows a call must hold (see _lsh_bytes) plus a working set that does not grow with
# N (the slabs of ref_lsh, the hashing buffer, thread-pool and allocator overheads).
_LSH_WORKSPACE_BYTES = 96 * 2**20


def _dtype(params: dict) -> torch.dtype:
    return getattr(torch, params["dtype"])


def _elt(params: dict) -> int:
    """Bytes per element of the scores (computed in float32 for half inputs)."""
    return max(4, torch.tensor([], dtype=_dtype(params)).element_size())


def _bhnd(params: dict) -> float:
    return params["batch"] * params["heads"] * params["seq_len"] * params["head_dim"]


def full_flops(params: dict) -> float:
    """``4 * B * H * N^2 * D``, halved when causal."""
    flops = 4.0 * _bhnd(params) * params["seq_len"]
    return flops / 2 if params["causal"] else flops


def _rotation_width(n: int, bucket_size: int) -> int:
    """Rotations per position, head and round under the default bucket rule (plain hashing:
    ``n_buckets / 2``; factorised ``(n1, n2[, n3])``: ``sum(n_i)/2``)."""
    try:
        from reformer.kernels.hashing import default_n_buckets, rotation_width
    except ImportError:  # an older reformer.kernels: plain hashing with 2 * ceil(N / bucket_size) buckets
        return -(-n // bucket_size)
    return rotation_width(default_n_buckets(n, bucket_size))


def lsh_flops(params: dict) -> float:
    """``4 * B * H * N * (2 * bucket_size) * D * n_hashes`` plus hashing,
    ``2 * B * H * N * D * W * n_hashes`` with ``W`` rotations per position (see ``_rotation_width``)."""
    bs = params["bucket_size"]
    width = _rotation_width(params["seq_len"], bs)
    return 2.0 * _bhnd(params) * params["n_hashes"] * (4 * bs + width)


def model_bytes(params: dict) -> Optional[float]:
    """Modelled bytes moved by one forward+backward call (for the GB/s column): LSH (every LSH
    provider) by ``reformer.kernels.triton_lsh.model_bytes`` (the round-level kernels' tile
    traffic; None when Triton is not importable); full attention the compulsory traffic,
    q, k, v, out, dO, dq, dk, dv once each: ``12 * B * H * N * D * element_size``."""
    esize = torch.tensor([], dtype=_dtype(params)).element_size()
    groups, n, d = params["batch"] * params["heads"], params["seq_len"], params["head_dim"]
    if "bucket_size" not in params:
        return 12.0 * groups * n * d * esize
    try:
        from reformer.kernels.triton_lsh import model_bytes as lsh_model_bytes
    except Exception:  # Triton missing or broken: no model
        return None
    mode = "chunk"  # the default causal_mode, and the only mode without causal
    return float(lsh_model_bytes(groups, n, d, bucket_size=params["bucket_size"], element_size=esize,
                                 n_hashes=params["n_hashes"], causal_mode=mode, block=64 if esize == 2 else 32))


def _naive_bytes(params: dict) -> float:
    b, h, n = params["batch"], params["heads"], params["seq_len"]
    return _NAIVE_SCORE_COPIES * b * h * n * n * _elt(params) + _LINEAR_COPIES * _bhnd(params) * _elt(params)


def _linear_bytes(params: dict) -> float:
    return _LINEAR_COPIES * _bhnd(params) * _elt(params)


def _lsh_bytes(params: dict) -> float:
    """Peak extra bytes of one LSH forward+backward call (``reformer.kernels`` on CPU), modelled
    per row of ``B*H*N`` plus a constant:

    - ``D`` values for each of: the output, the gradient of the output (created inside the call
      when nothing created it before, as in a single-call measurement), and the two input
      gradients in the accumulation dtype (float32 for half inputs, which add their returned
      half copies);
    - ``8 * n_hashes`` bytes of saved sort orders and bucket ids (int32) and 29 bytes of
      positions, the float64 lse, delta and flags;
    - ``_LSH_WORKSPACE_BYTES``: everything else, which does not grow with N (the core runs in
      slabs of a fixed size).

    At N = 1M (B=1, H=8, D=64, float32, n_hashes 4) that is about 8.6 GiB; inputs and their
    ``.grad`` buffers (``base_bytes``) come on top."""
    rows = params["batch"] * params["heads"] * params["seq_len"]
    elt = torch.tensor([], dtype=_dtype(params)).element_size()
    acc = max(4, elt)
    per_row = params["head_dim"] * (2 * elt + 2 * acc + (2 * elt if elt < acc else 0)) + 8 * params["n_hashes"] + 29
    return rows * per_row + _LSH_WORKSPACE_BYTES


def _chunk_score_bytes(params: dict) -> float:
    """Per row of ``(B*H*N)`` and round: ``6 * D`` for gathered rows and gradients plus three
    ``2 * bucket_size`` chunk-score rows."""
    rows = params["batch"] * params["heads"] * params["seq_len"]
    return rows * (6 * params["head_dim"] + 3 * 2 * params["bucket_size"]) * _elt(params)


def _peer_bytes(params: dict) -> float:
    """The peers keep every round's chunk scores (and their softmax) for backward."""
    return _linear_bytes(params) + params["n_hashes"] * _chunk_score_bytes(params)


def _input_bytes(count: int) -> Callable[[dict], float]:
    """Baseline of a provider with ``count`` ``(B, H, N, D)`` inputs: the inputs and their ``.grad``."""
    return lambda params: 2 * count * _bhnd(params) * torch.tensor([], dtype=_dtype(params)).element_size()


def _tensors(params: dict, device: torch.device, count: int) -> list[Tensor]:
    """``count`` random ``(B, H, N, D)`` leaf tensors that require grad."""
    gen = torch.Generator().manual_seed(1234)
    shape = (params["batch"], params["heads"], params["seq_len"], params["head_dim"])
    return [torch.randn(shape, generator=gen).to(device, _dtype(params)).requires_grad_() for _ in range(count)]


def _build_naive(params: dict, device: torch.device) -> Workload:
    from reformer.kernels import full_attention

    q, k, v = _tensors(params, device, 3)
    return Workload(lambda: full_attention(q, k, v, causal=params["causal"], backend="torch"), leaves=[q, k, v])


def _build_full_triton(params: dict, device: torch.device) -> Workload:
    from reformer.kernels import full_attention

    q, k, v = _tensors(params, device, 3)
    return Workload(lambda: full_attention(q, k, v, causal=params["causal"], backend="triton"), leaves=[q, k, v])


def _build_sdpa(params: dict, device: torch.device) -> Workload:
    q, k, v = _tensors(params, device, 3)
    return Workload(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=params["causal"]), leaves=[q, k, v])


def _lsh_builder(backend: str) -> Callable[[dict, torch.device], Workload]:
    def build(params: dict, device: torch.device) -> Workload:
        from reformer.kernels import lsh_attention

        qk, v = _tensors(params, device, 2)
        return Workload(lambda: lsh_attention(qk, v, bucket_size=params["bucket_size"], n_hashes=params["n_hashes"],
                                              causal=params["causal"], seed=0, backend=backend), leaves=[qk, v])

    return build


def _build_reformer_pytorch(params: dict, device: torch.device) -> Workload:
    from einops import rearrange
    from reformer_pytorch import LSHAttention

    attn = LSHAttention(bucket_size=params["bucket_size"], n_hashes=params["n_hashes"],
                        causal=params["causal"]).to(device).eval()
    qk, v = (rearrange(t.detach(), "b h n d -> (b h) n d").requires_grad_() for t in _tensors(params, device, 2))
    return Workload(lambda: attn(qk, v)[0], leaves=[qk, v])


def _build_hf_reformer(params: dict, device: torch.device) -> Workload:
    from transformers import ReformerConfig as HFConfig
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    heads, dim = params["heads"], params["head_dim"]
    config = HFConfig(hidden_size=heads * dim, num_attention_heads=heads, attention_head_size=dim,
                      lsh_attn_chunk_length=params["bucket_size"], num_hashes=params["n_hashes"],
                      lsh_num_chunks_before=1, lsh_num_chunks_after=0, is_decoder=params["causal"],
                      lsh_attention_probs_dropout_prob=0.0, attn_layers=["lsh"])
    attn = LSHSelfAttention(config).to(device, _dtype(params)).eval()
    gen = torch.Generator().manual_seed(1234)
    hidden = torch.randn(params["batch"], params["seq_len"], heads * dim, generator=gen)
    hidden = hidden.to(device, _dtype(params)).requires_grad_()
    return Workload(lambda: attn(hidden).hidden_states, leaves=[hidden, *attn.parameters()])


# gflops: rough CPU forward+backward rate, only for the run-time estimate printed before a run
PROVIDERS: dict[str, Provider] = {
    "naive": Provider("naive", _build_naive, _naive_bytes, full_flops, requires("reformer.kernels:full_attention"),
                      gflops=45, base_bytes=_input_bytes(3)),
    "sdpa": Provider("sdpa", _build_sdpa, _linear_bytes, full_flops, gflops=150, base_bytes=_input_bytes(3)),
    "full-triton": Provider("full-triton", _build_full_triton, _linear_bytes, full_flops,
                            requires("triton", "reformer.kernels.triton_full"), needs_cuda=True,
                            base_bytes=_input_bytes(3)),
    "lsh-torch": Provider("lsh-torch", _lsh_builder("torch"), _lsh_bytes, lsh_flops,
                          requires("reformer.kernels:lsh_attention"), gflops=55, base_bytes=_input_bytes(2)),
    "lsh-triton": Provider("lsh-triton", _lsh_builder("triton"), _lsh_bytes, lsh_flops,
                           requires("triton", "reformer.kernels:lsh_attention", "reformer.kernels.triton_lsh"),
                           needs_cuda=True, base_bytes=_input_bytes(2)),
    "reformer-pytorch": Provider("reformer-pytorch", _build_reformer_pytorch, _peer_bytes, lsh_flops,
                                 requires("reformer_pytorch:LSHAttention"), gflops=3, base_bytes=_input_bytes(2)),
    "hf-reformer": Provider("hf-reformer", _build_hf_reformer, _peer_bytes, lsh_flops,
                            requires("transformers.models.reformer.modeling_reformer:LSHSelfAttention"), gflops=10,
                            base_bytes=_input_bytes(1)),
}


def plan(lengths: Iterable[int], n_hashes: Iterable[int], peer_hashes: Iterable[int], *, batch: int, heads: int,
         head_dim: int, bucket_size: int, dtype: str, causal: bool) -> list[Case]:
    """Every provider at every length, shortest lengths first (so that a long case's run time
    can be predicted from a shorter one of the same series)."""
    cases = []
    for n in lengths:
        base: dict[str, Any] = dict(batch=batch, heads=heads, seq_len=n, head_dim=head_dim, dtype=dtype,
                                    causal=causal)
        cases += [Case(BENCHMARK, name, name, base) for name in FULL_PROVIDERS]
        for name in LSH_PROVIDERS:
            for h in n_hashes if name.startswith("lsh") else peer_hashes:
                params = dict(base, bucket_size=bucket_size, n_hashes=h)
                cases.append(Case(BENCHMARK, name, f"{name} h={h}", params))
    return cases
