"""kernels/triton_hash.py under TRITON_INTERPRET=1: equal to the torch hashing (plain and
factorised into two or three factors), and one kernel launch per call whatever N."""
from __future__ import annotations

import pytest
import torch

from reformer.kernels import triton_hash
from reformer.kernels.hashing import hash_buckets, make_rotations

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d,n_hashes,n_buckets", [(1, 16, 2, 4), (7, 32, 3, 6), (100, 64, 2, 64),
                                                     (100, 16, 2, (8, 6)), (129, 48, 1, (4, 16)),
                                                     (100, 16, 2, (4, 6, 8)), (65, 32, 3, (8, 2, 4))])
def test_triton_hashing_equals_torch_hashing(dtype, n, d, n_hashes, n_buckets):
    gen = torch.Generator().manual_seed(0)
    qk = torch.randn(2, 3, n, d, generator=gen).to(dtype)
    rot = make_rotations(3, d, n_hashes, n_buckets, seed=1, device=torch.device("cpu"))
    want = hash_buckets(qk, rot, n_buckets)
    got = triton_hash.hash_buckets(qk, rot, n_buckets)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    assert torch.equal(triton_hash.hash_buckets(qk, rot, n_buckets, dtype=torch.int32), want.int())


@pytest.mark.parametrize("n", [10, 700])
def test_one_launch_per_call(monkeypatch, n):
    calls = []
    run = triton_hash._LAUNCHER.run
    monkeypatch.setattr(triton_hash._LAUNCHER, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    qk = torch.randn(1, 2, n, 16)
    rot = make_rotations(2, 16, 4, (8, 8), seed=0, device=torch.device("cpu"))
    triton_hash.hash_buckets(qk, rot, (8, 8))
    assert len(calls) == 1


def test_torch_hashing_launch_count_grows_with_n():
    """What the Triton kernel replaces: the torch path's op count grows with N (slabs)."""
    from torch.profiler import ProfilerActivity, profile

    import reformer.kernels.hashing as hashing

    counts = []
    for n in (64, 4096):
        qk = torch.randn(1, 2, n, 16)
        rot = make_rotations(2, 16, 4, 8, seed=0, device=torch.device("cpu"))
        old = hashing.HASH_SLAB_BYTES
        hashing.HASH_SLAB_BYTES = 64 * 1024  # small slabs, so a small N shows the growth
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                hash_buckets(qk, rot, 8)
        finally:
            hashing.HASH_SLAB_BYTES = old
        counts.append(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
    assert counts[1] > 4 * counts[0]


def test_rejects_bad_rotations():
    qk = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="rotations must have shape"):
        triton_hash.hash_buckets(qk, torch.randn(3, 16, 1, 2), 4)
