"""ReformerConfig validation and presets; ReformerLM training, generation, weight moves between
reversible and plain, causality, padding and argument checks."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from reformer import (AxialPositionalEncoding, ChunkedFeedForward, FeedForward, ReformerConfig, ReformerLM,
                      SinusoidalPositionalEncoding)

TINY = dict(vocab_size=32, d_model=32, n_heads=4, depth=2, d_ff=64, max_seq_len=48, bucket_size=8,
            n_hashes=2, ff_chunks=3, axial_shape=(6, 8))


pytestmark = pytest.mark.usefixtures("one_thread")


def progressions(generator, batch, n, vocab=32):
    """Rows ``start + step * i (mod vocab)`` with a per-row step in 1..3: the next token needs two
    previous ones."""
    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    step = torch.randint(1, 4, (batch, 1), generator=generator)
    return (start + step * torch.arange(n)) % vocab


def test_lsh_reversible_axial_chunked_lm_trains_and_generates():
    torch.manual_seed(0)
    config = ReformerConfig(**TINY, attention="lsh", reversible=True, dropout=0.05)
    model = ReformerLM(config)
    assert isinstance(model.pos_enc, AxialPositionalEncoding)
    assert isinstance(model.layers.blocks[0].g.fn, ChunkedFeedForward)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        loss = model.loss(progressions(data, 8, 48))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0  # about ln(32) at the start
    assert sum(losses[-5:]) / 5 < 0.4 * losses[0]

    prompt = progressions(data, 2, 10)
    out = model.generate(prompt, 8, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 18) and out.dtype == torch.int64
    assert torch.equal(out[:, :10], prompt)
    assert out.min() >= 0 and out.max() < config.vocab_size
    assert model.training  # generate restored the mode


@pytest.mark.parametrize("attention", ["lsh", "full"])
def test_reversible_state_dict_loads_into_plain(attention):
    torch.manual_seed(0)
    config = ReformerConfig(**TINY, attention=attention, reversible=True, dropout=0.1)
    rev = ReformerLM(config).double()
    plain = ReformerLM(dataclasses.replace(config, reversible=False)).double()
    plain.load_state_dict(rev.state_dict())  # strict: identical keys
    tokens = torch.randint(0, 32, (2, 21))
    for mode in ("eval", "train"):
        getattr(rev, mode)(), getattr(plain, mode)()
        for output in ("forward", "loss"):
            torch.manual_seed(3)
            out_rev = getattr(rev, output)(tokens)
            torch.manual_seed(3)
            out_plain = getattr(plain, output)(tokens)
            assert torch.equal(out_rev, out_plain)


def test_lsh_model_trains_under_bf16_autocast():
    """Loss + backward under CPU bf16 autocast (chunked feed-forward, LSH, reversible); the
    reversible recompute replays the forward's autocast state, so its gradients equal those of
    the plain two-stream network run the same way."""
    torch.manual_seed(0)
    config = ReformerConfig(**TINY, attention="lsh", reversible=True)
    rev = ReformerLM(config)
    plain = ReformerLM(dataclasses.replace(config, reversible=False))
    plain.load_state_dict(rev.state_dict())
    tokens = torch.randint(0, 32, (2, 24))
    grads = []
    for model in (rev, plain):
        torch.manual_seed(3)  # same LSH rotations in both
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(tokens)
        loss.backward()
        assert torch.isfinite(loss) and 3.0 < loss.item() < 4.5  # about ln(32) at the start
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reversible", [True, False])
def test_full_attention_model_is_causal(reversible):
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, attention="full", reversible=reversible)).eval()
    tokens = torch.randint(0, 32, (2, 17))
    changed = tokens.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % 32
    logits, logits_changed = model(tokens), model(changed)
    torch.testing.assert_close(logits[:, :12], logits_changed[:, :12], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 12:], logits_changed[:, 12:])


@pytest.mark.parametrize("attention", ["lsh", "full"])
def test_padded_tokens_do_not_change_other_logits(attention):
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, attention=attention, causal=False)).eval()
    tokens = torch.randint(0, 32, (2, 19))
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[0, 14:] = True  # padding at the end of row 0
    changed = tokens.clone()
    changed[0, 14:] = (changed[0, 14:] + 7) % 32
    torch.manual_seed(5)
    logits = model(tokens, key_padding_mask=mask)
    torch.manual_seed(5)
    logits_changed = model(changed, key_padding_mask=mask)
    torch.testing.assert_close(logits[~mask], logits_changed[~mask], rtol=0, atol=1e-5)


def test_sinusoidal_positions_and_whole_feedforward():
    config = ReformerConfig(**{**TINY, "axial_shape": None, "ff_chunks": 1}, attention="full")
    model = ReformerLM(config)
    assert isinstance(model.pos_enc, SinusoidalPositionalEncoding)
    ff = model.layers.blocks[0].g.fn
    assert isinstance(ff, FeedForward) and not isinstance(ff, ChunkedFeedForward)
    tokens = torch.randint(0, 32, (3, 48))
    assert model(tokens).shape == (3, 48, 32)


@pytest.mark.parametrize("reversible", [True, False])
def test_empty_batch_gives_empty_logits(reversible):
    """B = 0 with full attention (LSH's empty batch is handled in kernels/, tested there)."""
    model = ReformerLM(ReformerConfig(**TINY, attention="full", reversible=reversible))
    tokens = torch.zeros(0, 5, dtype=torch.long)
    logits = model(tokens)
    assert logits.shape == (0, 5, 32) and logits.dtype == torch.float32
    logits.sum().backward()  # also through the reversible Function and the chunked feed-forward
    assert all(p.grad is not None and not p.grad.any() for p in model.layers.parameters())


def test_loss_is_next_token_cross_entropy():
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, attention="full")).eval()
    tokens = torch.randint(0, 32, (2, 9))
    logits = model(tokens)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(model.loss(tokens), expected)


def test_generate_greedy_and_reproducible():
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, attention="full"))
    prompt = torch.randint(0, 32, (2, 45))  # runs past max_seq_len=48: the context window slides
    greedy = model.generate(prompt, 6, top_k=1)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            next_token = model.eval()(tokens[:, -48:])[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], 1)
    assert torch.equal(greedy, tokens)
    sample = [model.generate(prompt, 5, temperature=2.0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(sample[0], sample[1])
    assert model.generate(prompt, 0).shape == prompt.shape


def test_lsh_seed_makes_eval_and_generate_reproducible():
    torch.manual_seed(0)
    config = ReformerConfig(**TINY, attention="lsh", dropout=0.1)
    unseeded = ReformerLM(config).eval()
    seeded = ReformerLM(dataclasses.replace(config, seed=11)).eval()
    seeded.load_state_dict(unseeded.state_dict())
    blocks = seeded.layers.blocks
    assert [b.f.fn.seed for b in blocks] == [11, 12] and unseeded.layers.blocks[0].f.fn.seed is None
    prompt = torch.randint(0, 32, (2, 20))
    with torch.no_grad():
        assert not torch.equal(unseeded(prompt), unseeded(prompt))  # fresh rotations per call
        assert torch.equal(seeded(prompt), seeded(prompt))
    samples = []
    for global_seed in (1, 2):  # a different global RNG state for each call
        torch.manual_seed(global_seed)
        samples.append(seeded.generate(prompt, 6, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(samples[0], samples[1])
    seeded.train()
    torch.manual_seed(3)
    first = seeded(prompt)
    assert not torch.equal(first, seeded(prompt))  # training still draws fresh rotations and dropout


BAD_CONFIGS = [
    (dict(n_heads=3), ValueError, "divisible by n_heads"),
    (dict(axial_shape=(4, 8)), ValueError, "fewer than max_seq_len"),
    (dict(ff_chunks=0), ValueError, "ff_chunks"),
    (dict(d_model=33, n_heads=3), ValueError, "divisible by len\\(axial_shape\\)"),
    (dict(attention="sparse"), ValueError, "attention must be one of"),
    (dict(bucket_size=0), ValueError, "bucket_size"),
    (dict(n_hashes=0), ValueError, "n_hashes"),
    (dict(depth=0), ValueError, "depth"),
    (dict(vocab_size=-1), ValueError, "vocab_size"),
    (dict(max_seq_len=1.5), TypeError, "max_seq_len must be a positive int"),
    (dict(n_buckets=7), ValueError, "n_buckets entries must be even"),
    (dict(n_buckets=(4, 4, 4, 4)), ValueError, "tuple of 2 or 3"),
    (dict(n_buckets="8"), TypeError, "n_buckets must be an even int"),
    (dict(causal_mode="window"), ValueError, "causal_mode must be one of"),
    (dict(dropout=1.0), ValueError, "dropout"),
    (dict(dropout="0.1"), TypeError, "dropout"),
    (dict(reversible="yes"), TypeError, "reversible must be a bool"),
    (dict(causal=None), TypeError, "causal must be a bool"),
    (dict(axial_shape=(48,)), ValueError, "at least 2"),
    (dict(axial_shape=(8, 0, 6)), ValueError, "axial_shape entries"),
    (dict(seed="1"), TypeError, "seed must be an int or None"),
    (dict(seed=True), TypeError, "seed must be an int or None"),
]


@pytest.mark.parametrize("overrides, error, message", BAD_CONFIGS)
def test_bad_config_raises(overrides, error, message):
    with pytest.raises(error, match=message):
        ReformerConfig(**{**TINY, **overrides})


def test_presets():
    for name in ("tiny", "small", "enwik8-like"):
        config = ReformerConfig.from_name(name)
        assert config.axial_shape is None or len(config.axial_shape) * config.axial_dims[0] == config.d_model
    assert ReformerConfig.from_name("tiny", depth=5).depth == 5
    assert ReformerConfig(axial_shape=[64, 64]).axial_shape == (64, 64)
    with pytest.raises(ValueError, match="unknown ReformerConfig preset"):
        ReformerConfig.from_name("huge")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ReformerConfig.from_name("tiny", d_model=66)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ReformerConfig.from_name("tiny").depth = 3


def test_bad_model_inputs_raise():
    model = ReformerLM(ReformerConfig(**TINY, attention="full"))
    with pytest.raises(TypeError, match="ReformerConfig"):
        ReformerLM(TINY)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 32\)"):
        model(torch.tensor([[1, 32]]))
    with pytest.raises(ValueError, match="longer than max_len=48"):
        model(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        model(torch.zeros(2, 4, dtype=torch.long), key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least 2 positions"):
        model.loss(torch.zeros(2, 1, dtype=torch.long))
    prompt = torch.zeros(1, 3, dtype=torch.long)
    for kwargs, message in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                            (dict(top_k=0), "top_k"), (dict(generator=3), "generator"),
                            (dict(max_new_tokens=1.5), "max_new_tokens must be a non-negative int"),
                            (dict(top_k=True), "top_k must be a positive int")]:
        kwargs = {"max_new_tokens": 2, **kwargs}
        with pytest.raises((ValueError, TypeError), match=message):
            model.generate(prompt, kwargs.pop("max_new_tokens"), **kwargs)
    encoder = ReformerLM(ReformerConfig(**TINY, attention="full", causal=False))
    with pytest.raises(ValueError, match="needs a causal model"):
        encoder.loss(torch.zeros(1, 4, dtype=torch.long))
