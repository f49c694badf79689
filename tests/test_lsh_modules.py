"""LSHSelfAttention and LSHMultiheadAttention (the nn.MultiheadAttention drop-in)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from reformer import LSHMultiheadAttention, LSHSelfAttention
from reformer.kernels import dense_shared_qk_attention

D_MODEL, HEADS = 16, 2


def features(b=2, n=12, seed=0):
    return torch.randn(b, n, D_MODEL, generator=torch.Generator().manual_seed(seed))


def left_aligned_mask(lengths, n):
    return torch.arange(n)[None, :] >= torch.tensor(lengths)[:, None]  # True = padding


def full_reference(x, qk_weight, qk_bias, v_weight, v_bias, out_proj, causal=False, mask=None):
    """Full shared-QK attention (docs/lsh.md, "Exactness": what one chunk equals) with the given
    projections: (B, N, E)."""
    split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=HEADS)
    out = dense_shared_qk_attention(split(F.linear(x, qk_weight, qk_bias)), split(F.linear(x, v_weight, v_bias)),
                                    causal=causal, key_padding_mask=mask)
    return out_proj(rearrange(out, "b h n d -> b n (h d)"))


def module_reference(module, x, causal=False, mask=None):
    return full_reference(x, module.qk_proj.weight, module.qk_proj.bias, module.v_proj.weight, module.v_proj.bias,
                          module.out_proj, causal, mask)


def tied_mha(seed=0):
    """An nn.MultiheadAttention whose key projection equals its query projection."""
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight[D_MODEL:2 * D_MODEL] = mha.in_proj_weight[:D_MODEL]
        mha.in_proj_bias[D_MODEL:2 * D_MODEL] = mha.in_proj_bias[:D_MODEL]
    return mha.eval()


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_with_one_chunk_equals_full_reference(causal):
    torch.manual_seed(0)
    attn = LSHSelfAttention(D_MODEL, HEADS, bucket_size=16, n_hashes=2, causal=causal, causal_mode="chunk").eval()
    x, mask = features(), left_aligned_mask([12, 9], 12)
    out = attn(x, key_padding_mask=mask)
    assert out.shape == x.shape
    torch.testing.assert_close(out, module_reference(attn, x, causal, mask), atol=1e-5, rtol=0)


def test_training_draws_fresh_rotations_that_replay_with_the_rng_state():
    torch.manual_seed(0)
    attn = LSHSelfAttention(D_MODEL, HEADS, bucket_size=4, n_hashes=2, seed=3).train()
    x = features(n=40)
    state = torch.get_rng_state()
    first, second = attn(x), attn(x)
    assert not torch.equal(first, second)  # fresh rotations per forward (seed is for eval only)
    torch.set_rng_state(state)
    assert torch.equal(attn(x), first)


def test_eval_with_seed_is_fixed_and_ignores_the_global_rng():
    torch.manual_seed(0)
    attn = LSHSelfAttention(D_MODEL, HEADS, bucket_size=4, n_hashes=2, seed=3).eval()
    x = features(n=40)
    first = attn(x)
    torch.manual_seed(123)
    assert torch.equal(attn(x), first)
    other = LSHSelfAttention(D_MODEL, HEADS, bucket_size=4, n_hashes=2, seed=4).eval()
    other.load_state_dict(attn.state_dict())
    assert not torch.equal(other(x), first)


def test_dropout_acts_on_the_attention_output_in_training_only():
    torch.manual_seed(0)
    attn = LSHSelfAttention(D_MODEL, HEADS, bucket_size=16, n_hashes=1, dropout=0.5, seed=0)
    x = features()
    attn.eval()
    clean = attn(x)
    attn.train()
    torch.manual_seed(1)
    noisy = attn(x)
    torch.manual_seed(1)
    assert torch.equal(noisy, attn(x)) and not torch.allclose(noisy, clean)


def test_from_torch_with_one_chunk_equals_shared_qk_attention_with_the_mha_weights():
    mha = tied_mha()
    lsh = LSHMultiheadAttention.from_torch(mha, bucket_size=16, n_hashes=2, seed=0).eval()
    e, w, b = D_MODEL, mha.in_proj_weight, mha.in_proj_bias
    x, mask = features(), left_aligned_mask([12, 7], 12)
    out, weights = lsh(x, x, x, key_padding_mask=mask)
    assert weights is None
    ref = full_reference(x, w[:e], b[:e], w[2 * e:], b[2 * e:], mha.out_proj, mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_from_torch_batch_first_false_and_unbatched_inputs():
    mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=False)
    lsh = LSHMultiheadAttention.from_torch(mha, bucket_size=4, n_hashes=2, seed=0).eval()
    x = features()
    seq_first = x.transpose(0, 1).contiguous()
    out = lsh(seq_first, seq_first, seq_first)[0]
    lsh.batch_first = True
    torch.testing.assert_close(out.transpose(0, 1), lsh(x, x, x)[0])
    single = x[0]
    torch.testing.assert_close(lsh(single, single, single)[0], lsh(x[:1], x[:1], x[:1])[0][0])


def test_from_torch_copies_the_train_eval_mode():
    x = features(n=40)
    for training in (False, True):
        mha = tied_mha().train(training)
        lsh = LSHMultiheadAttention.from_torch(mha, bucket_size=4, n_hashes=2, seed=0)
        assert all(m.training == training for m in lsh.modules())
        first = lsh(x, x, x)[0]
        # eval mode: the seeded rotations, the same on every call; training: fresh ones
        assert torch.equal(lsh(x, x, x)[0], first) == (not training)


def test_is_causal_and_causal_attn_masks_select_causal_attention():
    torch.manual_seed(0)
    lsh = LSHMultiheadAttention(D_MODEL, HEADS, bucket_size=16, n_hashes=2, seed=0, batch_first=True,
                                causal_mode="chunk").eval()
    x = features()
    ref = module_reference(lsh, x, causal=True)
    bool_mask = torch.ones(12, 12, dtype=torch.bool).triu(1)
    float_mask = nn.Transformer.generate_square_subsequent_mask(12)
    for kwargs in (dict(is_causal=True), dict(attn_mask=bool_mask), dict(attn_mask=float_mask, is_causal=True)):
        torch.testing.assert_close(lsh(x, x, x, **kwargs)[0], ref, atol=1e-5, rtol=0)


def swapped_encoder_layer(bucket_size, seed=0):
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    original = layer.self_attn
    layer.self_attn = LSHMultiheadAttention.from_torch(original, bucket_size=bucket_size, n_hashes=2, seed=0)
    return layer, original


def manual_layer(layer, x, attention):
    """Post-norm nn.TransformerEncoderLayer written out with the given attention output."""
    h = layer.norm1(x + attention)
    return layer.norm2(h + layer.linear2(layer.activation(layer.linear1(h))))


def test_in_transformer_encoder_layer_eval_no_grad_runs_lsh_not_the_fast_path():
    x, mask = features(n=24), left_aligned_mask([24, 17], 24)
    layer, _ = swapped_encoder_layer(bucket_size=32)  # one chunk: equals the full reference
    layer.eval()
    with torch.no_grad():
        out = layer(x, src_key_padding_mask=mask)
        lsh = layer.self_attn
        e, w, b = D_MODEL, lsh.qk_proj.weight, lsh.qk_proj.bias
        full = full_reference(x, w, b, lsh.v_proj.weight, lsh.v_proj.bias, lsh.out_proj, mask=mask)
        keep = ~mask[..., None]
        torch.testing.assert_close(out * keep, manual_layer(layer, x, full) * keep, atol=1e-5, rtol=0)
        layer.self_attn = LSHMultiheadAttention.from_torch(tied_mha(), bucket_size=4, n_hashes=2, seed=0).eval()
        chunked = layer(x, src_key_padding_mask=mask)
        direct = layer.self_attn(x, x, x, key_padding_mask=mask)[0]
        torch.testing.assert_close(chunked, manual_layer(layer, x, direct), atol=1e-5, rtol=0)
        full = module_reference(layer.self_attn, x, mask=mask)
        assert (chunked - manual_layer(layer, x, full)).abs().max() > 1e-2  # bucket_size < N is not full


def test_in_transformer_encoder_layer_training_with_padding():
    layer, _ = swapped_encoder_layer(bucket_size=4)
    layer.train()
    x, mask = features(n=24), left_aligned_mask([24, 17], 24)
    torch.manual_seed(5)
    out = layer(x, src_key_padding_mask=mask)
    torch.manual_seed(5)
    direct = layer.self_attn(x, x, x, key_padding_mask=mask)[0]
    torch.testing.assert_close(out, manual_layer(layer, x, direct), atol=1e-5, rtol=0)
    out.sum().backward()
    assert layer.self_attn.qk_proj.weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_swapped_transformer_encoder_nested_fast_path_input():
    """nn.TransformerEncoder built with MHA layers converts padded inputs to nested tensors in
    eval mode; after swapping in LSH it must still compute LSH attention."""
    torch.manual_seed(0)
    template = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(template, num_layers=2).eval()
    for layer in encoder.layers:
        layer.self_attn = LSHMultiheadAttention.from_torch(layer.self_attn, bucket_size=4, n_hashes=2, seed=0).eval()
    x, mask = features(n=24), left_aligned_mask([24, 17], 24)
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=mask)
        expected = x
        for layer in encoder.layers:
            expected = manual_layer(layer, expected, layer.self_attn(expected, expected, expected,
                                                                     key_padding_mask=mask)[0])
    keep = ~mask[..., None]
    torch.testing.assert_close(out * keep, expected * keep, atol=1e-5, rtol=0)


def test_encoder_built_from_an_lsh_layer_declines_nested_tensors():
    layer, _ = swapped_encoder_layer(bucket_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that enable_nested_tensor is turned off
        encoder = nn.TransformerEncoder(layer, num_layers=2).eval()
    assert not encoder.use_nested_tensor
    x, mask = features(n=24), left_aligned_mask([24, 17], 24)
    with torch.no_grad():
        out = encoder(x, src_key_padding_mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("call,match", [
    (lambda m, x: (lambda y: m(y, y, y, need_weights=True))(torch.zeros(4097, 1, D_MODEL)), "N <= 4096"),
    (lambda m, x: m(x, x.clone(), x), "key and value must be the same tensor as query"),
    (lambda m, x: m(x, x, torch.zeros_like(x)), "key and value must be the same tensor as query"),
    (lambda m, x: m(x, x, x, attn_mask=torch.ones(12, 12, dtype=torch.bool).tril()), "only the causal attn_mask"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(12, 12)), "only the causal attn_mask"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(4, 12, 12, dtype=torch.bool)), "only the causal attn_mask"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.full((2, 12), -1e4)), "only 0 \\(keep\\) and -inf"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 12, dtype=torch.long)), "bool .* or float"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 11, dtype=torch.bool)), "key_padding_mask must have"),
    (lambda m, x: m(x[..., :8], x[..., :8], x[..., :8]), "last dim d_model=16"),
    (lambda m, x: m(x[:1], x[1:], x[:1]), "key and value must be the same tensor as query"),
    (lambda m, x: m(x, None, x), "key and value must be the same tensor as query"),
    (lambda m, x: m(x.tolist(), x, x), "query must be a torch.Tensor"),
])
def test_multihead_attention_rejects_what_lsh_cannot_honour(call, match):
    module = LSHMultiheadAttention(D_MODEL, HEADS, bucket_size=4)
    x = features()
    with pytest.raises((ValueError, TypeError), match=match):
        call(module, x)


@pytest.mark.parametrize("make,error,match", [
    (lambda: LSHSelfAttention(15, 2), ValueError, "divisible"),
    (lambda: LSHSelfAttention(16, 2, bucket_size=0), ValueError, "bucket_size must be a positive int"),
    (lambda: LSHSelfAttention(16, 2, n_hashes=0), ValueError, "n_hashes must be a positive int"),
    (lambda: LSHSelfAttention(16, 2, seed=1.5), TypeError, "seed must be an int"),
    (lambda: LSHSelfAttention(16, 2, dropout=1.0), ValueError, "dropout must be in"),
    (lambda: LSHMultiheadAttention.from_torch(nn.Linear(4, 4)), TypeError, "needs an nn.MultiheadAttention"),
    (lambda: LSHMultiheadAttention.from_torch(nn.MultiheadAttention(16, 2, kdim=8, vdim=8)), ValueError, "kdim"),
    (lambda: LSHMultiheadAttention.from_torch(nn.MultiheadAttention(16, 2, add_bias_kv=True)), ValueError, "kdim"),
])
def test_bad_construction_raises(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_defaults_like_torch_batch_first_false_inside_a_default_encoder_layer():
    assert LSHMultiheadAttention(D_MODEL, HEADS).batch_first is False
    assert nn.MultiheadAttention(D_MODEL, HEADS).batch_first is False
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=32, dropout=0.0)  # (N, B, E)
    layer.self_attn = LSHMultiheadAttention.from_torch(layer.self_attn, bucket_size=4, n_hashes=2, seed=0)
    assert layer.self_attn.batch_first is False
    plain = LSHMultiheadAttention(D_MODEL, HEADS, bucket_size=4, n_hashes=2, seed=0)
    plain.load_state_dict(layer.self_attn.state_dict())
    x = features(n=12).transpose(0, 1).contiguous()  # (N, B, E)
    layer.eval()
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (12, 2, D_MODEL)
        torch.testing.assert_close(out, manual_layer(layer, x, plain.eval()(x, x, x)[0]))
        seq_first = plain(x, x, x)[0]
        plain.batch_first = True  # the same sequences given batch first
        xb = x.transpose(0, 1)
        torch.testing.assert_close(plain(xb, xb, xb)[0], seq_first.transpose(0, 1))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
def test_swapped_encoder_eval_with_padding_mask_and_grad_enabled():
    """nn.TransformerEncoder (enable_nested_tensor=True) with a hand-swapped LSH layer, eval mode,
    padding mask, grad enabled: torch inspects in_proj_weight/in_proj_bias; it must run and agree
    with the no_grad (nested tensor) path."""
    torch.manual_seed(0)
    template = nn.TransformerEncoderLayer(D_MODEL, HEADS, dim_feedforward=32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(template, num_layers=2).eval()
    assert encoder.use_nested_tensor
    for layer in encoder.layers:
        layer.self_attn = LSHMultiheadAttention.from_torch(layer.self_attn, bucket_size=4, n_hashes=2, seed=0)
    encoder.eval()  # the new modules too: fixed rotations
    x, mask = features(n=24), left_aligned_mask([24, 17], 24)
    with_grad = encoder(x, src_key_padding_mask=mask)
    with torch.no_grad():
        nested = encoder(x, src_key_padding_mask=mask)
    keep = ~mask[..., None]
    torch.testing.assert_close(with_grad * keep, nested * keep, atol=1e-5, rtol=0)
    (with_grad * keep).sum().backward()
    assert encoder.layers[0].self_attn.qk_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("make,error,match", [
    (lambda: LSHSelfAttention(16, 2, causal="no"), TypeError, "causal must be a bool"),
    (lambda: LSHSelfAttention(16, 2, dropout="0.1"), TypeError, "dropout must be a float"),
    (lambda: LSHSelfAttention(16, 2, n_buckets=5), ValueError, "n_buckets entries must be even"),
    (lambda: LSHSelfAttention(16, 2, n_buckets=(2, 4, 8, 2)), ValueError, "tuple of 2 or 3"),
    (lambda: LSHSelfAttention(16, 2, n_buckets=8.0), TypeError, "n_buckets must be an even int"),
    (lambda: LSHSelfAttention(16, 2, causal_mode="window"), ValueError, "causal_mode must be one of"),
    (lambda: LSHMultiheadAttention(16, 2, batch_first="yes"), TypeError, "batch_first must be a bool"),
    (lambda: LSHMultiheadAttention(16, 2, dropout=None), TypeError, "dropout must be a float"),
])
def test_bad_types_raise(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_input_dtype_other_than_the_parameters_raises_a_type_error():
    attn = LSHSelfAttention(D_MODEL, HEADS, bucket_size=4)
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the module's parameters are torch.float32"):
        attn(features().double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attn(features()).shape == (2, 12, D_MODEL)  # autocast decides the dtypes itself


@pytest.mark.parametrize("causal, causal_mode", [(False, "bucket"), (True, "bucket"), (True, "chunk")])
def test_need_weights_returns_dense_weights_whose_product_with_v_is_the_output(causal, causal_mode):
    torch.manual_seed(0)
    lsh = LSHMultiheadAttention(D_MODEL, HEADS, bucket_size=4, n_hashes=3, seed=2, batch_first=True,
                                causal_mode=causal_mode).double().eval()
    x, mask = features(n=19).double(), left_aligned_mask([19, 14], 19)
    out, weights = lsh(x, x, x, key_padding_mask=mask, need_weights=True, average_attn_weights=False,
                       is_causal=causal)
    assert weights.shape == (2, HEADS, 19, 19)
    v = rearrange(lsh.v_proj(x), "b n (h d) -> b h n d", h=HEADS)
    expected = lsh.out_proj(rearrange(weights @ v, "b h n d -> b n (h d)"))
    keep = ~mask[..., None]
    torch.testing.assert_close(out * keep, expected * keep)
    torch.testing.assert_close(out, lsh(x, x, x, key_padding_mask=mask, is_causal=causal)[0])  # same rotations
    assert torch.all(weights[1, :, 14:] == 0) and torch.all(weights[..., 14:][1] == 0)  # padding
    if causal:
        assert torch.all(weights.triu(1) == 0)
    off_diagonal = weights.masked_fill(torch.eye(19, dtype=torch.bool), 0).count_nonzero(-1)
    assert off_diagonal.max() < 18  # LSH: far from full attention at bucket_size 4
    averaged = lsh(x, x, x, key_padding_mask=mask, need_weights=True, is_causal=causal)[1]
    torch.testing.assert_close(averaged, weights.mean(1))
    single = lsh(x[0], x[0], x[0], need_weights=True, is_causal=causal)[1]
    assert single.shape == (19, 19)


def test_record_attention_keeps_outputs_and_records_buckets_and_weights():
    from reformer import ReformerConfig, ReformerLM, record_attention

    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(vocab_size=32, d_model=32, n_heads=4, depth=3, d_ff=32, max_seq_len=40,
                                      bucket_size=4, n_hashes=2, seed=1)).eval()
    tokens = torch.randint(0, 32, (2, 23))
    with torch.no_grad():
        plain = model(tokens)
        with record_attention(model) as rec:
            recorded = model(tokens)
        torch.testing.assert_close(recorded, plain)
        assert [r.name for r in rec.records] == [f"layers.blocks.{i}.f.fn" for i in range(3)]
        for record, block in zip(rec.records, model.layers.blocks):
            assert record.buckets.shape == (2, 4, 2, 23) and record.weights.shape == (2, 4, 23, 23)
            assert int(record.buckets.max()) < model.config.n_buckets
            assert torch.all(record.weights.triu(1) == 0)
            torch.testing.assert_close(record.weights.sum(-1), torch.ones(2, 4, 23))
        assert model(tokens) is not None and len(rec.records) == 3  # stopped recording
        with record_attention(model, max_len=10) as small:
            model(tokens)
        assert small.records[0].weights is None and small.records[0].buckets.shape == (2, 4, 2, 23)
    torch.manual_seed(5)
    model.train()
    with record_attention(model, weights=False) as rec:
        torch.manual_seed(5)
        trained = model(tokens)
    torch.manual_seed(5)
    assert torch.equal(trained, model(tokens))  # the same global-RNG draws with and without recording
    assert all(r.weights is None for r in rec.records)
