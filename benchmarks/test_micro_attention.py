"""Micro benchmarks for pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Not part of the normal test run (``testpaths`` is ``tests/``). They reuse the providers of the
CLI suite, so the op under test is built exactly as there; these give pytest-benchmark's
statistics (min/mean/stddev over many rounds) for a few small shapes, the CLI gives the sweeps,
memory and plots.
"""
from __future__ import annotations

import pytest
import torch

from . import attention, model
from .harness import training_step

CPU = torch.device("cpu")
ATTN = dict(batch=1, heads=8, head_dim=64, dtype="float32", causal=False, bucket_size=64, n_hashes=4)


def _workload(providers: dict, name: str, params: dict):
    provider = providers[name]
    reason = provider.missing() or ("needs CUDA" if provider.needs_cuda else None)
    if reason:
        pytest.skip(reason)
    return provider.build(params, CPU)


@pytest.mark.parametrize("seq_len", [1024, 4096])
@pytest.mark.parametrize("name", ["naive", "sdpa", "lsh-torch"])
def test_attention_fwd_bwd(benchmark, name, seq_len):
    benchmark.group = f"attention fwd+bwd N={seq_len}"
    if name == "naive" and seq_len > 2048:
        pytest.skip("naive attention at N=4096 takes seconds per call; see the CLI sweep")
    benchmark(training_step(_workload(attention.PROVIDERS, name, dict(ATTN, seq_len=seq_len))))


@pytest.mark.parametrize("chunks", [1, 8])
def test_feedforward_fwd_bwd(benchmark, chunks):
    benchmark.group = "feed-forward fwd+bwd N=4096"
    params = dict(seq_len=4096, d_model=256, d_ff=1024, ff_chunks=chunks, dtype="float32")
    benchmark(training_step(_workload(model.PROVIDERS, "ffn", params)))


def test_lsh_hashing(benchmark):
    """Hashing alone: rotations and argmax for every head and round, (B, H, N, D) -> buckets."""
    from reformer.kernels import lsh_buckets

    gen = torch.Generator().manual_seed(0)
    qk = torch.randn(1, 8, 4096, 64, generator=gen)
    rotations = torch.randn(8, 64, 4, 64, generator=gen)
    benchmark(lsh_buckets, qk, n_buckets=128, n_hashes=4, rotations=rotations)
