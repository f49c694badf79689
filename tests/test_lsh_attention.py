"""Shared-QK LSH attention (``reformer.kernels.lsh_attention``): the semantics of docs/lsh.md."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import reformer.kernels
from reformer.kernels import dense_shared_qk_attention, hashing, lsh_attention, lsh_buckets, ref_lsh
from reformer.kernels.lsh_function import SortedCoreAdapter, lsh_attention_rounds

NEG_INF = float("-inf")


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def random_mask(b, n, seed, p=0.3):
    """Random padding, but every sequence keeps its first position."""
    mask = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) < p
    mask[:, 0] = False
    return mask


def masked_softmax_attend(s, v):
    """softmax over the last dim (rows with only -inf -> 0) times v, and the row log-sum-exp."""
    has_key = (s > NEG_INF).any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~has_key, 0.0), dim=-1) * has_key
    return p @ v, torch.logsumexp(s, dim=-1)


def naive_chunked_lsh(qk, v, rotations, bucket_size, causal=False, mask=None):
    """docs/lsh.md (hashing, sort, chunks with look-back, self rule, rounds) written out plainly
    with ordinary autograd: stable sort by bucket, gather, roll for the look-back, a softmax per
    round, softmax over the rounds' lse."""
    b, h, n, d = qk.shape
    n_hashes, n_buckets = rotations.shape[2], 2 * rotations.shape[3]
    n_pad = -(-n // bucket_size) * bucket_size
    n_chunks = n_pad // bucket_size
    rotated = torch.einsum("bhnd,hdrk->bhrnk", qk.detach(), rotations.to(qk.dtype))
    buckets = torch.nn.functional.pad(torch.cat([rotated, -rotated], -1).argmax(-1), (0, n_pad - n))
    pad = torch.ones(b, n_pad, dtype=torch.bool)
    pad[:, :n] = False if mask is None else mask
    order = torch.sort(buckets.masked_fill(pad[:, None, None, :], n_buckets), dim=-1, stable=True).indices
    qk_p, v_p = (torch.nn.functional.pad(x, (0, 0, 0, n_pad - n)) for x in (qk, v))
    pos = torch.arange(n_pad).masked_fill(pad, -1)[:, None, :].expand(b, h, n_pad)
    outs, lses = [], []
    for r in range(n_hashes):
        idx = order[:, :, r]
        gather = lambda x: x.gather(2, idx[..., None].expand(-1, -1, -1, d)).view(b, h, n_chunks, bucket_size, d)
        q, sv = gather(qk_p), gather(v_p)
        sp = pos.gather(2, idx).view(b, h, n_chunks, bucket_size)
        k = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        if n_chunks > 1:
            k, sv_k, sp_k = (torch.cat([x, x.roll(1, dims=2)], dim=3) for x in (k, sv, sp))
        else:
            sv_k, sp_k = sv, sp
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        pq, pk = sp[..., :, None], sp_k[..., None, :]
        bad = (pq == pk) | (pk < 0) | (pq < 0) | ((pk > pq) if causal else False)
        s = s.masked_fill(bad, NEG_INF)
        has_key = (s > NEG_INF).any(-1)
        o, _ = masked_softmax_attend(s, sv_k)
        lse = torch.logsumexp(s.masked_fill(~has_key[..., None], 0.0), -1).masked_fill(~has_key, NEG_INF)
        unsort = torch.empty_like(idx).scatter_(2, idx, torch.arange(n_pad).expand(b, h, n_pad))
        outs.append(o.reshape(b, h, n_pad, d).gather(2, unsort[..., None].expand(-1, -1, -1, d)))
        lses.append(lse.reshape(b, h, n_pad).gather(2, unsort))
    lses = torch.stack(lses)
    found = (lses > NEG_INF).any(0, keepdim=True)
    weights = torch.softmax(lses.masked_fill(~found, 0.0), dim=0) * found
    out = (weights[..., None] * torch.stack(outs)).sum(0)[:, :, :n]
    alone = ~found[0, :, :, :n, None] & (pos[:, :, :n, None] >= 0)
    return torch.where(alone, v, out)


def grads(out, inputs, seed=5):
    g = rand(*out.shape, dtype=out.dtype, seed=seed)
    return torch.autograd.grad(out, inputs, g)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 100, 257])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_one_chunk_equals_full_attention(n, causal, padded, dtype, atol):
    qk = rand(2, 2, n, 16, dtype=dtype, seed=n).requires_grad_()
    v = rand(2, 2, n, 16, dtype=dtype, seed=n + 1).requires_grad_()
    mask = random_mask(2, n, seed=n) if padded else None
    bucket_size = n if n % 2 else n + 5  # exactly one chunk, with and without internal padding
    out = lsh_attention(qk, v, bucket_size=bucket_size, n_hashes=2, causal=causal, causal_mode="chunk",
                        key_padding_mask=mask, seed=n, backend="torch")
    ref = dense_shared_qk_attention(qk, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    for got, want in zip(grads(out, (qk, v)), grads(ref, (qk, v))):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)


@pytest.mark.parametrize("n,bucket_size,n_hashes", [(100, 16, 3), (20, 10, 2), (37, 4, 4), (9, 16, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("slab_bytes", [None, 1], ids=["one-slab", "slab-per-chunk"])
def test_custom_backward_matches_naive_chunked_autograd(n, bucket_size, n_hashes, causal, padded, slab_bytes,
                                                        monkeypatch):
    if slab_bytes is not None:  # the reference core then loops over one chunk (and hashes one position) at a time
        monkeypatch.setattr(ref_lsh, "SLAB_LOGITS_BYTES", slab_bytes)
        monkeypatch.setattr(hashing, "HASH_SLAB_BYTES", slab_bytes)
    qk = rand(2, 2, n, 8, seed=1).requires_grad_()
    v = rand(2, 2, n, 8, seed=2).requires_grad_()
    mask = random_mask(2, n, seed=3) if padded else None
    rotations = rand(2, 8, n_hashes, -(-n // bucket_size), dtype=torch.float32, seed=4)
    out = lsh_attention(qk, v, bucket_size=bucket_size, n_hashes=n_hashes, causal=causal, causal_mode="chunk",
                        key_padding_mask=mask, rotations=rotations, backend="torch")
    ref = naive_chunked_lsh(qk, v, rotations, bucket_size, causal, mask)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    for got, want in zip(grads(out, (qk, v)), grads(ref, (qk, v))):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("causal_mode", ["bucket", "chunk"])
def test_causal_gradient_is_exactly_zero_for_future_positions(causal_mode):
    n = 300
    qk = rand(1, 2, n, 8, dtype=torch.float32, seed=7).requires_grad_()
    v = rand(1, 2, n, 8, dtype=torch.float32, seed=8).requires_grad_()
    out = lsh_attention(qk, v, bucket_size=16, n_hashes=3, causal=True, causal_mode=causal_mode, seed=3,
                        backend="torch")
    for i in [0, 1, 15, 16, 17, 64, 150, 151, 233, 298, 299]:
        dqk, dv = torch.autograd.grad(out[:, :, i].sum(), (qk, v), retain_graph=True)
        assert torch.all(dqk[:, :, i + 1:] == 0) and torch.all(dv[:, :, i + 1:] == 0)
        assert dv[:, :, : i + 1].abs().sum() > 0  # the check above is not vacuous


@pytest.mark.parametrize("causal,causal_mode", [(False, "bucket"), (True, "bucket"), (True, "chunk")])
def test_padded_positions_change_no_other_output(causal, causal_mode):
    n = 77
    qk, v = rand(2, 2, n, 8, dtype=torch.float32, seed=1), rand(2, 2, n, 8, dtype=torch.float32, seed=2)
    mask = random_mask(2, n, seed=4, p=0.4)
    run = lambda a, b: lsh_attention(a, b, bucket_size=8, n_hashes=3, causal=causal, causal_mode=causal_mode,
                                     key_padding_mask=mask, seed=9)
    out = run(qk, v)
    noise = lambda seed: 100 * rand(2, 2, n, 8, dtype=torch.float32, seed=seed) * mask[:, None, :, None]
    out2 = run(qk + noise(5), v + noise(6))
    assert torch.equal(out, out2)
    assert torch.all(out.masked_select(mask[:, None, :, None]) == 0)


def test_same_rotations_or_seed_bit_identical_and_different_seed_differs():
    qk, v = rand(2, 3, 90, 16, dtype=torch.float32, seed=1), rand(2, 3, 90, 16, dtype=torch.float32, seed=2)
    run = lambda **kw: lsh_attention(qk, v, bucket_size=8, n_hashes=2, **kw)
    assert torch.equal(run(seed=11), run(seed=11))
    rotations = rand(3, 16, 2, 6, dtype=torch.float32, seed=3)
    assert torch.equal(run(rotations=rotations), run(rotations=rotations))
    assert not torch.equal(run(seed=11), run(seed=12))
    torch.manual_seed(0)
    first = run()
    torch.manual_seed(0)
    assert torch.equal(first, run())  # global-RNG rotations replay with the RNG state


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal,causal_mode", [(False, "bucket"), (True, "chunk"), (True, "bucket")])
@pytest.mark.parametrize("n_buckets", [None, (2, 4)])
def test_gradcheck_float64_multi_chunk(causal, causal_mode, padded, n_buckets):
    qk = rand(1, 2, 13, 4, seed=1).requires_grad_()
    v = rand(1, 2, 13, 4, seed=2).requires_grad_()
    mask = random_mask(1, 13, seed=3) if padded else None

    def fn(a, b):
        out, lse = lsh_attention(a, b, bucket_size=4, n_hashes=2, n_buckets=n_buckets, causal=causal,
                                 causal_mode=causal_mode, key_padding_mask=mask, seed=5, return_lse=True)
        return out if padded else (out, lse)  # lse is -inf at padded positions

    assert torch.autograd.gradcheck(fn, (qk, v), atol=1e-7, fast_mode=True)


def test_fully_masked_rows_are_zero_with_finite_gradients():
    qk = rand(2, 2, 20, 8, dtype=torch.float32, seed=1).requires_grad_()
    v = rand(2, 2, 20, 8, dtype=torch.float32, seed=2).requires_grad_()
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[1] = True  # every key of the second sequence is padding
    out, lse = lsh_attention(qk, v, bucket_size=4, n_hashes=2, causal=True, key_padding_mask=mask, seed=0,
                             return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == NEG_INF) and torch.isfinite(out).all()
    dqk, dv = torch.autograd.grad(out.sum(), (qk, v))
    assert torch.isfinite(dqk).all() and torch.isfinite(dv).all()
    assert torch.all(dqk[1] == 0) and torch.all(dv[1] == 0)


def test_lse_counts_every_round():
    """Rounds are not de-duplicated: with one chunk, each of the R rounds finds every key."""
    qk, v = rand(1, 2, 10, 8, seed=1), rand(1, 2, 10, 8, seed=2)
    _, lse = lsh_attention(qk, v, bucket_size=10, n_hashes=3, seed=0, return_lse=True)
    _, full_lse = dense_shared_qk_attention(qk, v, return_lse=True)
    torch.testing.assert_close(lse, full_lse + math.log(3), atol=1e-10, rtol=0)


def clustered_qk(n, d, n_clusters, seed):
    """Vectors near one of ``n_clusters`` random directions, long enough that each query's
    attention is concentrated on its own cluster."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.nn.functional.normalize(torch.randn(n_clusters, d, generator=g), dim=-1)
    members = centers[torch.randint(n_clusters, (n,), generator=g)]
    return (32.0 * members + 3.2 / math.sqrt(d) * torch.randn(n, d, generator=g)).view(1, 1, n, d)


def test_error_falls_as_n_hashes_grows_on_clustered_inputs():
    hashes, seeds = (1, 2, 4, 8), range(4)
    errors = [0.0] * len(hashes)
    for seed in seeds:
        qk = clustered_qk(256, 32, n_clusters=16, seed=seed)
        v = rand(1, 1, 256, 32, dtype=torch.float32, seed=100 + seed)
        full = dense_shared_qk_attention(qk, v)
        for i, n_hashes in enumerate(hashes):
            out = lsh_attention(qk, v, bucket_size=16, n_hashes=n_hashes, seed=seed)
            errors[i] += (out - full).abs().mean().item() / len(seeds)
    assert errors[0] > errors[1] > errors[2] > errors[3], errors
    assert errors[3] < 0.6 * errors[0], errors


def test_half_precision_matches_float32_on_the_same_values():
    for dtype in (torch.float16, torch.bfloat16):
        qk = rand(1, 2, 50, 16, dtype=torch.float32, seed=1).to(dtype).requires_grad_()
        v = rand(1, 2, 50, 16, dtype=torch.float32, seed=2).to(dtype).requires_grad_()
        qk32, v32 = (x.detach().float().requires_grad_() for x in (qk, v))
        out = lsh_attention(qk, v, bucket_size=8, n_hashes=3, causal=True, seed=0)
        ref = lsh_attention(qk32, v32, bucket_size=8, n_hashes=3, causal=True, seed=0)  # same buckets
        assert out.dtype == dtype
        tol = 2e-2 if dtype == torch.bfloat16 else 3e-3
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)
        (out.float() * ref.detach()).sum().backward()
        (ref * ref.detach()).sum().backward()
        torch.testing.assert_close(qk.grad.float(), qk32.grad, atol=10 * tol, rtol=0)
        torch.testing.assert_close(v.grad.float(), v32.grad, atol=10 * tol, rtol=0)


def test_lsh_buckets_is_argmax_of_rotations_and_negations():
    qk = rand(2, 3, 40, 8, seed=1)
    rotations = rand(3, 8, 4, 5, seed=2)
    buckets = lsh_buckets(qk, n_buckets=10, n_hashes=4, rotations=rotations)
    rotated = torch.einsum("bhnd,hdrk->bhrnk", qk, rotations)
    assert buckets.dtype == torch.int64 and buckets.shape == (2, 3, 4, 40)
    assert torch.equal(buckets, torch.cat([rotated, -rotated], -1).argmax(-1))
    assert len(buckets.unique()) > 5  # both halves and many buckets are used


def bad_call(**overrides):
    args = dict(qk=torch.randn(1, 2, 10, 8), v=torch.randn(1, 2, 10, 8), bucket_size=4, n_hashes=2)
    args.update(overrides)
    return lsh_attention(args.pop("qk"), args.pop("v"), **args)


@pytest.mark.parametrize("overrides,error,match", [
    (dict(v=torch.randn(1, 2, 11, 8)), ValueError, "qk and v must have the same shape"),
    (dict(v=torch.randn(1, 2, 10, 4)), ValueError, "qk and v must have the same shape"),
    (dict(qk=torch.randn(2, 10, 8), v=torch.randn(2, 10, 8)), ValueError, r"qk must have shape \(B, H, N, D\)"),
    (dict(v=torch.randn(1, 2, 10, 8, dtype=torch.float64)), TypeError, "share one dtype"),
    (dict(qk=torch.ones(1, 2, 10, 8, dtype=torch.long)), TypeError, "floating-point"),
    (dict(bucket_size=0), ValueError, "bucket_size must be a positive int"),
    (dict(bucket_size=2.5), TypeError, "bucket_size must be a positive int"),
    (dict(bucket_size=True), TypeError, "bucket_size must be a positive int"),
    (dict(n_hashes="2"), TypeError, "n_hashes must be a positive int"),
    (dict(causal=True, causal_mode="window"), ValueError, "causal_mode must be one of"),
    (dict(causal_mode=None), ValueError, "causal_mode must be one of"),
    (dict(n_hashes=0), ValueError, "n_hashes must be a positive int"),
    (dict(key_padding_mask=torch.zeros(1, 9, dtype=torch.bool)), ValueError, r"key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.zeros(1, 10)), TypeError, "key_padding_mask must have dtype torch.bool"),
    (dict(rotations=torch.randn(2, 8, 3, 3)), ValueError, r"rotations must have shape \(H, D, n_hashes"),
    (dict(rotations=torch.randn(2, 8, 2)), ValueError, r"rotations must have shape \(H, D, n_hashes"),
    (dict(rotations=torch.randn(2, 8, 2, 3), seed=1), ValueError, "either rotations or seed"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_inputs_raise(overrides, error, match):
    with pytest.raises(error, match=match):
        bad_call(**overrides)


def test_lsh_buckets_bad_inputs_raise():
    qk, rotations = torch.randn(1, 2, 10, 8), torch.randn(2, 8, 3, 2)
    with pytest.raises(ValueError, match="n_buckets must be an even int"):
        lsh_buckets(qk, n_buckets=5, n_hashes=3, rotations=rotations)
    with pytest.raises(ValueError, match="rotations must have shape"):
        lsh_buckets(qk, n_buckets=6, n_hashes=3, rotations=rotations)
    with pytest.raises(ValueError, match="n_hashes must be a positive int"):
        lsh_buckets(qk, n_buckets=4, n_hashes=0, rotations=rotations)


def test_triton_backend_runs_the_triton_lsh_module_as_the_core(monkeypatch):
    """backend="triton" hands ``reformer.kernels.triton_lsh`` (here a stand-in that records its
    calls and delegates to the torch backend's core) to the shared multi-round Function as its
    round-level core."""
    calls = []
    reference = reformer.kernels.api._lsh_core("torch")  # the torch backend's round-level core
    fake = types.ModuleType("reformer.kernels.triton_lsh")
    fake.forward_round = lambda *a, **k: calls.append("fwd") or reference.forward_round(*a, **k)
    fake.backward_round = lambda *a, **k: calls.append("bwd") or reference.backward_round(*a, **k)
    monkeypatch.setitem(sys.modules, "reformer.kernels.triton_lsh", fake)
    monkeypatch.setattr(reformer.kernels, "triton_lsh", fake, raising=False)
    qk = rand(1, 2, 20, 8, dtype=torch.float32, seed=1).requires_grad_()
    v = rand(1, 2, 20, 8, dtype=torch.float32, seed=2)
    out = lsh_attention(qk, v, bucket_size=4, n_hashes=3, seed=0, backend="triton")
    out.sum().backward()
    assert calls == ["fwd"] * 3 + ["bwd"] * 3
    assert torch.equal(out, lsh_attention(qk, v, bucket_size=4, n_hashes=3, seed=0, backend="torch"))


# ------------------------------------------------------------------ slabs of the torch core
def _run_rounds(core, qk, v, mask, rotations, bucket_size, causal, causal_mode):
    """out, lse and the gradients (qk, v) of ``lsh_attention_rounds`` with ``core``."""
    x, y = (t.detach().requires_grad_() for t in (qk, v))
    if mask is not None:
        x, y = (t.detach().masked_fill(mask[:, None, :, None], 0.0).requires_grad_() for t in (x, y))
    out, lse = lsh_attention_rounds(x, y, core=core, bucket_size=bucket_size, causal=causal, causal_mode=causal_mode,
                                    key_padding_mask=mask, rotations=rotations, n_buckets=2 * rotations.shape[-1])
    finite = torch.isfinite(lse)
    g_out, g_lse = rand(*out.shape, seed=11), rand(*lse.shape, seed=12).masked_fill(~finite, 0.0)
    return [out, lse, *torch.autograd.grad((out, lse), (x, y), (g_out, g_lse))]


MODES = [(False, "chunk"), (True, "chunk"), (True, "bucket")]


@pytest.mark.parametrize("causal,causal_mode", MODES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("n,bucket_size", [(100, 8), (9, 16), (37, 4), (64, 16)])
@pytest.mark.parametrize("chunks_per_slab", [1, 3])
def test_slab_size_does_not_change_results(causal, causal_mode, padded, n, bucket_size, chunks_per_slab,
                                           monkeypatch):
    """The torch core in slabs of one or three chunks (chunk ranges of one group, or several whole
    groups when a group has no more chunks than that) equals one slab over all groups."""
    qk, v = rand(2, 3, n, 8, seed=1), rand(2, 3, n, 8, seed=2)
    mask = random_mask(2, n, seed=3) if padded else None
    rotations = rand(3, 8, 3, max(1, -(-n // bucket_size)), dtype=torch.float32, seed=4)
    args = (qk, v, mask, rotations, bucket_size, causal, causal_mode)
    whole = _run_rounds(ref_lsh, *args)
    monkeypatch.setattr(ref_lsh, "SLAB_LOGITS_BYTES", chunks_per_slab * bucket_size * 2 * bucket_size * 8)
    slabbed = _run_rounds(ref_lsh, *args)
    for name, got, want in zip(("out", "lse", "dqk", "dv"), slabbed, whole):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("causal,causal_mode", MODES)
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("group_slab_bytes", [None, 1], ids=["one-slab", "group-per-slab"])
def test_round_level_torch_core_equals_the_sorted_core_adapter(causal, causal_mode, padded, group_slab_bytes,
                                                               monkeypatch):
    """``ref_lsh`` as a round-level core (rows read through the order) and the generic adapter
    around its sorted core (whole groups gathered into sorted order) give the same results."""
    if group_slab_bytes is not None:
        monkeypatch.setattr("reformer.kernels.lsh_function.GROUP_SLAB_BYTES", group_slab_bytes)
    n, bucket_size = 45, 4
    qk, v = rand(2, 2, n, 8, seed=5), rand(2, 2, n, 8, seed=6)
    mask = random_mask(2, n, seed=7) if padded else None
    rotations = rand(2, 8, 2, 6, dtype=torch.float32, seed=8)
    args = (qk, v, mask, rotations, bucket_size, causal, causal_mode)
    for name, got, want in zip(("out", "lse", "dqk", "dv"), _run_rounds(ref_lsh, *args),
                               _run_rounds(SortedCoreAdapter(ref_lsh), *args)):
        assert torch.equal(torch.isfinite(got), torch.isfinite(want)), name
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0, msg=name)
