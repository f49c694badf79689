"""Backend selection: "auto" never fails where the reference can serve; explicit "triton" errors are clear."""
import pytest
import torch

import reformer.kernels.api as api
from reformer.kernels import ref_lsh
from reformer.kernels.lsh_function import SortedCoreAdapter
from reformer import MultiHeadAttention
from reformer.kernels import full_attention, lsh_attention


def test_full_attention_defaults_to_auto_and_auto_is_torch_on_cpu():
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    assert api.resolve_backend("auto", q) == "torch"
    torch.testing.assert_close(full_attention(q, k, v), full_attention(q, k, v, backend="torch"))


@pytest.mark.parametrize(
    "dtype, head_dim, kwargs",
    [
        (torch.float32, 16, dict(attn_mask=torch.zeros(5, 5, dtype=torch.bool))),
        (torch.float32, 16, dict(dropout_p=0.1)),
        (torch.float64, 16, {}),
        (torch.float32, 8, {}),
        (torch.float32, 256, {}),
    ],
)
def test_auto_falls_back_to_torch_outside_triton_limits(monkeypatch, dtype, head_dim, kwargs):
    """On a CUDA tensor "auto" picks Triton only for calls its kernels take; simulate CUDA by
    reporting every tensor as one and make the Triton path fail loudly if it is taken."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(api, "triton_available", lambda: True)
    monkeypatch.setattr(api, "_lsh_core",
                        lambda backend: pytest.fail(f"took {backend}") if backend == "triton" else SortedCoreAdapter(ref_lsh))
    q, k, v = (torch.randn(1, 2, 5, head_dim, dtype=dtype) for _ in range(3))
    full_attention(q, k, v, **kwargs)  # the reference serves it: no Triton error
    if not kwargs:
        lsh_attention(q, v, bucket_size=4, n_hashes=1, seed=0)
    assert api.resolve_backend("auto", q, triton_ok=api.triton_supports(torch.float16, 64)) == "triton"


def test_auto_mha_with_attn_mask_on_cuda_like_tensors(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(api, "triton_available", lambda: True)
    mha = MultiHeadAttention(32, 2).eval()
    out = mha(torch.randn(2, 5, 32), attn_mask=torch.ones(5, 5, dtype=torch.bool).triu(1))
    assert out.shape == (2, 5, 32)


def test_explicit_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 1, 8, 16)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        full_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        lsh_attention(q, q, backend="triton", seed=0)


def test_empty_batch():
    qk, v = torch.randn(0, 2, 10, 16), torch.randn(0, 2, 10, 16)
    assert lsh_attention(qk, v, bucket_size=4, seed=0).shape == (0, 2, 10, 16)
    assert full_attention(qk, qk, v).shape == (0, 2, 10, 16)
