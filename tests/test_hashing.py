"""LSH hashing (docs/lsh.md, "Hashing"): plain and factorised buckets, the default rule, seeds."""
from __future__ import annotations

import math

import pytest
import torch

from reformer.kernels import default_n_buckets, dense_shared_qk_attention, hashing, lsh_attention, lsh_buckets


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def by_hand(qk, rotations, factors=None):
    """Buckets from the definition, one position, head and round at a time (tiny inputs only)."""
    b, h, n, _ = qk.shape
    r = rotations.shape[2]
    out = torch.empty(b, h, r, n, dtype=torch.int64)
    for bi in range(b):
        for hi in range(h):
            for ri in range(r):
                for i in range(n):
                    x = qk[bi, hi, i] @ rotations[hi, :, ri]  # (W,)
                    if factors is None:
                        out[bi, hi, ri, i] = int(torch.cat([x, -x]).argmax())
                    else:  # factor j's columns follow factor j-1's; ids in mixed radix
                        bucket, col = 0, 0
                        for f in factors:
                            xj = x[col:col + f // 2]
                            bucket = bucket * f + int(torch.cat([xj, -xj]).argmax())
                            col += f // 2
                        out[bi, hi, ri, i] = bucket
    return out


@pytest.mark.parametrize("n_buckets", [2, 6, 10])
def test_plain_buckets_equal_the_definition(n_buckets):
    qk, rotations = rand(2, 3, 9, 5, seed=1), rand(3, 5, 2, n_buckets // 2, seed=2)
    got = lsh_buckets(qk, n_buckets=n_buckets, n_hashes=2, rotations=rotations)
    assert got.dtype == torch.int64 and got.shape == (2, 3, 2, 9)
    assert torch.equal(got, by_hand(qk, rotations))


@pytest.mark.parametrize("factors", [(2, 2), (4, 6), (8, 2), (4, 6, 2), (2, 4, 6), (6, 6, 6)])
def test_factorised_buckets_equal_the_definition(factors):
    width = sum(factors) // 2
    qk, rotations = rand(2, 2, 23, 4, seed=3), rand(2, 4, 3, width, seed=4)
    got = lsh_buckets(qk, n_buckets=factors, n_hashes=3, rotations=rotations)
    want = by_hand(qk, rotations, factors)
    assert torch.equal(got, want)
    assert int(got.min()) >= 0 and int(got.max()) < math.prod(factors)
    # every factor's digit varies: not a degenerate use of one of them
    for j in range(len(factors)):
        digit = got // math.prod(factors[j + 1:]) % factors[j]
        assert len(digit.unique()) > 1, j


def test_hashing_in_slabs_equals_one_slab(monkeypatch):
    qk, rotations = rand(1, 2, 37, 6, seed=5), rand(2, 6, 2, 5, seed=6)
    whole = lsh_buckets(qk, n_buckets=(4, 6), n_hashes=2, rotations=rotations)
    whole3 = lsh_buckets(qk, n_buckets=(2, 4, 4), n_hashes=2, rotations=rotations)
    monkeypatch.setattr(hashing, "HASH_SLAB_BYTES", 1)  # one position per slab
    assert torch.equal(lsh_buckets(qk, n_buckets=(4, 6), n_hashes=2, rotations=rotations), whole)
    assert torch.equal(lsh_buckets(qk, n_buckets=(2, 4, 4), n_hashes=2, rotations=rotations), whole3)


def test_half_inputs_hash_in_float32():
    qk, rotations = rand(1, 2, 40, 8, dtype=torch.float32, seed=7).half(), rand(2, 8, 2, 3, dtype=torch.float32)
    half = lsh_buckets(qk, n_buckets=(2, 4), n_hashes=2, rotations=rotations)
    assert torch.equal(half, lsh_buckets(qk.float(), n_buckets=(2, 4), n_hashes=2, rotations=rotations))


@pytest.mark.parametrize("n,bucket_size,expected", [
    (1, 64, 2), (64, 64, 2), (65, 64, 4), (8192, 64, 256), (8193, 64, (18, 16)), (32768, 64, (32, 32)),
    (65536, 64, (46, 46)), (131072, 64, (64, 64)), (131073, 64, (18, 16, 16)), (1 << 20, 64, (32, 32, 32)),
    (1 << 22, 64, (52, 52, 50)), (100, 1, 200), (300, 1, (26, 24)), (5000, 1, (22, 22, 22)),
])
def test_default_rule(n, bucket_size, expected):
    got = default_n_buckets(n, bucket_size)
    assert got == expected
    m = 2 * -(-n // bucket_size)
    if isinstance(got, tuple):  # factorised beyond the threshold: at least m buckets, factors near the root
        k = len(got)
        assert k == (2 if m <= hashing.THREE_FACTORS_ABOVE else 3) and m > hashing.FACTORISE_ABOVE
        assert math.prod(got) >= m and all(f % 2 == 0 for f in got)
        assert max(got) - min(got) <= 2 and min(got) >= m ** (1 / k) - 2
    else:
        assert got == m <= hashing.FACTORISE_ABOVE


def test_default_rule_is_used_and_rotations_have_the_factorised_width(monkeypatch):
    """Past the thresholds lsh_attention draws (H, D, R, sum(n_i)/2) rotations and hashes factorised."""
    seen = {}
    real = hashing.hash_buckets

    def spy(qk, rotations, n_buckets=None, **kw):
        seen.update(shape=tuple(rotations.shape), n_buckets=n_buckets)
        return real(qk, rotations, n_buckets, **kw)

    monkeypatch.setattr("reformer.kernels.lsh_function.hash_buckets", spy)
    qk = rand(1, 2, 600, 4, dtype=torch.float32)
    lsh_attention(qk, qk, bucket_size=2, n_hashes=3, seed=0)  # m = 600 > 256 -> (26, 24)
    assert seen == {"shape": (2, 4, 3, 25), "n_buckets": (26, 24)}
    assert default_n_buckets(600, 2) == (26, 24)
    qk = rand(1, 2, 2100, 4, dtype=torch.float32)
    lsh_attention(qk, qk, bucket_size=1, n_hashes=2, seed=0)  # m = 4200 > 4096 -> three factors (18, 16, 16)
    assert seen == {"shape": (2, 4, 2, 25), "n_buckets": (18, 16, 16)}


@pytest.mark.parametrize("n_buckets", [4, (2, 4)])
def test_given_rotations_equal_seeded_and_global_rng_rotations(n_buckets):
    qk, v = rand(1, 2, 50, 8, dtype=torch.float32, seed=1), rand(1, 2, 50, 8, dtype=torch.float32, seed=2)
    run = lambda **kw: lsh_attention(qk, v, bucket_size=8, n_hashes=2, n_buckets=n_buckets, **kw)
    rotations = hashing.make_rotations(2, 8, 2, n_buckets, seed=3, device=qk.device)
    assert torch.equal(run(seed=3), run(rotations=rotations))
    assert not torch.equal(run(seed=3), run(seed=4))
    torch.manual_seed(5)
    first = run()
    torch.manual_seed(5)
    drawn = torch.randn(rotations.shape)
    assert torch.equal(first, run(rotations=drawn))  # global RNG: the same draw as torch.randn


@pytest.mark.parametrize("n_buckets", [2, (2, 2), (4, 2), (2, 4, 2)])
@pytest.mark.parametrize("causal", [False, True])
def test_one_chunk_equals_full_attention_with_either_scheme(n_buckets, causal):
    n = 23
    qk = rand(1, 2, n, 8, seed=1).requires_grad_()
    v = rand(1, 2, n, 8, seed=2).requires_grad_()
    out = lsh_attention(qk, v, bucket_size=n, n_hashes=2, n_buckets=n_buckets, causal=causal,
                        causal_mode="chunk", seed=3)
    ref = dense_shared_qk_attention(qk, v, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    g = rand(*out.shape, seed=9)
    for got, want in zip(torch.autograd.grad(out, (qk, v), g), torch.autograd.grad(ref, (qk, v), g)):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_neighbour_recall_is_high_for_few_buckets_and_falls_with_more():
    x = rand(300, 16, dtype=torch.float32, seed=1)
    one = hashing.neighbour_recall(x, 2, n_hashes=2, k=4)
    many = hashing.neighbour_recall(x, 64, n_hashes=2, k=4)
    assert 0.5 < one <= 1.0 and 0.0 <= many < one
    # same points with their neighbours planted next to them: recall rises
    planted = torch.cat([x, x + 1e-3 * rand(300, 16, dtype=torch.float32, seed=2)])
    assert hashing.neighbour_recall(planted, 64, n_hashes=2, k=1) > many


@pytest.mark.parametrize("n_buckets,error,match", [
    (5, ValueError, "n_buckets must be an even int >= 2"),
    (0, ValueError, "n_buckets must be an even int >= 2"),
    (-2, ValueError, "n_buckets must be an even int >= 2"),
    (4.0, TypeError, "n_buckets must be None, an even int"),
    (True, TypeError, "n_buckets must be None, an even int"),
    ("8", TypeError, "n_buckets must be None, an even int"),
    ((4,), ValueError, r"2 or 3 factors"),
    ((4, 4, 4, 4), ValueError, r"2 or 3 factors"),
    ((4, 4, 3), ValueError, r"n_buckets\[2\] must be an even int >= 2"),
    ((3, 4), ValueError, r"n_buckets\[0\] must be an even int >= 2"),
    ((4, 0), ValueError, r"n_buckets\[1\] must be an even int >= 2"),
    ((4, 2.0), TypeError, r"n_buckets\[1\] must be an even int >= 2"),
])
def test_bad_n_buckets_raise_named_errors(n_buckets, error, match):
    qk = torch.randn(1, 2, 10, 8)
    with pytest.raises(error, match=match):
        lsh_attention(qk, qk, bucket_size=4, n_hashes=2, n_buckets=n_buckets, seed=0)
    with pytest.raises(error, match=match):
        lsh_buckets(qk, n_buckets=n_buckets, n_hashes=2, rotations=torch.randn(2, 8, 2, 2))


def test_rotations_must_match_n_buckets():
    qk = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match=r"rotations must have shape \(H, D, n_hashes, W\)"):
        lsh_attention(qk, qk, bucket_size=4, n_hashes=2, n_buckets=(4, 6), rotations=torch.randn(2, 8, 2, 4))
    with pytest.raises(ValueError, match=r"rotations must have shape \(H, D, n_hashes, W\)"):
        lsh_buckets(qk, n_buckets=8, n_hashes=2, rotations=torch.randn(2, 8, 2, 5))
    # the factorised width is accepted
    out = lsh_attention(qk, qk, bucket_size=4, n_hashes=2, n_buckets=(4, 6), rotations=torch.randn(2, 8, 2, 5))
    assert out.shape == qk.shape
