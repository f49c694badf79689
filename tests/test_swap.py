"""swap_attention / swap_positional / make_reversible on torch.nn and Hugging Face models."""
import importlib.util

import pytest
import torch
from torch import nn

from reformer import AxialPositionalEncoding, Encoder, LSHMultiheadAttention, Transformer, swap_attention
from reformer.kernels import dense_shared_qk_attention
from reformer.swap import SWAPPABLE_ATTENTIONS, AxialPositionIdEmbedding, swap_positional
from reformer.swap_reversible import ReversibleStack, make_reversible

E, H, FF = 16, 2, 32


def reference_mha(mha, x, padding=None, causal=False):
    """What the ORIGINAL module computes under shared-QK rules, from its own q, k (tied to q), v
    and output weights; x is (B, N, E)."""
    w, b = mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3)
    split = lambda t: t.unflatten(-1, (mha.num_heads, -1)).transpose(1, 2)  # (B, H, N, Dh)
    q, k, v = (split(x @ wi.T + bi) for wi, bi in zip(w, b))
    assert torch.equal(q, k)  # the test ties the key projection to the query projection
    out = dense_shared_qk_attention(q, v, causal=causal, key_padding_mask=padding).transpose(1, 2).flatten(2)
    return mha.out_proj(out)


def reference_encoder(encoder, x, padding):
    """The encoder's layers written out with ``reference_mha`` as self-attention (dropout 0)."""
    for layer in encoder.layers:
        sa = lambda h: reference_mha(layer.self_attn, h, padding)
        if layer.norm_first:
            x = x + sa(layer.norm1(x))
            x = x + layer._ff_block(layer.norm2(x))
        else:
            x = layer.norm1(x + sa(x))
            x = layer.norm2(x + layer._ff_block(x))
    return x


def tied_encoder(norm_first=False, nested=False, layers=2):
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True, norm_first=norm_first)
    encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=nested)
    with torch.no_grad():
        for lyr in encoder.layers:
            lyr.self_attn.in_proj_weight[E:2 * E] = lyr.self_attn.in_proj_weight[:E]
            lyr.self_attn.in_proj_bias[E:2 * E] = lyr.self_attn.in_proj_bias[:E]
    return encoder


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_swap_report_forward_backward(norm_first):
    torch.manual_seed(0)
    encoder = tied_encoder(norm_first)
    report = swap_attention(encoder, bucket_size=4, n_hashes=2, seed=0)
    assert report.swapped == ["layers.0.self_attn", "layers.1.self_attn"] and not report.skipped
    assert all(isinstance(layer.self_attn, LSHMultiheadAttention) for layer in encoder.layers)
    assert "layers.1.self_attn" in str(report) and "2 swapped, 0 skipped" in str(report)
    x = torch.randn(2, 24, E, requires_grad=True)
    padding = torch.zeros(2, 24, dtype=torch.bool)
    padding[1, 17:] = True
    out = encoder(x, src_key_padding_mask=padding)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out[~padding].sum().backward()
    for layer in encoder.layers:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.self_attn.parameters())


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("mode", ["train", "eval", "eval-nested"])
def test_swap_is_exact_when_lsh_is_exact(mode):
    """bucket_size >= N: the swapped encoder equals the original's weights under shared-QK rules,
    also in eval mode, where torch's fused fast path must not bypass the swapped module."""
    torch.manual_seed(1)
    encoder = tied_encoder(nested=mode == "eval-nested")
    x = torch.randn(3, 11, E)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[1, 8:] = True
    padding[2, 5:] = True
    with torch.no_grad():
        expected = reference_encoder(encoder, x, padding)
        fused_original = encoder.eval()(x, src_key_padding_mask=padding)
    report = swap_attention(encoder, bucket_size=16, n_hashes=3, seed=0)
    encoder.train(mode == "train")
    calls = []
    for layer in encoder.layers:
        layer.self_attn.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        got = encoder(x, src_key_padding_mask=padding)
    keep = ~padding
    assert len(calls) == 2, "the swapped attention modules were bypassed"
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fused_original[keep], expected[keep], atol=1e-3)  # the reference is not plain MHA
    if mode == "eval-nested":
        assert report.entries[-1].action == "changed" and "nested" in report.entries[-1].detail


def test_batch_first_false_and_causal_decoder_cross_attention_left_alone():
    torch.manual_seed(2)
    layer = nn.TransformerDecoderLayer(E, H, FF, dropout=0.0)  # batch_first=False: (N, B, E)
    decoder = nn.TransformerDecoder(layer, 2)
    # bucket_size >= N: exact attention, so causality is exact (with smaller buckets, future positions
    # move chunk boundaries, so LSH outputs depend on them even though they are never attended to)
    report = swap_attention(decoder, bucket_size=16, n_hashes=2, seed=0)
    assert report.swapped == ["layers.0.self_attn", "layers.1.self_attn"]
    assert set(report.skipped) == {"layers.0.multihead_attn", "layers.1.multihead_attn"}
    assert all("cross-attention" in reason for reason in report.skipped.values())
    assert all(type(lyr.multihead_attn) is nn.MultiheadAttention for lyr in decoder.layers)
    decoder.eval()  # fixed rotations (default seeds), so two forwards hash alike
    tgt, memory = torch.randn(12, 2, E, requires_grad=True), torch.randn(7, 2, E)
    mask = nn.Transformer.generate_square_subsequent_mask(12)
    out = decoder(tgt, memory, tgt_mask=mask, tgt_is_causal=True)
    out.sum().backward()
    assert out.shape == (12, 2, E) and decoder.layers[0].multihead_attn.in_proj_weight.grad is not None
    changed = tgt.detach().clone()
    changed[8:] += 1.0  # future positions must not change the first 8 outputs
    with torch.no_grad():
        again = decoder(changed, memory, tgt_mask=mask, tgt_is_causal=True)
    torch.testing.assert_close(again[:8], out[:8].detach(), rtol=1e-5, atol=1e-5)


class UserBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.memory_attn = nn.MultiheadAttention(E, H, kdim=8, vdim=8, batch_first=True)


def test_user_blocks_include_exclude_and_errors():
    model = nn.ModuleList([UserBlock(), UserBlock()])
    report = swap_attention(model, exclude=["1.*"])
    assert report.swapped == ["0.attn"]
    assert report.skipped["0.cross_attn"].startswith("cross-attention (attribute name")
    assert report.skipped["0.memory_attn"].startswith("cross-attention (kdim=8")
    assert report.skipped["1.attn"] == "excluded by include/exclude"
    model = nn.ModuleList([UserBlock(), UserBlock()])
    assert swap_attention(model, include=["1.attn"]).swapped == ["1.attn"]
    with pytest.raises(ValueError, match="no torch.nn.MultiheadAttention"):
        swap_attention(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="attention must be one of"):
        swap_attention(model, attention="sparse")
    with pytest.raises(TypeError, match="nn.Module"):
        swap_attention("model")


def test_swap_positional():
    torch.manual_seed(3)
    model = Transformer(11, 13, d_model=E, n_heads=H, n_encoder_layers=1, n_decoder_layers=1, d_ff=FF, max_len=64)
    report = swap_positional(model, (8, 8))
    assert report.swapped == ["positions"] and isinstance(model.positions, AxialPositionalEncoding)
    assert set(report.skipped) == {"src_embed.embedding", "tgt_embed.embedding"}
    logits = model(torch.randint(0, 11, (2, 9)), torch.randint(0, 13, (2, 5)))
    logits.sum().backward()
    assert all(w.grad is not None for w in model.positions.weights)

    gpt_like = nn.Module()
    gpt_like.wte, gpt_like.wpe = nn.Embedding(50, E), nn.Embedding(64, E)
    report = swap_positional(gpt_like, (8, 8), axial_dims=(8, 8))
    assert report.swapped == ["wpe"] and isinstance(gpt_like.wpe, AxialPositionIdEmbedding)
    ids = torch.arange(10)[None].expand(3, 10)
    emb = gpt_like.wpe(ids)
    assert emb.shape == (3, 10, E)
    torch.testing.assert_close(emb[0], gpt_like.wpe.axial.encoding(10))
    with pytest.raises(ValueError, match="fewer than the 64"):
        swap_positional(nn.ModuleDict({"wpe": nn.Embedding(64, E)}), (4, 8))
    with pytest.raises(ValueError, match="no positional encoding"):
        swap_positional(nn.ModuleDict({"tok": nn.Embedding(64, E)}), (8, 8))


def test_renamed_swap_names_still_import_with_a_deprecation_warning():
    import reformer.swap

    with pytest.warns(DeprecationWarning, match="AxialPositionIdEmbedding"):
        from reformer.swap import AxialPositionEmbedding
    assert AxialPositionEmbedding is AxialPositionIdEmbedding
    with pytest.warns(DeprecationWarning, match="SWAPPABLE_ATTENTIONS"):
        assert reformer.swap.ATTENTIONS is SWAPPABLE_ATTENTIONS
    with pytest.raises(AttributeError, match="no attribute 'AxialPositionEmbeddings'"):
        reformer.swap.AxialPositionEmbeddings


def test_model_attention_kinds_are_defined_once_and_differ_from_the_swappable_ones():
    from reformer import config, encdec

    assert encdec.ATTENTIONS is config.ATTENTIONS == ("lsh", "full")
    assert SWAPPABLE_ATTENTIONS == ("lsh",)
    with pytest.raises(ValueError, match=r"attention must be one of \('lsh',\), got 'full'"):
        swap_attention(tied_encoder(), attention="full")


def two_stream_reference(encoder, x, padding):
    """The RevNet coupling over the encoder's own pre-norm sub-layers, written out."""
    x1 = x2 = x
    for layer in encoder.layers:
        h = layer.norm1(x2)
        x1 = x1 + layer.self_attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        x2 = x2 + layer._ff_block(layer.norm2(x1))
    return encoder.norm((x1 + x2) / 2)


def test_make_reversible_torch_encoder_shares_weights_and_matches_coupling():
    torch.manual_seed(4)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.0, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(E), enable_nested_tensor=False)
    rev = make_reversible(encoder)
    assert isinstance(rev, ReversibleStack)
    assert {id(p) for p in rev.parameters()} == {id(p) for p in encoder.parameters()}
    x = torch.randn(2, 9, E)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[0, 6:] = True
    grads = []
    for module in (rev, make_reversible(encoder, reversible=False)):
        xi = x.clone().requires_grad_()
        out = module(xi, src_key_padding_mask=padding)
        torch.testing.assert_close(out, two_stream_reference(encoder, x, padding), rtol=1e-5, atol=1e-5)
        encoder.zero_grad()
        out.square().sum().backward()
        grads.append([xi.grad] + [p.grad.clone() for p in encoder.parameters()])
    for a, b in zip(*grads):  # recomputing backward (with the mask) = ordinary autograd
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_make_reversible_after_swap_and_reformer_encoder():
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(E, H, FF, dropout=0.1, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    swap_attention(encoder, bucket_size=4, n_hashes=2)
    rev = make_reversible(encoder)
    x = torch.randn(2, 16, E, requires_grad=True)
    rev(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

    ours = Encoder(2, E, H, FF, dropout=0.0, norm_first=True)
    rev = make_reversible(ours)
    padding = torch.zeros(2, 16, dtype=torch.bool)
    padding[1, 10:] = True
    assert rev(x, key_padding_mask=padding).shape == x.shape


def test_make_reversible_errors():
    post_norm = nn.TransformerEncoder(nn.TransformerEncoderLayer(E, H, FF), 2, enable_nested_tensor=False)
    with pytest.raises(ValueError, match="post-norm"):
        make_reversible(post_norm)
    with pytest.raises(ValueError, match="post-norm"):
        make_reversible(Encoder(1, E, H, FF, norm_first=False))
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(E, H, FF, norm_first=True), 2)
    with pytest.raises(TypeError, match="TransformerDecoderLayer"):
        make_reversible(decoder.layers)
    with pytest.raises(TypeError, match="stack must be"):
        make_reversible(nn.Linear(E, E))


needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="Hugging Face transformers is not installed (optional dependency)")


def _register_reference():
    """A Hugging Face attention function computing exact shared-QK attention (the test's oracle)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        assert torch.equal(query, key)  # key projection tied to the query projection
        padding = None if attention_mask is None else ~attention_mask.bool()
        out = dense_shared_qk_attention(query, value, causal=module.is_causal, key_padding_mask=padding, scale=scaling)
        return out.transpose(1, 2), None

    AttentionInterface.register("test_shared_qk", forward)
    AttentionMaskInterface.register("test_shared_qk", flash_attention_mask)


@needs_transformers
def test_gpt2_self_attention_swap_is_exact_when_lsh_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(6)
    config = GPT2Config(n_layer=2, n_embd=E, n_head=H, vocab_size=50, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, E:2 * E] = block.attn.c_attn.weight[:, :E]
            block.attn.c_attn.bias[E:2 * E] = block.attn.c_attn.bias[:E]
    ids = torch.randint(1, 50, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 14:] = 0
    _register_reference()
    model.set_attn_implementation("test_shared_qk")
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
    # causal_mode="chunk": with bucket_size >= N the chunked look-back is exact causal attention
    report = swap_attention(model, bucket_size=32, n_hashes=2, seed=0, causal_mode="chunk")
    assert report.swapped == ["transformer.h.0.attn", "transformer.h.1.attn"]
    logits = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(logits[keep], expected[keep], rtol=1e-4, atol=1e-4)
    logits[keep].sum().backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.abs().sum() > 0
    assert swap_positional(model, (8, 8)).swapped == ["transformer.wpe"]
    assert model(ids, attention_mask=mask).logits.shape == (2, 20, 50)
    out = model.generate(ids[:1], max_new_tokens=3, do_sample=False, use_cache=False)
    assert out.shape == (1, 23)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(ids[:1], max_new_tokens=3, do_sample=False, use_cache=True)


@needs_transformers
def test_bert_self_attention_swapped_cross_attention_kept():
    from transformers import BertConfig, BertModel

    torch.manual_seed(7)
    config = BertConfig(num_hidden_layers=2, hidden_size=E, num_attention_heads=H, intermediate_size=FF,
                        vocab_size=50, is_decoder=True, add_cross_attention=True)
    model = BertModel(config)
    report = swap_attention(model, bucket_size=8, n_hashes=2)
    assert report.swapped == ["encoder.layer.0.attention.self", "encoder.layer.1.attention.self"]
    assert set(report.skipped) == {"encoder.layer.0.crossattention.self", "encoder.layer.1.crossattention.self"}
    ids, memory = torch.randint(0, 50, (2, 24)), torch.randn(2, 7, E)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, 20:] = 0
    hidden = model(ids, attention_mask=mask, encoder_hidden_states=memory).last_hidden_state
    hidden.sum().backward()
    assert hidden.shape == (2, 24, E) and model.encoder.layer[0].crossattention.self.query.weight.grad is not None


# ----------------------------------------------------------------------------- include/exclude, seeds

def test_include_exclude_accept_one_glob_string_and_reject_other_types():
    model = nn.ModuleList([UserBlock(), UserBlock()])
    assert swap_attention(model, include="1.attn").swapped == ["1.attn"]
    model = nn.ModuleList([UserBlock(), UserBlock()])
    assert swap_attention(model, exclude="1.*").swapped == ["0.attn"]
    encoder = tied_encoder()
    with pytest.raises(ValueError, match="matches no attention module.*layers.0.self_attn"):
        swap_attention(encoder, include="self_attn")  # globs match qualified names
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in encoder.layers)  # nothing changed
    assert swap_attention(encoder, include="*self_attn").swapped == ["layers.0.self_attn", "layers.1.self_attn"]
    for bad in (dict(include=5), dict(exclude=[1, 2]), dict(include=b"attn")):
        with pytest.raises(TypeError, match="include|exclude"):
            swap_attention(nn.ModuleList([UserBlock()]), **bad)
    with pytest.raises(TypeError, match="seed"):
        swap_attention(nn.ModuleList([UserBlock()]), seed=1.5)
    with pytest.raises(TypeError, match="bucket_size"):
        swap_attention(nn.ModuleList([UserBlock()]), bucket_size=8.0)
    with pytest.raises(ValueError, match="n_hashes"):
        swap_attention(nn.ModuleList([UserBlock()]), n_hashes=0)
    with pytest.raises(ValueError, match="causal_mode"):
        swap_attention(nn.ModuleList([UserBlock()]), causal_mode="future")
    with pytest.raises(ValueError, match="n_buckets"):
        swap_attention(nn.ModuleList([UserBlock()]), n_buckets=3)


def test_default_seed_makes_eval_reproducible():
    """Without a seed argument, swapped layers get seeds 0, 1, ...: eval outputs repeat exactly
    (small buckets, so hashing matters); seed=None draws fresh rotations on every call."""
    x = torch.randn(2, 40, E)
    outs = {}
    for seed_arg in ("default", None):
        torch.manual_seed(8)
        encoder = tied_encoder()
        report = swap_attention(encoder, bucket_size=4, n_hashes=1) if seed_arg == "default" else \
            swap_attention(encoder, bucket_size=4, n_hashes=1, seed=None)
        encoder.eval()
        with torch.no_grad():
            outs[seed_arg] = (encoder(x), encoder(x))
        seeds = [layer.self_attn.seed for layer in encoder.layers]
        assert seeds == ([0, 1] if seed_arg == "default" else [None, None])
        assert ("seed=0" in str(report)) == (seed_arg == "default")
    assert torch.equal(*outs["default"])
    assert not torch.allclose(*outs[None])


# ----------------------------------------------------------------------------- Hugging Face save/load

def _perturb_(module):
    """Stand-in for training: move every parameter away from its initial value."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


@needs_transformers
def test_gpt2_swapped_save_load_round_trip_is_exact(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from reformer.swap import load_swapped

    torch.manual_seed(9)
    config = GPT2Config(n_layer=2, n_embd=E, n_head=H, vocab_size=50, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    swap_attention(model, bucket_size=4, n_hashes=2)
    swap_positional(model, (8, 8))
    _perturb_(model)
    model.eval()
    ids = torch.randint(0, 50, (2, 40))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(expected, model(ids).logits)  # reproducible in eval with the default seeds
    model.save_pretrained(tmp_path)
    saved = __import__("json").loads((tmp_path / "config.json").read_text())["reformer_swap"]
    assert set(saved["attention"]) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    assert saved["attention"]["transformer.h.1.attn"] == {"bucket_size": 4, "n_hashes": 2, "seed": 1,
                                                          "n_buckets": None, "causal_mode": "chunk"}
    assert saved["positional"] == {"transformer.wpe": {"axial_shape": [8, 8], "axial_dims": None}}

    loaded = load_swapped(GPT2LMHeadModel, tmp_path)
    assert type(loaded) is GPT2LMHeadModel and not loaded.training
    assert isinstance(loaded.transformer.wpe, AxialPositionIdEmbedding)
    # the parameter names are the axial encoding's, so checkpoints from before the class rename still load
    assert {"transformer.wpe.axial.weights.0", "transformer.wpe.axial.weights.1"} <= set(loaded.state_dict())
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
    loaded.save_pretrained(tmp_path / "again")  # a loaded model saves the same record again
    with torch.no_grad():
        again = load_swapped(GPT2LMHeadModel, tmp_path / "again")(ids).logits
    torch.testing.assert_close(again, expected, rtol=0, atol=0)

    # from_pretrained alone cannot rebuild the swapped layers: with the LSH implementation it refuses to
    # run full attention silently
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "again", attn_implementation="reformer_lsh")
    with pytest.raises(ValueError, match="load_swapped"):
        plain(ids)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=E, n_head=H, vocab_size=50)).save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no 'reformer_swap'"):
        load_swapped(GPT2LMHeadModel, tmp_path / "plain")


@needs_transformers
def test_bert_swapped_save_load_round_trip_is_exact(tmp_path):
    from transformers import BertConfig, BertModel

    from reformer.swap import load_swapped

    torch.manual_seed(10)
    config = BertConfig(num_hidden_layers=2, hidden_size=E, num_attention_heads=H, intermediate_size=FF,
                        vocab_size=50, max_position_embeddings=64)
    model = BertModel(config)
    report = swap_attention(model, bucket_size=4, n_hashes=2, seed=5, exclude="encoder.layer.1.*", n_buckets=(4, 2))
    assert report.swapped == ["encoder.layer.0.attention.self"]
    swap_positional(model, (8, 8), axial_dims=(8, 8))
    _perturb_(model)
    model.eval()
    ids = torch.randint(0, 50, (2, 33))
    mask = torch.ones(2, 33, dtype=torch.long)
    mask[1, 25:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
    model.save_pretrained(tmp_path)
    loaded = load_swapped(BertModel, tmp_path)
    assert loaded.encoder.layer[0].attention.self.reformer_lsh.seed == 5
    assert loaded.encoder.layer[0].attention.self.reformer_lsh.n_buckets == (4, 2)
    assert loaded.encoder.layer[1].attention.self.reformer_lsh is None  # excluded: full attention
    with torch.no_grad():
        got = loaded(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
