"""ReformerEncDec: learns sequence reversal, reversible gradients (memory included) equal plain
autograd, cached decoding equals a full decode, source padding, generate options, save/load,
earlier state_dict keys."""
import dataclasses

import pytest
import torch

from reformer import EncDecConfig, ReformerEncDec

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(src_vocab_size=12, tgt_vocab_size=12, d_model=32, n_heads=4, encoder_depth=2, decoder_depth=2,
             d_ff=64, max_src_len=12, max_tgt_len=16, bucket_size=4, n_hashes=2, ff_chunks=2)


def reversal_batch(generator, n, length=8):
    """Sources of ids 2..11; targets: BOS (1) then the source reversed."""
    src = torch.randint(2, 12, (n, length), generator=generator)
    return src, torch.cat([torch.ones(n, 1, dtype=torch.long), src.flip(1)], 1)


def test_learns_sequence_reversal():
    torch.manual_seed(0)
    config = EncDecConfig(**{**SMALL, "d_model": 64, "d_ff": 128, "max_src_len": 8, "max_tgt_len": 9,
                             "bucket_size": 8})
    model = ReformerEncDec(config)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    data = torch.Generator().manual_seed(1)
    for _ in range(90):
        loss = model.loss(*reversal_batch(data, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
    src, tgt = reversal_batch(data, 200)
    out = model.generate(src, 8, bos_token_id=1, do_sample=False)
    assert out.shape == (200, 9) and torch.all(out[:, 0] == 1)
    assert (out[:, 1:] == tgt[:, 1:]).float().mean() >= 0.95


@pytest.mark.parametrize("attention", ["lsh", "full"])
def test_reversible_gradients_equal_plain_autograd(attention):
    torch.manual_seed(0)
    config = EncDecConfig(**SMALL, attention=attention, dropout=0.1)
    rev = ReformerEncDec(config).double()
    plain = ReformerEncDec(dataclasses.replace(config, reversible=False)).double()
    plain.load_state_dict(rev.state_dict())
    src, tgt = torch.randint(0, 12, (2, 11)), torch.randint(0, 12, (2, 9))
    mask = torch.arange(11)[None, :] >= torch.tensor([11, 7])[:, None]
    losses = []
    for model in (rev, plain):
        torch.manual_seed(4)  # same dropout masks and LSH rotations
        losses.append(model.loss(src, tgt, mask))
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(rev.named_parameters(), plain.parameters()):
        assert b.grad is not None and a.grad is not None, name
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    assert rev.src_emb.weight.grad.abs().sum() > 0  # the encoder learns through the memory


@pytest.mark.parametrize("attention", ["lsh", "full"])
def test_cached_decoding_equals_a_full_decode_and_padding_is_ignored(attention):
    torch.manual_seed(0)
    model = ReformerEncDec(EncDecConfig(**SMALL, attention=attention, seed=3)).double().eval()
    src, tgt = torch.randint(0, 12, (2, 10)), torch.randint(0, 12, (2, 14))
    mask = torch.arange(10)[None, :] >= torch.tensor([10, 6])[:, None]
    with torch.no_grad():
        memory = model.encode(src, mask)
        full = model.decode(tgt, memory, mask)
        cache = model.new_cache(14)
        steps = [model.decode(tgt[:, :3], memory, mask, cache=cache)]
        steps += [model.decode(tgt[:, i:i + 1], memory, mask, cache=cache) for i in range(3, 14)]
        torch.testing.assert_close(torch.cat(steps, 1), full)
        changed = src.clone()
        changed[1, 6:] = (changed[1, 6:] + 1) % 12  # padded source positions
        torch.testing.assert_close(model(changed, tgt, mask)[1], model(src, tgt, mask)[1])


def test_generate_options_cache_and_save_load(tmp_path):
    torch.manual_seed(0)
    model = ReformerEncDec(EncDecConfig(**SMALL, seed=1))
    src = torch.randint(0, 12, (3, 10))
    cached = model.generate(src, 8, bos_token_id=1, do_sample=False)
    assert torch.equal(model.generate(src, 8, bos_token_id=1, do_sample=False, use_cache=False), cached)
    assert model.generate(src, 0, bos_token_id=1).shape == (3, 1)
    eos = int(cached[0, 2])
    stopped = model.generate(src, 8, bos_token_id=1, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.all(stopped[0, 3:] == 0) and torch.equal(stopped[0, :3], cached[0, :3])
    g = [torch.Generator().manual_seed(5) for _ in range(2)]
    assert torch.equal(model.generate(src, 6, bos_token_id=1, top_p=0.9, generator=g[0]),
                       model.generate(src, 6, bos_token_id=1, top_p=0.9, generator=g[1], use_cache=False))
    with pytest.raises(ValueError, match="max_tgt_len=16"):
        model.generate(src, 16, bos_token_id=1)
    with pytest.raises(ValueError, match="bos_token_id"):
        model.generate(src, 2, bos_token_id=12)
    model.save_pretrained(tmp_path)
    loaded = ReformerEncDec.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert torch.equal(loaded.generate(src, 8, bos_token_id=1, do_sample=False), cached)


def test_decoder_is_a_reversible_sequence_and_earlier_flat_decoder_keys_load():
    torch.manual_seed(0)
    model = ReformerEncDec(EncDecConfig(**SMALL, seed=2)).eval()
    assert any(k.startswith("decoder.blocks.1.f.cross_attn.") for k in model.state_dict())
    flat = {k.replace("decoder.blocks.", "decoder.", 1): v for k, v in model.state_dict().items()}
    assert any(k.startswith("decoder.1.f.cross_attn.") for k in flat)
    torch.manual_seed(1)
    other = ReformerEncDec(EncDecConfig(**SMALL, seed=2)).eval()
    src, tgt = torch.randint(0, 12, (2, 10)), torch.randint(0, 12, (2, 7))
    with torch.no_grad():
        assert not torch.allclose(other(src, tgt), model(src, tgt))
        other.load_state_dict(flat)  # strict
        torch.testing.assert_close(other(src, tgt), model(src, tgt), atol=0, rtol=0)


def test_bad_config_and_inputs():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        EncDecConfig(**{**SMALL, "n_heads": 3})
    with pytest.raises(ValueError, match="axial_shape"):
        EncDecConfig(**SMALL, axial_shape=(3, 4))
    with pytest.raises(TypeError, match="EncDecConfig"):
        ReformerEncDec(SMALL)
    model = ReformerEncDec(EncDecConfig(**SMALL, axial_shape=(4, 4)))
    with pytest.raises(ValueError, match="at least one sequence"):
        model.loss(torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="longer than max_len=12"):
        model(torch.zeros(1, 13, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))
