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


def test_opcheck_with_permuted_inputs():
    """qk and v as permuted views (as a projection's ``b n (h d) -> b h n d`` gives them): the
    fake implementations must describe the real outputs' strides (contiguous), or the compiled
    graph's later views of the output break at run time."""
    qk, v, _, rotations, mask = _lsh_inputs(n=10)
    qk_p, v_p = (x.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for x in (qk, v))
    assert not qk_p.is_contiguous()
    torch.library.opcheck(ops.lsh_attention_op, (qk_p, v_p, rotations, mask, [4], 4, True, "chunk", "torch"))
    torch.library.opcheck(ops.full_attention_op, (qk_p, qk_p, v_p, None, True, "torch"))


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


# ------------------------------------------- a ReformerLM training step: no graph break in attention
import logging  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from reformer import ReformerConfig, ReformerLM  # noqa: E402

ATTENTION_FILES = ("reformer/lsh_attention.py", "reformer/attention.py", "kernels/api.py", "kernels/ops.py",
                   "kernels/lsh_function.py", "kernels/hashing.py")
_BREAK_LOGGERS = ("torch._dynamo.symbolic_convert.__graph_breaks", "torch._dynamo.convert_frame.__graph_breaks")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _files(message: str) -> list[str]:
    """The source files named in a graph-break log message (its location and user traceback)."""
    files = re.findall(r'File "([^"]+)"', message)
    files += re.findall(r"in user code at (\S+?):\d+", message)
    return [Path(f).as_posix() for f in files]


def _in_attention(message: str) -> bool:
    return any(f.endswith(name) or ("/" + name) in f for f in _files(message) for name in ATTENTION_FILES)


def _compile_training_step(attention: str, reversible: bool):
    """Compile (backend aot_eager) and run one training step (forward, loss, backward) of a small
    causal ReformerLM. Returns (graph-break log messages, graphs captured, loss, eager loss,
    gradients, eager gradients)."""
    cfg = ReformerConfig(vocab_size=32, d_model=32, n_heads=2, depth=2, d_ff=64, max_seq_len=64, attention=attention,
                         bucket_size=8, n_hashes=2, causal=True, reversible=reversible, seed=0)
    torch.manual_seed(0)
    model = ReformerLM(cfg)
    tokens = torch.randint(0, 32, (2, 24), generator=torch.Generator().manual_seed(1))

    def step(tokens):
        logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 32), tokens[:, 1:].reshape(-1))
        loss.backward()
        return loss

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)

    handler = _Records()
    loggers = [logging.getLogger(name) for name in _BREAK_LOGGERS]
    torch._dynamo.reset()
    torch._dynamo.utils.reset_graph_break_dup_checker()
    torch._logging.set_logs(graph_breaks=True)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        rng = torch.get_rng_state()
        loss = torch.compile(step, backend=backend)(tokens)
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        torch.set_rng_state(rng)
        eager_loss = step(tokens)
        eager_grads = [p.grad.clone() for p in model.parameters()]
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        torch._logging.set_logs()
        torch._dynamo.reset()
    return handler.messages, graphs, loss, eager_loss, grads, eager_grads


def _targets(graphs) -> set:
    return {node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}


@pytest.mark.parametrize("attention,reversible", [("lsh", True), ("lsh", False), ("full", True)])
def test_training_step_compiles_without_graph_breaks_in_attention(attention, reversible):
    """One compiled training step of a small causal ReformerLM: the attention code (modules,
    dispatch, custom ops, LSH function, hashing) is traced into graphs (the LSH custom op / the
    softmax is in a captured graph) and no graph break is attributed to it (no file of the
    attention code in a break's location or user traceback). Breaks elsewhere (the reversible
    layers' RNG state capture, ``loss.backward()``) are allowed (docs/triton.md, torch.compile).
    The compiled step gives the eager step's loss and gradients."""
    messages, graphs, loss, eager_loss, grads, eager_grads = _compile_training_step(attention, reversible)
    in_attention = [m for m in messages if _in_attention(m)]
    assert not in_attention, "graph breaks in the attention code:\n\n" + "\n\n".join(in_attention)
    targets = _targets(graphs)
    if attention == "lsh":
        assert torch.ops.reformer.lsh_attention.default in targets
    else:
        assert torch.softmax in targets or torch.nn.functional.softmax in targets
    assert torch.allclose(loss, eager_loss, atol=1e-6)
    for g, e in zip(grads, eager_grads):
        assert torch.allclose(g, e, atol=1e-5)
