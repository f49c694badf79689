"""Causal LSH attention without look-ahead: ``causal_mode="bucket"`` (docs/lsh.md, "Causal modes").

Per round a query attends to the most recent ``bucket_size - 1`` earlier positions of its own
bucket (the same-bucket sorted slots ``i - bucket_size + 1 .. i - 1``), so its key set, and
hence its output, depends on earlier positions only.
"""
from __future__ import annotations

import math

import pytest
import torch

from reformer.kernels import dense_shared_qk_attention, lsh_attention, lsh_buckets

NEG_INF = float("-inf")


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense_bucket_causal(qk, v, rotations, n_buckets, bucket_size, mask=None):
    """The bucket mode written densely: per round, ``j`` is a key of ``i`` when both are real,
    share the bucket, ``j < i`` and at most ``bucket_size - 1`` same-bucket positions separate
    them (``rank_i - rank_j < bucket_size``). Rounds add counts (not de-duplicated); a real row
    with no key in any round outputs its own value; padded rows output 0."""
    b, h, n, d = qk.shape
    buckets = lsh_buckets(qk.detach(), n_buckets=n_buckets, n_hashes=rotations.shape[2], rotations=rotations)
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else ~mask
    real_k = real[:, None, None, :]  # (B, 1, 1, N)
    count = torch.zeros(b, h, n, n, dtype=qk.dtype)
    earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)  # j < i
    for r in range(buckets.shape[2]):
        bk = buckets[:, :, r]  # (B, H, N)
        same = (bk[..., :, None] == bk[..., None, :]) & real_k & real_k.transpose(-1, -2)
        rank = (same & earlier).sum(-1)  # same-bucket real positions before i
        close = rank[..., :, None] - rank[..., None, :] < bucket_size
        count += (same & earlier & close).to(qk.dtype)
    k = qk / qk.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    s = (qk @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(count == 0, NEG_INF)
    top = s.amax(-1, keepdim=True).masked_fill(count.sum(-1, keepdim=True) == 0, 0.0)
    w = count * torch.exp(s - top)
    total = w.sum(-1, keepdim=True)
    out = (w @ v) / total.masked_fill(total == 0, 1.0)
    out = torch.where(total == 0, v, out)
    return out.masked_fill(~real[:, None, :, None], 0.0)


@pytest.mark.parametrize("n,bucket_size,n_buckets,n_hashes", [
    (1, 4, 2, 1), (7, 2, 4, 3), (40, 4, 6, 2), (64, 8, (2, 4), 3), (100, 16, 8, 2), (33, 3, (4, 2), 2),
])
@pytest.mark.parametrize("padded", [False, True])
def test_bucket_mode_equals_the_dense_definition(n, bucket_size, n_buckets, n_hashes, padded):
    width = n_buckets // 2 if isinstance(n_buckets, int) else n_buckets[0] // 2 + n_buckets[1] // 2
    qk = rand(2, 2, n, 6, seed=n).requires_grad_()
    v = rand(2, 2, n, 6, seed=n + 1).requires_grad_()
    rotations = rand(2, 6, n_hashes, width, dtype=torch.float32, seed=n + 2)
    mask = None
    if padded:
        mask = torch.rand(2, n, generator=torch.Generator().manual_seed(n)) < 0.3
        mask[:, 0] = False
    out = lsh_attention(qk, v, bucket_size=bucket_size, n_hashes=n_hashes, n_buckets=n_buckets, causal=True,
                        causal_mode="bucket", key_padding_mask=mask, rotations=rotations)
    ref = dense_bucket_causal(qk, v, rotations, n_buckets, bucket_size, mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    g = rand(*out.shape, seed=99)
    for got, want in zip(torch.autograd.grad(out, (qk, v), g), torch.autograd.grad(ref, (qk, v), g)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_buckets", [4, (2, 4)])
def test_no_output_or_gradient_depends_on_a_later_position(dtype, n_buckets):
    """For every t: changing the inputs at positions > t leaves the outputs at positions <= t, and
    the gradients at positions <= t of a loss on them, unchanged (fixed rotations). The key sets
    and weights are identical; a later token can still shift where a bucket starts in the sorted
    order, which can change the summation order of a matmul or a scatter-add, so equality is up
    to rounding (a few ulps), far below the O(1) changes a look-ahead causes (see the next test)."""
    n, bucket_size, n_hashes = 30, 4, 3
    width = n_buckets // 2 if isinstance(n_buckets, int) else sum(n_buckets) // 2
    rotations = rand(2, 8, n_hashes, width, dtype=torch.float32, seed=3)
    qk0, v0 = rand(1, 2, n, 8, dtype=dtype, seed=1), rand(1, 2, n, 8, dtype=dtype, seed=2)
    g = rand(1, 2, n, 8, dtype=dtype, seed=4)
    tol = 1e-13 if dtype == torch.float64 else 1e-5

    def run(qk, v, t):
        qk, v = qk.clone().requires_grad_(), v.clone().requires_grad_()
        out = lsh_attention(qk, v, bucket_size=bucket_size, n_hashes=n_hashes, n_buckets=n_buckets, causal=True,
                            causal_mode="bucket", rotations=rotations)[:, :, : t + 1]
        dqk, dv = torch.autograd.grad(out, (qk, v), g[:, :, : t + 1])
        return out, dqk[:, :, : t + 1], dv[:, :, : t + 1]

    changed_any = False
    for t in range(n):
        base = run(qk0, v0, t)
        for seed in (10, 11):
            later = torch.zeros(1, 1, n, 1, dtype=torch.bool)
            later[:, :, t + 1:] = True
            qk1 = torch.where(later, 3 * rand(1, 2, n, 8, dtype=dtype, seed=seed + t), qk0)
            v1 = torch.where(later, rand(1, 2, n, 8, dtype=dtype, seed=seed + 50 + t), v0)
            for got, want in zip(run(qk1, v1, t), base):
                torch.testing.assert_close(got, want, atol=tol, rtol=0, msg=f"t = {t}")
            full_new = lsh_attention(qk1, v1, bucket_size=bucket_size, n_hashes=n_hashes, n_buckets=n_buckets,
                                     causal=True, causal_mode="bucket", rotations=rotations)
            changed_any |= t + 1 < n and not torch.equal(full_new[:, :, t + 1:], run(qk0, v0, n - 1)[0][:, :, t + 1:])
    assert changed_any  # the later positions did change (the check above is not vacuous)


def test_chunk_mode_can_look_ahead_and_bucket_mode_cannot():
    """The chunked causal mode: a later token's bucket moves an earlier position's chunk."""
    n, t = 90, 59
    rotations = rand(2, 8, 2, 4, dtype=torch.float32, seed=1)
    qk0, v = rand(1, 2, n, 8, dtype=torch.float32, seed=2), rand(1, 2, n, 8, dtype=torch.float32, seed=3)
    qk1 = qk0.clone()
    qk1[:, :, t + 1:] = rand(1, 2, n - t - 1, 8, dtype=torch.float32, seed=4)
    outs = {}
    for mode in ("chunk", "bucket"):
        run = lambda qk: lsh_attention(qk, v, bucket_size=8, n_hashes=2, causal=True, causal_mode=mode,
                                       rotations=rotations)[:, :, : t + 1]
        outs[mode] = (run(qk0) - run(qk1)).abs().max().item()
    assert outs["chunk"] > 1e-2 and outs["bucket"] < 1e-5, outs


@pytest.mark.parametrize("n", [1, 5, 16, 37])
@pytest.mark.parametrize("padded", [False, True])
def test_one_bucket_and_bucket_size_at_least_n_equals_causal_full_attention(n, padded):
    """Zero rotations put every position in bucket 0; with bucket_size >= N each position's keys are
    then all earlier positions: causal full shared-QK attention (position 0: its own value)."""
    qk = rand(2, 2, n, 8, seed=1).requires_grad_()
    v = rand(2, 2, n, 8, seed=2).requires_grad_()
    mask = None
    if padded:
        mask = torch.rand(2, n, generator=torch.Generator().manual_seed(n)) < 0.3
        mask[:, 0] = False
    out = lsh_attention(qk, v, bucket_size=n + 1, n_hashes=2, n_buckets=2, causal=True, causal_mode="bucket",
                        key_padding_mask=mask, rotations=torch.zeros(2, 8, 2, 1))
    ref = dense_shared_qk_attention(qk, v, causal=True, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    g = rand(*out.shape, seed=9)
    for got, want in zip(torch.autograd.grad(out, (qk, v), g), torch.autograd.grad(ref, (qk, v), g)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
