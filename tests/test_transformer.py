"""The seed's baseline Transformer against torch.nn, masks, causality, errors and a learning check."""
import pytest
import torch
from torch import nn

from reformer import (
    DecoderLayer, EncoderLayer, FeedForward, MultiHeadAttention, SinusoidalPositionalEncoding, TokenEmbedding,
    Transformer,
)

D, H, FF = 16, 4, 32


def _copy_mha(ours: MultiHeadAttention, theirs: nn.MultiheadAttention) -> None:
    ours.load_state_dict(MultiHeadAttention.from_torch(theirs).state_dict())


def _copy_ff(ours: FeedForward, layer) -> None:
    ours.w1.load_state_dict(layer.linear1.state_dict())
    ours.w2.load_state_dict(layer.linear2.state_dict())


@pytest.mark.parametrize("mode", ["plain", "padding", "causal", "both", "cross"])
def test_mha_matches_torch(mode):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(D, H, batch_first=True).eval()
    ours = MultiHeadAttention.from_torch(ref).eval()
    x = torch.randn(3, 7, D)
    ctx = torch.randn(3, 9, D) if mode == "cross" else x
    kpm = None
    if mode in ("padding", "both"):
        kpm = torch.zeros(3, 7, dtype=torch.bool)
        kpm[0, 5:] = True
        kpm[2, 3:] = True
    causal = mode in ("causal", "both")
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1) if causal else None
    with torch.no_grad():
        expected, _ = ref(x, ctx, ctx, key_padding_mask=kpm, attn_mask=mask, need_weights=False)
        got = ours(x, None if mode != "cross" else ctx, causal=causal, key_padding_mask=kpm)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_layer_matches_torch(norm_first):
    torch.manual_seed(1)
    ref = nn.TransformerEncoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    ours = EncoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first)
    _copy_mha(ours.self_attn, ref.self_attn)
    _copy_ff(ours.ff, ref)
    ours.res_attn.norm.load_state_dict(ref.norm1.state_dict())
    ours.res_ff.norm.load_state_dict(ref.norm2.state_dict())
    x = torch.randn(2, 6, D)
    kpm = torch.tensor([[False] * 4 + [True] * 2, [False] * 6])
    torch.testing.assert_close(ours(x, key_padding_mask=kpm), ref(x, src_key_padding_mask=kpm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    torch.manual_seed(2)
    ref = nn.TransformerDecoderLayer(D, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    ours = DecoderLayer(D, H, FF, dropout=0.0, norm_first=norm_first)
    _copy_mha(ours.self_attn, ref.self_attn)
    _copy_mha(ours.cross_attn, ref.multihead_attn)
    _copy_ff(ours.ff, ref)
    for mine, theirs in ((ours.res_self, ref.norm1), (ours.res_cross, ref.norm2), (ours.res_ff, ref.norm3)):
        mine.norm.load_state_dict(theirs.state_dict())
    tgt, mem = torch.randn(2, 5, D), torch.randn(2, 7, D)
    mem_kpm = torch.tensor([[False] * 6 + [True], [False] * 7])
    expected = ref(tgt, mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True,
                   memory_key_padding_mask=mem_kpm)
    got = ours(tgt, mem, memory_key_padding_mask=mem_kpm)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _small_model(**kw):
    torch.manual_seed(3)
    return Transformer(11, 13, d_model=D, n_heads=H, n_encoder_layers=2, n_decoder_layers=2, d_ff=FF,
                       dropout=0.0, max_len=32, **kw).double()


def test_decoder_is_causal():
    model = _small_model()
    src = torch.randint(0, 11, (1, 6))
    memory = model.encode(src)
    y = model.positions(model.tgt_embed(torch.randint(0, 13, (1, 7)))).detach().requires_grad_()
    out = model.decoder(y, memory)  # (1, 7, D)
    w = torch.randn(D, dtype=torch.float64)  # a plain sum would be constant after LayerNorm
    for i in range(7):
        (g,) = torch.autograd.grad(out[0, i] @ w, y, retain_graph=True)
        assert torch.count_nonzero(g[0, i + 1:]) == 0, f"output {i} depends on a later target position"
        assert torch.count_nonzero(g[0, : i + 1]) > 0


@pytest.mark.parametrize("norm_first", [False, True])
def test_padded_positions_do_not_leak(norm_first):
    model = _small_model(norm_first=norm_first).eval()
    src = torch.randint(1, 11, (2, 8))
    tgt = torch.randint(1, 13, (2, 6))
    src_kpm = torch.zeros(2, 8, dtype=torch.bool)
    src_kpm[0, 5:] = True
    tgt_kpm = torch.zeros(2, 6, dtype=torch.bool)
    tgt_kpm[1, 4:] = True
    out = model(src, tgt, src_key_padding_mask=src_kpm, tgt_key_padding_mask=tgt_kpm)
    src2, tgt2 = src.clone(), tgt.clone()
    src2[src_kpm] = 0
    tgt2[tgt_kpm] = 0
    out2 = model(src2, tgt2, src_key_padding_mask=src_kpm, tgt_key_padding_mask=tgt_kpm)
    keep = ~tgt_kpm
    torch.testing.assert_close(out[keep], out2[keep], atol=1e-12, rtol=0)
    assert not torch.allclose(out[~keep], out2[~keep])  # the test would notice a change


def test_sinusoidal_formula_and_embedding_scale():
    pe = SinusoidalPositionalEncoding(6, max_len=10).encoding(10).double()
    pos, i = 7, 2  # dims 2i and 2i+1 use frequency 10000^(-2i/d)
    angle = pos / 10000 ** (2 * i / 6)
    assert pe[pos, 2 * i] == pytest.approx(torch.sin(torch.tensor(angle)).item(), abs=1e-6)
    assert pe[pos, 2 * i + 1] == pytest.approx(torch.cos(torch.tensor(angle)).item(), abs=1e-6)
    emb = TokenEmbedding(5, 16)
    torch.testing.assert_close(emb(torch.tensor([[3]]))[0, 0], emb.embedding.weight[3] * 4.0)


def test_generate_shapes_and_mode():
    model = _small_model().train()
    model.embed_dropout.p = 0.5  # generate must decode in eval mode: dropout off, deterministic
    src = torch.randint(0, 11, (3, 5))
    out = model.generate(src, 6, bos_id=1)
    assert out.shape == (3, 7) and out.dtype == torch.long and bool((out[:, 0] == 1).all())
    assert int(out.min()) >= 0 and int(out.max()) < 13
    assert torch.equal(out, model.generate(src, 6, bos_id=1))
    assert model.training  # the caller's mode is restored
    with pytest.raises(ValueError, match="longer than max_len"):
        model.generate(src, 32, bos_id=1)
    with pytest.raises(ValueError, match="eos_id must be in"):
        model.generate(src, 3, bos_id=1, eos_id=13)


def test_generate_stops_at_eos():
    model = _small_model().eval()
    src = torch.randint(0, 11, (4, 5))
    free = model.generate(src, 6, bos_id=1)
    eos = int(free[0, 2])  # the token sequence 0 emits second: it must stop there
    out = model.generate(src, 6, bos_id=1, eos_id=eos)
    for row_free, row in zip(free, out):
        hits = (row_free[1:] == eos).nonzero()
        if len(hits):  # identical up to the first eos, then eos only
            first = int(hits[0]) + 1
            assert torch.equal(row[: first + 1], row_free[: first + 1])
            assert bool((row[first:] == eos).all())
        else:
            assert torch.equal(row, row_free[: len(row)])
    stopped = all(((r_free[1:] == eos).any()) for r_free in free)
    assert out.shape[1] == (max(int((r[1:] == eos).nonzero()[0]) + 2 for r in free) if stopped else 7)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m(torch.randint(0, 11, (2, 3, 4)), torch.randint(0, 13, (2, 3))), ValueError, r"src must have shape \(B, N\)"),
        (lambda m: m(torch.randint(0, 11, (2, 3)), torch.full((2, 3), 13)), ValueError, r"tgt ids must be in \[0, 13\)"),
        (lambda m: m(torch.full((2, 3), -1), torch.zeros(2, 3, dtype=torch.long)), ValueError, "src ids"),
        (lambda m: m(torch.zeros(2, 40, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long)), ValueError, "longer than max_len"),
        (lambda m: m(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)), TypeError, "integer token ids"),
        (lambda m: m(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                     src_key_padding_mask=torch.zeros(2, 4, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
        (lambda m: m(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long),
                     tgt_key_padding_mask=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "key_padding_mask must have dtype"),
    ],
)
def test_model_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call(_small_model())


def test_module_bad_arguments():
    with pytest.raises(ValueError, match=r"d_model \(10\) must be divisible by n_heads \(4\)"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match="activation must be one of"):
        FeedForward(8, 16, activation="swish")
    attn = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, N, d_model\)"):
        attn(torch.randn(5, 8))
    with pytest.raises(ValueError, match="last dim d_model=8"):
        attn(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="context batch"):
        attn(torch.randn(2, 5, 8), torch.randn(3, 5, 8))


def test_learns_to_reverse_sequences():
    """Copy-reversal of random digit strings: held-out token accuracy must reach 95%."""
    torch.manual_seed(0)
    vocab, length, bos = 12, 8, 11  # symbols 1..10, BOS 11
    model = Transformer(vocab, vocab, d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=128,
                        dropout=0.0, max_len=16, norm_first=True)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)

    def batch(n):
        src = torch.randint(1, 11, (n, length), generator=gen)
        tgt = torch.cat([torch.full((n, 1), bos), src.flip(1)], dim=1)
        return src, tgt

    for _ in range(800):
        src, tgt = batch(64)
        logits = model(src, tgt[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tgt[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, tgt = batch(200)
    pred = model.generate(src, length, bos_id=bos)[:, 1:]
    accuracy = (pred == tgt[:, 1:]).float().mean().item()
    print(f"held-out token accuracy {accuracy:.3f}")
    assert accuracy >= 0.95, f"held-out token accuracy {accuracy:.3f}"


def test_bad_constructor_arguments():
    for kwargs, exc, match in [
        (dict(n_encoder_layers=-1), ValueError, "n_encoder_layers must be a non-negative int, got -1"),
        (dict(n_decoder_layers=2.0), TypeError, "n_decoder_layers must be a non-negative int, got 2.0"),
        (dict(d_ff=0), ValueError, "d_ff must be a positive int"),
        (dict(d_model=10, n_heads=4), ValueError, r"d_model \(10\) must be divisible by n_heads \(4\)"),
        (dict(norm_first=1), TypeError, "norm_first must be a bool"),
    ]:
        with pytest.raises(exc, match=match):
            Transformer(11, 13, **{"d_model": D, "n_heads": H, "d_ff": FF, **kwargs})
    model = Transformer(11, 13, d_model=D, n_heads=H, n_encoder_layers=0, n_decoder_layers=1, d_ff=FF)
    assert model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)).shape == (1, 2, 13)


def test_generate_argument_types_and_zero_new_tokens():
    model = _small_model()
    src = torch.randint(0, 11, (3, 5))
    with pytest.raises(TypeError, match="bos_id must be an int token id, got 1.5"):
        model.generate(src, 3, bos_id=1.5)
    with pytest.raises(TypeError, match="eos_id must be an int token id, got True"):
        model.generate(src, 3, bos_id=1, eos_id=True)
    with pytest.raises(TypeError, match="max_new_tokens must be a non-negative int"):
        model.generate(src, 2.0, bos_id=1)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative int, got -1"):
        model.generate(src, -1, bos_id=1)
    out = model.generate(src, 0, bos_id=4)
    assert out.dtype == torch.long and torch.equal(out, torch.full((3, 1), 4))
    assert torch.equal(model.generate(src, 1, bos_id=4)[:, :1], out)  # the prefix of every longer result


def test_output_projection_and_old_state_dicts():
    model = _small_model()
    state = model.state_dict()
    assert "output_projection.weight" in state and not any(k.startswith("generator.") for k in state)
    old = {("generator." + k.split(".", 1)[1] if k.startswith("output_projection.") else k): v.clone() + 1
           for k, v in state.items()}
    fresh = _small_model()
    fresh.load_state_dict(old)  # strict: every old key is recognised
    assert torch.equal(fresh.output_projection.weight, state["output_projection.weight"] + 1)
    assert torch.equal(fresh.output_projection.bias, state["output_projection.bias"] + 1)
    assert "generator.weight" in old  # the caller's dict is left alone
    wrapped = nn.Sequential(_small_model())  # also under a prefix
    wrapped.load_state_dict({"0." + k: v for k, v in old.items()})
    assert torch.equal(wrapped[0].output_projection.bias, state["output_projection.bias"] + 1)
    with pytest.warns(DeprecationWarning, match="renamed output_projection"):
        assert model.generator is model.output_projection
