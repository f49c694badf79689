"""Causal LSH attention without look-ahead: ``causal_mode="bucket"`` (docs/lsh.md, "Causal modes").

Per round a query attends to the most recent ``bucket_size - 1`` earlier positions of its own
bucket (the same-bucket sorted slots ``i - bucket_size + 1 .. i - 1``), so its key set, and
hence its output, depends on earlier positions only.
"""
from __future__ import annotations

import math

import pytest
import torch

from reformer.kernels import dense_shared_qk_attention, lsh_attention, lsh_buckets, ref_lsh
from reformer.kernels.lsh_function import align_buckets, sort_rounds

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


def later_changes_leave_earlier_bits(n, bucket_size, n_hashes, n_buckets, dtype, *, padded=False, backend="torch",
                                     times=None, d=8, changes=(10, 11)):
    """For each t in ``times`` (default: every position) and each of ``changes`` random changes of
    the inputs at positions > t (qk and v; with ``padded``, also which later positions are
    padding): the outputs at positions <= t and the gradients at positions <= t of a loss on
    them are bit-identical (torch.equal) to those of the unchanged inputs (fixed rotations).
    Returns whether some change did change a later output (so the comparison is not vacuous)."""
    width = n_buckets // 2 if isinstance(n_buckets, int) else sum(n_buckets) // 2
    rotations = rand(2, d, n_hashes, width, dtype=torch.float32, seed=3)
    qk0, v0 = rand(1, 2, n, d, dtype=dtype, seed=1), rand(1, 2, n, d, dtype=dtype, seed=2)
    g = rand(1, 2, n, d, dtype=dtype, seed=4)
    mask0 = None
    if padded:
        mask0 = torch.rand(1, n, generator=torch.Generator().manual_seed(n)) < 0.3

    def run(qk, v, mask, t):
        qk, v = qk.clone().requires_grad_(), v.clone().requires_grad_()
        full = lsh_attention(qk, v, bucket_size=bucket_size, n_hashes=n_hashes, n_buckets=n_buckets, causal=True,
                             causal_mode="bucket", key_padding_mask=mask, rotations=rotations, backend=backend)
        dqk, dv = torch.autograd.grad(full[:, :, : t + 1], (qk, v), g[:, :, : t + 1])
        return full.detach(), (full[:, :, : t + 1].detach(), dqk[:, :, : t + 1], dv[:, :, : t + 1])

    changed = False
    for t in range(n) if times is None else times:
        full0, base = run(qk0, v0, mask0, t)
        for seed in changes:
            later = torch.zeros(1, 1, n, 1, dtype=torch.bool)
            later[:, :, t + 1:] = True
            qk1 = torch.where(later, 3 * rand(1, 2, n, d, dtype=dtype, seed=seed + t), qk0)
            v1 = torch.where(later, rand(1, 2, n, d, dtype=dtype, seed=seed + 50 + t), v0)
            mask1 = mask0
            if padded:
                flip = torch.rand(1, n, generator=torch.Generator().manual_seed(seed + t)) < 0.5
                mask1 = torch.where(later[0, 0, :, 0] & flip, ~mask0, mask0)
            full1, got = run(qk1, v1, mask1, t)
            for name, a, b in zip(("out", "dqk", "dv"), got, base):
                assert torch.equal(a, b), f"{name} at positions <= {t} changed by later inputs"
            changed |= not torch.equal(full1[:, :, t + 1:], full0[:, :, t + 1:])
    return changed


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_buckets", [4, (2, 4)])
@pytest.mark.parametrize("padded", [False, True])
def test_no_output_or_gradient_depends_on_a_later_position(dtype, n_buckets, padded):
    """For every t: changing the inputs at positions > t leaves the outputs at positions <= t, and
    the gradients at positions <= t of a loss on them, bit-identical (fixed rotations): the
    aligned layout gives every query the same row and key slots in its chunk whatever later tokens
    hash to, and the backward adds a row's own-chunk and look-back parts in a fixed order
    (docs/lsh.md, "Causal modes")."""
    assert later_changes_leave_earlier_bits(30, 4, 3, n_buckets, dtype, padded=padded)


@pytest.mark.parametrize("n,bucket_size,n_buckets,n_hashes", [(1, 4, 2, 2), (7, 2, 4, 2), (100, 8, 8, 2),
                                                               (100, 5, (4, 4), 2)])
@pytest.mark.parametrize("chunks_per_slab", [None, 1, 3])
def test_no_look_ahead_bits_across_chunk_and_slab_boundaries(monkeypatch, n, bucket_size, n_buckets, n_hashes,
                                                             chunks_per_slab):
    """Odd sizes, buckets straddling chunks, and slabs of 1 or 3 chunks (a round then has many
    slabs, so a row's own-chunk and look-back gradients can come from different slabs): still
    bit-identical."""
    if chunks_per_slab is not None:  # logits bytes of one float32 chunk: bucket_size x 2 bucket_size x 4
        monkeypatch.setattr(ref_lsh, "SLAB_LOGITS_BYTES", chunks_per_slab * bucket_size * 2 * bucket_size * 4)
    changed = later_changes_leave_earlier_bits(n, bucket_size, n_hashes, n_buckets, torch.float32, padded=n == 100,
                                               times=range(0, n, 1 if n < 10 else 12), changes=(10,))
    assert changed or n == 1


def _aligned_by_hand(order, bkt, bucket_size):
    """The aligned layout of one round and group, element by element (docs/lsh.md, "Causal modes")."""
    slots, start, prev = {}, 0, None
    count = 0
    for o, b in zip(order.tolist(), bkt.tolist()):
        if b != prev:
            if prev is not None:
                start += -(-count // bucket_size) * bucket_size
            prev, count = b, 0
        slots[start + count] = (o, b)
        count += 1
    return slots


@pytest.mark.parametrize("case", ["random", "padding", "one bucket", "own buckets", "one position"])
@pytest.mark.parametrize("bucket_size", [1, 3, 4])
def test_aligned_slots_match_the_definition(case, bucket_size):
    """``align_buckets``: every bucket's run starts at a multiple of bucket_size, in sorted order,
    holes (order -1, bkt -1) in between and at the end, S = the largest slot count rounded up."""
    gen = torch.Generator().manual_seed(bucket_size)
    n = 1 if case == "one position" else 13
    buckets = torch.randint(0, 5, (2, 3, 2, n), generator=gen)
    mask = None
    if case == "padding":
        mask = torch.rand(2, n, generator=gen) < 0.4
    elif case == "one bucket":
        buckets.zero_()
    elif case == "own buckets":
        buckets = torch.randperm(n, generator=gen).expand(2, 3, 2, n).clone()
    order, bkt = sort_rounds(buckets, mask, 5 if case != "own buckets" else n)
    order_a, bkt_a = align_buckets(order, bkt, bucket_size)
    assert order_a.dtype == bkt_a.dtype == torch.int32 and order_a.shape == bkt_a.shape
    s = order_a.shape[-1]
    assert s % bucket_size == 0
    longest = 0
    for r in range(order.shape[0]):
        for g in range(order.shape[1]):
            want = _aligned_by_hand(order[r, g], bkt[r, g], bucket_size)
            longest = max(longest, max(want) + 1)
            for slot in range(s):
                o, b = want.get(slot, (-1, -1))
                assert (order_a[r, g, slot].item(), bkt_a[r, g, slot].item()) == (o, b), (r, g, slot)
    assert s == -(-longest // bucket_size) * bucket_size
    if case == "one bucket":
        assert s == -(-n // bucket_size) * bucket_size and bool((order_a[..., :n] >= 0).all())
    if case == "own buckets":
        assert s == n * bucket_size


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


def _lm_run(model, tokens, t):
    """Logits at positions <= t of a ReformerLM and the gradients of a loss on them w.r.t. the
    token embeddings at positions <= t and w.r.t. every parameter."""
    captured = []
    hook = model.token_emb.register_forward_hook(lambda m, i, out: captured.append(out) or out.retain_grad())
    try:
        logits = model(tokens)[:, : t + 1]
    finally:
        hook.remove()
    model.zero_grad(set_to_none=True)
    weights = torch.linspace(-1.0, 1.0, logits.numel(), dtype=logits.dtype).view_as(logits)
    (logits * weights).sum().backward()
    params = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    return [logits.detach(), captured[0].grad[:, : t + 1].clone(), *params]


@pytest.mark.parametrize("reversible", [False, True])
def test_reformer_lm_bucket_mode_earlier_logits_and_gradients_are_bit_identical(reversible):
    """A causal LSH ReformerLM (eval mode, seeded rotations): changing the tokens after position t
    leaves the logits at positions <= t, and the gradients of a loss on them (w.r.t. the token
    embeddings at positions <= t and w.r.t. every parameter), bit-identical with
    causal_mode="bucket"; with causal_mode="chunk" some of them change (look-ahead)."""
    from reformer import ReformerConfig, ReformerLM

    n = 48
    differs = {}
    for mode in ("bucket", "chunk"):
        torch.manual_seed(0)
        config = ReformerConfig(vocab_size=32, d_model=32, n_heads=2, depth=2, d_ff=64, max_seq_len=n, bucket_size=4,
                                n_hashes=2, ff_chunks=3, axial_shape=(6, 8), attention="lsh", causal=True,
                                causal_mode=mode, reversible=reversible, seed=5, dropout=0.0)
        model = ReformerLM(config).eval()
        gen = torch.Generator().manual_seed(1)
        tokens0 = torch.randint(0, 32, (2, n), generator=gen)
        differs[mode] = 0
        for t in (5, 17, 30, 46):
            base = _lm_run(model, tokens0, t)
            tokens1 = tokens0.clone()
            tokens1[:, t + 1:] = torch.randint(0, 32, (2, n - t - 1), generator=gen)
            got = _lm_run(model, tokens1, t)
            assert len(got) == len(base)
            same = [torch.equal(a, b) for a, b in zip(got, base)]
            if mode == "bucket":
                assert all(same), f"t = {t}: outputs/gradients changed: {same}"
            differs[mode] += same.count(False)
    assert differs["chunk"] > 0
