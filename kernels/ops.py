"""``torch.library`` custom ops for the attention functions, so ``torch.compile(fullgraph=True)``
can capture models that call them.

The LSH path (hashing, sorting, per-round loops, Triton launches, data-dependent branches on
padding) and the Triton full-attention kernels cannot be traced by dynamo; wrapped as custom
ops they are single opaque graph nodes with fake (meta) implementations for shape propagation
and registered autograd formulas:

- ``reformer::lsh_attention(qk, v, rotations, key_padding_mask, n_buckets, bucket_size, causal,
  causal_mode, backend) -> (out, lse)`` (``n_buckets``: ``[n]`` plain or ``[n1, n2]`` /
  ``[n1, n2, n3]`` factorised)
- ``reformer::full_attention(q, k, v, key_padding_mask, causal, backend) -> out``
- ``reformer::seeded_rotations(seed, heads, dim, n_hashes, width, device) -> rotations``: the
  rotations ``make_rotations(..., seed=seed)`` draws from a seeded CPU generator (a generator
  cannot be created inside a compiled region).

Each forward op runs the eager public function (``reformer.kernels.lsh_attention`` /
``full_attention``) without autograd; its backward op recomputes that forward under autograd
and differentiates it (the functions save only their inputs anyway, so this costs one extra
forward in the backward, and no extra memory between forward and backward). Rotations must be
explicit tensors (the forward and the backward must hash identically); ``rotations`` and
masks get no gradient. Outputs and gradients are contiguous whatever the inputs' strides (the
fake implementations say so; e.g. ``qk`` is usually a permuted view of a projection, and a
fake output with the input's strides would make the compiled graph's later views wrong).

Used by :mod:`reformer.kernels.api` while ``torch.compiler.is_compiling()``; eager calls do not
go through these ops.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


class _autograd_on:
    """Re-enable autograd inside a custom op's implementation (which runs below the autograd
    dispatch keys) so the backward ops can differentiate the recomputed forward."""

    def __enter__(self):
        excluded = torch._C._dispatch_tls_local_exclude_set()
        for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther,
                    torch._C.DispatchKey.ADInplaceOrView):
            excluded = excluded.remove(key)
        self._guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)
        self._guard.__enter__()
        self._grad = torch.enable_grad()
        self._grad.__enter__()
        return self

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        self._guard.__exit__(*exc)
        return False


def _fresh(out: Tensor, *inputs: Tensor) -> Tensor:
    """An op's output as the fake implementations describe it: contiguous, and never one of the
    inputs (an output may not alias an input)."""
    out = out.contiguous()
    return out.clone() if any(out is x for x in inputs) else out


def _grad(grad: Optional[Tensor], x: Tensor) -> Tensor:
    """A contiguous gradient for ``x`` (zeros when autograd gave None)."""
    return x.new_zeros(x.shape) if grad is None else grad.contiguous()


def _lsh_call(qk: Tensor, v: Tensor, rotations: Tensor, key_padding_mask: Optional[Tensor], n_buckets: list[int],
              bucket_size: int, causal: bool, causal_mode: str, backend: str) -> tuple[Tensor, Tensor]:
    from .api import lsh_attention

    return lsh_attention(qk, v, bucket_size=bucket_size, n_hashes=rotations.shape[2], n_buckets=_n_buckets(n_buckets),
                         causal=causal, causal_mode=causal_mode, key_padding_mask=key_padding_mask,
                         rotations=rotations, backend=backend, return_lse=True)


def _n_buckets(n_buckets: list[int]) -> Union[int, tuple[int, ...]]:
    """``[n]`` -> n (plain hashing), ``[n1, n2(, n3)]`` -> (n1, n2(, n3)) (factorised)."""
    return n_buckets[0] if len(n_buckets) == 1 else tuple(n_buckets)


def n_buckets_arg(n_buckets: Union[int, tuple[int, ...], list[int]]) -> list[int]:
    """The op argument for an ``n_buckets`` of ``lsh_attention``."""
    return [n_buckets] if isinstance(n_buckets, int) else list(n_buckets)


@torch.library.custom_op("reformer::lsh_attention", mutates_args=())
def lsh_attention_op(qk: Tensor, v: Tensor, rotations: Tensor, key_padding_mask: Optional[Tensor], n_buckets: list[int],
                     bucket_size: int, causal: bool, causal_mode: str, backend: str) -> tuple[Tensor, Tensor]:
    """Shared-QK LSH attention; returns out (B, H, N, D) in qk's dtype and lse (B, H, N)."""
    with torch.no_grad():
        out, lse = _lsh_call(qk, v, rotations, key_padding_mask, n_buckets, bucket_size, causal, causal_mode, backend)
    return _fresh(out, v), lse.contiguous()


@lsh_attention_op.register_fake
def _(qk, v, rotations, key_padding_mask, n_buckets, bucket_size, causal, causal_mode, backend):
    lse_dtype = torch.float64 if qk.dtype == torch.float64 else torch.float32
    return v.new_empty(v.shape), qk.new_empty(qk.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("reformer::lsh_attention_backward", mutates_args=())
def lsh_attention_backward_op(qk: Tensor, v: Tensor, rotations: Tensor, key_padding_mask: Optional[Tensor],
                              dout: Tensor, dlse: Tensor, n_buckets: list[int], bucket_size: int, causal: bool,
                              causal_mode: str, backend: str) -> tuple[Tensor, Tensor]:
    """(dqk, dv) of ``lsh_attention`` given the gradients of out and lse (recomputes the forward)."""
    with _autograd_on():
        qk_, v_ = qk.detach().requires_grad_(), v.detach().requires_grad_()
        out, lse = _lsh_call(qk_, v_, rotations, key_padding_mask, n_buckets, bucket_size, causal, causal_mode,
                             backend)
        dqk, dv = torch.autograd.grad((out, lse), (qk_, v_), (dout.to(out.dtype), dlse.to(lse.dtype)),
                                      allow_unused=True)
    return _grad(dqk, qk), _grad(dv, v)


@lsh_attention_backward_op.register_fake
def _(qk, v, rotations, key_padding_mask, dout, dlse, n_buckets, bucket_size, causal, causal_mode, backend):
    return qk.new_empty(qk.shape), v.new_empty(v.shape)


def _lsh_setup(ctx, inputs, output) -> None:
    qk, v, rotations, key_padding_mask, n_buckets, bucket_size, causal, causal_mode, backend = inputs
    ctx.save_for_backward(qk, v, rotations, key_padding_mask)
    ctx.options = (n_buckets, bucket_size, causal, causal_mode, backend)


def _lsh_backward(ctx, dout, dlse):
    qk, v, rotations, key_padding_mask = ctx.saved_tensors
    dout = torch.zeros_like(v) if dout is None else dout
    dlse = qk.new_zeros(qk.shape[:3], dtype=torch.float64 if qk.dtype == torch.float64 else torch.float32) \
        if dlse is None else dlse
    dqk, dv = lsh_attention_backward_op(qk, v, rotations, key_padding_mask, dout, dlse, *ctx.options)
    return dqk, dv, None, None, None, None, None, None, None


lsh_attention_op.register_autograd(_lsh_backward, setup_context=_lsh_setup)


def _full_call(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
               backend: str) -> Tensor:
    from .api import full_attention

    return full_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, backend=backend)


@torch.library.custom_op("reformer::full_attention", mutates_args=())
def full_attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                      backend: str) -> Tensor:
    """softmax(q k^T / sqrt(D)) v (no attn_mask, no dropout); (B, H, Nq, Dv)."""
    with torch.no_grad():
        return _fresh(_full_call(q, k, v, key_padding_mask, causal, backend), q, k, v)


@full_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, backend):
    return q.new_empty((*q.shape[:3], v.shape[3]), dtype=v.dtype)


@torch.library.custom_op("reformer::full_attention_backward", mutates_args=())
def full_attention_backward_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], dout: Tensor,
                               causal: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of ``full_attention`` given the output's gradient (recomputes the forward)."""
    with _autograd_on():
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = _full_call(*xs, key_padding_mask, causal, backend)
        grads = torch.autograd.grad(out, xs, dout.to(out.dtype), allow_unused=True)
    return tuple(_grad(g, x) for x, g in zip((q, k, v), grads))


@full_attention_backward_op.register_fake
def _(q, k, v, key_padding_mask, dout, causal, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _full_setup(ctx, inputs, output) -> None:
    q, k, v, key_padding_mask, causal, backend = inputs
    ctx.save_for_backward(q, k, v, key_padding_mask)
    ctx.options = (causal, backend)


def _full_backward(ctx, dout):
    q, k, v, key_padding_mask = ctx.saved_tensors
    dq, dk, dv = full_attention_backward_op(q, k, v, key_padding_mask, dout, *ctx.options)
    return dq, dk, dv, None, None, None


full_attention_op.register_autograd(_full_backward, setup_context=_full_setup)


@torch.library.custom_op("reformer::seeded_rotations", mutates_args=())
def seeded_rotations_op(seed: int, heads: int, dim: int, n_hashes: int, width: int, device: torch.device) -> Tensor:
    """``make_rotations(heads, dim, n_hashes, n_buckets, seed=seed, device=device)`` for any
    ``n_buckets`` of rotation width ``width``: Gaussian (H, D, n_hashes, width) float32 from a
    CPU generator seeded with ``seed``, moved to ``device``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((heads, dim, n_hashes, width), generator=generator).to(device)


@seeded_rotations_op.register_fake
def _(seed, heads, dim, n_hashes, width, device):
    return torch.empty((heads, dim, n_hashes, width), dtype=torch.float32, device=device)
