"""torch.compile(fullgraph=True) over the attention functions through the custom ops of
kernels/ops.py: op registration checks (schema, fake tensors, autograd) with
``torch.library.opcheck``, and compiled outputs and gradients equal to eager ones, for the
torch backend and (TRITON_INTERPRET=1, CPU) the Triton backend."""
from __future__ import annotations

import pytest
import torch

from reformer.kernels import full_attention, lsh_attention, ops
from reformer.kernels.hashing import default_n_buckets, make_rotations, rotation_width

pytestmark = pytest.mark.usefixtures("one_thread")


def _lsh_inputs(b=1, h=2, n=37, d=16, n_hashes=2, n_buckets=4, seed=0, pad=True):
    gen = torch.Generator().manual_seed(seed)
    qk, v, do = (torch.randn(b, h, n, d, generator=gen) for _ in range(3))
    rotations = make_rotations(h, d, n_hashes, n_buckets, seed=seed + 1, device=torch.device("cpu"))
    mask = torch.rand(b, n, generator=gen) < 0.2 if pad else None
    return qk, v, do, rotations, mask


def test_opcheck_lsh_attention():
    qk, v, _, rotations, mask = _lsh_inputs(n=10)
    for m in (mask, None):
        torch.library.opcheck(ops.lsh_attention_op, (qk.requires_grad_(), v.requires_grad_(), rotations, m, [4], 4,
                                                     True, "chunk", "torch"))


def test_opcheck_full_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, n, 8, generator=gen).requires_grad_() for n in (5, 7, 7))
    torch.library.opcheck(ops.full_attention_op, (q, k, v, torch.tensor([[False] * 6 + [True]]), True, "torch"))


def test_opcheck_seeded_rotations():
    torch.library.opcheck(ops.seeded_rotations_op, (3, 2, 8, 2, 3, torch.device("cpu")))
    r = ops.seeded_rotations_op(3, 2, 8, 2, 3, torch.device("cpu"))
    assert torch.equal(r, make_rotations(2, 8, 2, 6, seed=3, device=torch.device("cpu")))
    r = ops.seeded_rotations_op(3, 2, 8, 2, 4, torch.device("cpu"))  # factorised (4, 4): width 2 + 2
    assert torch.equal(r, make_rotations(2, 8, 2, (4, 4), seed=3, device=torch.device("cpu")))


def _grads(fn, inputs, do):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    out = out[0] if isinstance(out, tuple) else out
    return [out.detach(), *torch.autograd.grad(out, xs, do)]


def _assert_same(got, want, tol):
    for x, y in zip(got, want):
        assert (x - y).abs().max().item() <= tol


def _lsh_op(backend, rotations, mask, causal=False, mode="chunk"):
    return lambda qk, v: ops.lsh_attention_op(qk, v, rotations, mask, [4], 8, causal, mode, backend)[0]


@pytest.mark.parametrize("causal,mode", [(False, "chunk"), (True, "chunk"), (True, "bucket")])
def test_compiled_lsh_op_matches_eager_lsh_attention(causal, mode):
    qk, v, do, rotations, mask = _lsh_inputs()
    eager = lambda qk, v: lsh_attention(qk, v, bucket_size=8, n_hashes=2, causal=causal,  # noqa: E731
                                        causal_mode=mode, key_padding_mask=mask, rotations=rotations, backend="torch")
    compiled = torch.compile(_lsh_op("torch", rotations, mask, causal, mode), fullgraph=True, backend="aot_eager")
    _assert_same(_grads(compiled, (qk, v), do), _grads(eager, (qk, v), do), 1e-6)


def test_compiled_full_op_matches_eager_full_attention():
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 2, 13, 16, generator=gen) for _ in range(4))
    mask = torch.rand(2, 13, generator=gen) < 0.3
    eager = lambda q, k, v: full_attention(q, k, v, causal=True, key_padding_mask=mask, backend="torch")  # noqa: E731
    op = lambda q, k, v: ops.full_attention_op(q, k, v, mask, True, "torch")  # noqa: E731
    compiled = torch.compile(op, fullgraph=True, backend="aot_eager")
    _assert_same(_grads(compiled, (q, k, v), do), _grads(eager, (q, k, v), do), 1e-6)


@pytest.mark.triton
def test_compiled_full_op_triton_backend_under_the_interpreter():
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(4))
    want = _grads(lambda q, k, v: full_attention(q, k, v, causal=True, backend="torch"), (q, k, v), do)
    op = lambda q, k, v: ops.full_attention_op(q, k, v, None, True, "triton")  # noqa: E731
    got = _grads(torch.compile(op, fullgraph=True, backend="aot_eager"), (q, k, v), do)
    _assert_same(got, want, 1e-4)


def test_compiled_seeded_rotations_inside_a_graph():
    def f(qk, v):
        n_buckets = default_n_buckets(qk.shape[2], 8)  # what lsh_attention draws without rotations
        rot = ops.seeded_rotations_op(5, qk.shape[1], qk.shape[3], 2, rotation_width(n_buckets), qk.device)
        return ops.lsh_attention_op(qk, v, rot, None, ops.n_buckets_arg(n_buckets), 8, False, "chunk", "torch")[0]

    qk, v, do, _, _ = _lsh_inputs(pad=False)
    eager = lambda qk, v: lsh_attention(qk, v, bucket_size=8, n_hashes=2, seed=5, backend="torch")  # noqa: E731
    _assert_same(_grads(torch.compile(f, fullgraph=True, backend="aot_eager"), (qk, v), do), _grads(eager, (qk, v), do),
                 1e-6)


@pytest.mark.parametrize("kw", [dict(seed=3, causal=True), dict(seed=3, n_buckets=(4, 4), bucket_size=4),
                                dict(seed=3, causal=True, causal_mode="chunk", pad=True)])
def test_public_lsh_attention_compiles_with_fullgraph(kw):
    """lsh_attention itself under torch.compile(fullgraph=True): it dispatches to the custom op
    (seeded rotations included) and equals the eager call, outputs and gradients."""
    kw = dict(kw)
    qk, v, do, _, mask = _lsh_inputs(pad=kw.pop("pad", False))
    kw.setdefault("bucket_size", 8)
    f = lambda qk, v: lsh_attention(qk, v, n_hashes=2, key_padding_mask=mask, backend="torch", **kw)  # noqa: E731
    _assert_same(_grads(torch.compile(f, fullgraph=True, backend="aot_eager"), (qk, v), do), _grads(f, (qk, v), do),
                 1e-6)


@pytest.mark.triton
def test_public_full_attention_triton_compiles_with_fullgraph():
    gen = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 20, 16, generator=gen) for _ in range(4))
    f = lambda q, k, v: full_attention(q, k, v, causal=True, backend="triton")  # noqa: E731
    _assert_same(_grads(torch.compile(f, fullgraph=True, backend="aot_eager"), (q, k, v), do), _grads(f, (q, k, v), do),
                 1e-6)
