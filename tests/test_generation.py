"""Cached incremental decoding (LSH "bucket" mode and full attention), dense LSH weights, sampling
options of generate (greedy, top-k, top-p, eos/pad, tiny temperatures, cropping)."""
import dataclasses
import json
import math

import pytest
import torch

from reformer import LSHSelfAttention, ReformerConfig, ReformerLM
from reformer.config import default_n_buckets
from reformer.generation import SamplingOptions, sample_next, sampling_options
from reformer.kernels import lsh_attention, lsh_buckets
from reformer.lsh_attention import draw_rotations, lsh_attention_weights

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=32, d_model=32, n_heads=4, depth=2, d_ff=64, max_seq_len=48, bucket_size=4,
            n_hashes=2, ff_chunks=3, axial_shape=(6, 8), n_buckets=4, causal_mode="bucket")


def naive_bucket_attention(qk, v, buckets, bucket_size):
    """Causal "bucket" mode written out per query: per round the last bucket_size - 1 earlier
    positions of the query's bucket; one softmax over all rounds' keys (with multiplicity);
    the query's own value when it has no such key. (B, H, N, D)."""
    b, h, n, d = qk.shape
    keys = qk / qk.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    out = torch.empty_like(v)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                chosen = []
                for r in range(buckets.shape[2]):
                    same = [j for j in range(i) if buckets[bi, hi, r, j] == buckets[bi, hi, r, i]]
                    chosen += same[max(0, len(same) - (bucket_size - 1)):] if bucket_size > 1 else []
                if not chosen:
                    out[bi, hi, i] = v[bi, hi, i]
                    continue
                logits = torch.stack([qk[bi, hi, i] @ keys[bi, hi, j] for j in chosen]) / math.sqrt(d)
                out[bi, hi, i] = torch.softmax(logits, 0) @ v[bi, hi, chosen]
    return out


def inputs(b=2, h=2, n=21, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, n, d, generator=g, dtype=dtype), torch.randn(b, h, n, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("bucket_size, n_buckets", [(3, 4), (1, 2), (64, 2), (4, (2, 4))])
def test_dense_bucket_weights_match_the_per_query_definition(bucket_size, n_buckets):
    qk, v = inputs()
    rotations = draw_rotations(2, 8, 3, n_buckets, seed=1, device=qk.device)
    weights = lsh_attention_weights(qk, bucket_size=bucket_size, n_hashes=3, n_buckets=n_buckets, rotations=rotations,
                                    causal=True, causal_mode="bucket")
    buckets = lsh_buckets(qk, n_buckets=n_buckets, n_hashes=3, rotations=rotations)
    expected = naive_bucket_attention(qk, v, buckets, bucket_size)
    torch.testing.assert_close(weights @ v, expected)
    assert torch.all(weights.triu(1) == 0)  # causal
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 21, dtype=torch.float64))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [7, 24])
def test_dense_chunk_weights_times_v_equal_the_kernel(causal, n):
    qk, v = inputs(n=n)
    rotations = draw_rotations(2, 8, 2, 4, seed=3, device=qk.device)
    mask = torch.arange(n)[None, :] >= torch.tensor([n, n - 3])[:, None]
    weights = lsh_attention_weights(qk, bucket_size=4, n_hashes=2, n_buckets=4, rotations=rotations, causal=causal,
                                    causal_mode="chunk", key_padding_mask=mask)
    out = lsh_attention(qk, v, bucket_size=4, n_hashes=2, causal=causal, key_padding_mask=mask, rotations=rotations,
                        causal_mode="chunk", n_buckets=4, backend="torch")
    torch.testing.assert_close(weights @ v, out)
    assert torch.all(weights[1, :, n - 3:] == 0) and torch.all(weights[1, :, :, n - 3:] == 0)


def test_lsh_module_bucket_mode_matches_the_per_query_definition():
    torch.manual_seed(0)
    attn = LSHSelfAttention(16, 2, bucket_size=3, n_hashes=2, causal=True, seed=4, n_buckets=(2, 4),
                           causal_mode="bucket").double().eval()
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    with torch.no_grad():
        qk, v = attn._project(x)
        rotations = draw_rotations(2, 8, 2, (2, 4), seed=4, device=x.device)
        buckets = lsh_buckets(qk, n_buckets=(2, 4), n_hashes=2, rotations=rotations)
        expected = naive_bucket_attention(qk, v, buckets, 3)
        expected = attn.out_proj(expected.transpose(1, 2).reshape(2, 13, 16))
        torch.testing.assert_close(attn(x), expected)


def cached_logits(model, tokens, prefill):
    """Logits (B, N, V) from a prefill of ``prefill`` tokens then one cached step per token."""
    cache = model.new_cache(tokens.shape[1])
    pieces = [model(tokens[:, :prefill], cache=cache)]
    for i in range(prefill, tokens.shape[1]):
        pieces.append(model(tokens[:, i:i + 1], cache=cache))
    assert cache.length == tokens.shape[1]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("attention, n_buckets", [("lsh", 4), ("lsh", (2, 4)), ("full", 4)])
@pytest.mark.parametrize("reversible", [True, False])
def test_cached_decoding_equals_one_full_forward(attention, n_buckets, reversible):
    torch.manual_seed(0)
    config = ReformerConfig(**{**TINY, "n_buckets": n_buckets}, attention=attention, reversible=reversible, seed=7)
    model = ReformerLM(config).double().eval()
    tokens = torch.randint(0, 32, (2, 40))
    with torch.no_grad():
        full = model(tokens)
        for prefill in (1, 17):
            torch.testing.assert_close(cached_logits(model, tokens, prefill), full)


def test_cached_decoding_with_sinusoidal_positions_and_no_seed_uses_the_cache_rotations():
    torch.manual_seed(0)
    config = ReformerConfig(**{**TINY, "axial_shape": None}, attention="lsh")  # seed=None: rotations per cache
    model = ReformerLM(config).double().eval()
    tokens = torch.randint(0, 32, (2, 30))
    with torch.no_grad():
        cache = model.new_cache(30)
        whole = model(tokens, cache=cache)
        cached = cached_logits_like(model, tokens, cache)
    torch.testing.assert_close(cached, whole)


def cached_logits_like(model, tokens, like):
    cache = model.new_cache(tokens.shape[1], like=like)
    pieces = [model(tokens[:, :5], cache=cache)]
    pieces += [model(tokens[:, i:i + 1], cache=cache) for i in range(5, tokens.shape[1])]
    return torch.cat(pieces, dim=1)


def test_cache_errors():
    model = ReformerLM(ReformerConfig(**TINY, attention="lsh")).eval()
    cache = model.new_cache(8)
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="one new position per call"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="cache holds 8 of 8"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match="key_padding_mask cannot be combined"):
            model(torch.zeros(1, 1, dtype=torch.long), cache=model.new_cache(), key_padding_mask=torch.zeros(1, 1).bool())
    with pytest.raises(ValueError, match="capacity must be <= max_seq_len=48"):
        model.new_cache(49)
    chunk = ReformerLM(ReformerConfig(**{**TINY, "causal_mode": "chunk"}, attention="lsh"))
    with pytest.raises(ValueError, match="cached decoding needs"):
        chunk.new_cache()


@pytest.mark.parametrize("attention", ["lsh", "full"])
def test_generate_cached_equals_uncached_and_slides_past_max_seq_len(attention):
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, attention=attention)).double()
    prompt = torch.randint(0, 32, (2, 40))  # 40 + 12 > max_seq_len = 48: the window slides
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(3)  # same LSH rotations for both calls
        runs.append(model.generate(prompt, 12, do_sample=False, use_cache=use_cache))
    assert runs[0].shape == (2, 52) and torch.equal(runs[0], runs[1])
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        generator = torch.Generator().manual_seed(1)
        sampled.append(model.generate(prompt, 12, top_k=4, use_cache=use_cache, generator=generator))
    assert torch.equal(sampled[0], sampled[1])


def test_generate_greedy_equals_argmax_of_full_forwards():
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, attention="lsh", seed=2)).double()
    prompt = torch.randint(0, 32, (3, 9))
    out = model.generate(prompt, 6, temperature=0.0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model.eval()(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, tokens)
    assert torch.equal(model.generate(prompt, 6, do_sample=False), out)
    assert torch.equal(model.generate(prompt, 6, temperature=1e-45, generator=torch.Generator().manual_seed(0)), out)


def test_generate_eos_pads_finished_sequences_and_stops_when_all_are_done():
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, attention="full"))
    prompt = torch.randint(0, 32, (2, 5))
    free = model.generate(prompt, 8, do_sample=False)
    eos = int(free[0, 7])  # the third new token of row 0
    out = model.generate(prompt, 8, do_sample=False, eos_token_id=eos, pad_token_id=31)
    first = int((free[0, 5:] == eos).nonzero()[0])  # row 0 stops at its first eos
    assert torch.equal(out[0, :5 + first + 1], free[0, :5 + first + 1])
    assert torch.all(out[0, 5 + first + 1:] == 31)
    hits = (free[1, 5:] == eos).nonzero()
    if len(hits):  # row 1 finished too: the loop stopped at the later of the two
        assert out.shape[1] == 5 + max(first, int(hits[0])) + 1
    else:
        assert out.shape[1] == 13 and torch.equal(out[1], free[1])
    all_done = model.generate(prompt, 8, do_sample=False, eos_token_id=int(free[0, 5]))
    assert all_done.shape[1] <= 13 and torch.all(all_done[0, 6:] == int(free[0, 5]))  # pad defaults to eos


def test_generate_edge_cases():
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, attention="lsh"))
    prompt = torch.randint(0, 32, (2, 60))  # longer than max_seq_len: the model sees the last 48
    assert torch.equal(model.generate(prompt, 0), prompt)
    out = model.generate(prompt.int(), 3)
    assert out.shape == (2, 63) and out.dtype == torch.int64 and torch.equal(out[:, :60], prompt)
    empty = torch.zeros(0, 4, dtype=torch.long)
    assert model.generate(empty, 3).shape == (0, 4)
    with pytest.raises(ValueError, match="tokens must hold at least one sequence"):
        model.loss(empty)
    for kwargs, error, message in [
        (dict(top_p=0.0), ValueError, "top_p must be in"), (dict(top_p=1.5), ValueError, "top_p must be in"),
        (dict(top_p="0.5"), TypeError, "top_p must be a number"), (dict(do_sample=1), TypeError, "do_sample"),
        (dict(eos_token_id=32), ValueError, "eos_token_id must be in"), (dict(pad_token_id=1.0), TypeError, "pad"),
        (dict(temperature=float("inf")), ValueError, "temperature must be finite"),
        (dict(temperature="1"), TypeError, "temperature must be a number"),
        (dict(use_cache=None), TypeError, "use_cache must be a bool"),
    ]:
        with pytest.raises(error, match=message):
            model.generate(prompt, 2, **kwargs)


def options(**kwargs):
    return sampling_options(6, max_new_tokens=1, **kwargs)


def test_sample_next_top_k_top_p_and_tiny_temperatures():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0, 2.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, options(top_k=2, generator=g)).tolist()) == {1, 2}
    probs = torch.softmax(logits[0], 0)
    nucleus = probs.sort(descending=True).values.cumsum(0)  # 1, 2, 5 reach 0.84 > 0.8; 1, 2 alone do not
    assert nucleus[1] < 0.8 < nucleus[2]
    assert set(sample_next(logits, options(top_p=0.8, generator=g)).tolist()) == {1, 2, 5}
    assert set(sample_next(logits, options(top_p=1e-9, generator=g)).tolist()) == {1}
    for t in (1e-45, 1e-300, 5e-324):
        assert torch.all(sample_next(logits, options(temperature=t, generator=g)) == 1)
    tie = torch.tensor([[1.0, 5.0, 5.0, 0.0, 0.0, 0.0]]).repeat(400, 1)
    assert set(sample_next(tie, options(temperature=1e-45, generator=g)).tolist()) == {1, 2}
    assert isinstance(options(), SamplingOptions) and options(temperature=0).greedy
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampling_options(6, max_new_tokens=-1)
    with pytest.raises(TypeError, match="max_new_tokens"):
        sampling_options(6, max_new_tokens=2.0)


def test_generate_restores_training_mode_and_config_records_the_hashing_scheme():
    config = ReformerConfig(**{**TINY, "n_buckets": None}, attention="lsh")
    assert config.n_buckets == default_n_buckets(48, 4) and config.causal_mode == "bucket"  # from max_seq_len
    assert ReformerConfig(**{**TINY, "n_buckets": [2, 4]}).n_buckets == (2, 4)
    model = ReformerLM(dataclasses.replace(config, n_buckets=6)).train()
    assert model.layers.blocks[1].f.fn.n_buckets == 6 and model.layers.blocks[1].f.fn.causal_mode == "bucket"
    model.generate(torch.zeros(1, 3, dtype=torch.long), 2)
    assert model.training


def test_generate_benchmark_quick_smoke(tmp_path, capsys):
    from benchmarks.generate import main

    path = tmp_path / "generate.json"
    assert main(["--quick", "--prompt-len", "40", "--new-tokens", "4", "--json", str(path)]) == 0
    result = json.loads(path.read_text())
    assert result["prompt_len"] == 40 and result["new_tokens"] == 4 and result["uncached_tokens"] == 2
    assert result["cached_ms_per_token"] > 0 and result["uncached_ms_per_token"] > 0
    out = capsys.readouterr().out
    assert "cached" in out and "uncached" in out and "speedup" in out
    with pytest.raises(SystemExit):
        main(["--quick", "--new-tokens", "0"])


def test_chunk_mode_generates_uncached_with_plain_forwards():
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**{**TINY, "causal_mode": "chunk"}, attention="lsh", seed=4)).double().eval()
    assert not model.supports_cache()
    prompt = torch.randint(0, 32, (2, 7))
    out = model.generate(prompt, 5, do_sample=False)  # use_cache=True falls back to full forwards
    tokens = prompt
    with torch.no_grad():
        for _ in range(5):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, tokens)
