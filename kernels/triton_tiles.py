"""Device-side (``@triton.jit``) helpers shared by the Triton attention kernels.

Matmul precision: every ``tl.dot`` multiplies a raw input tile (exact in its dtype) by either
another raw tile or a float32 intermediate (probabilities, score gradients). A float32
intermediate is split into a head and a tail in the dot dtype (:func:`dot_hi_lo`), so float16 /
bfloat16 kernels keep about float32 accuracy at the cost of a second tensor-core dot; float32
inputs use 3xTF32 dots (about float32 accuracy on tensor cores).

Half precision: a float32 value only enters a float16 dot after it has been bounded to well
inside the float16 range (probabilities, or score gradients times a factor in [0.5, 4) --
see :func:`pow2_split`); anything that may leave the float16 range (e.g. a gradient times
1 / ||key|| for a near-zero key, up to 1 / KEY_EPS) is formed in float32 and folded into an
exact power-of-two rescaling of the raw tile instead.

Offsets: the program's group index is widened to int64 (:func:`program_id64`), so
``g * stride_g`` never wraps; offsets inside one group (``row * stride_row``) stay int32 and
the launchers check that a group holds fewer than 2**31 elements.
"""
from __future__ import annotations

import triton
import triton.language as tl


INT32_LIMIT = 2**31  # a group (one (Np, D) slab) must hold fewer elements than this


@triton.jit
def program_id64(axis: tl.constexpr):
    """``tl.program_id(axis)`` as int64, so products with strides are computed in 64 bits."""
    return tl.program_id(axis).to(tl.int64)


@triton.jit
def pow2_split(inv):
    """Split positive float32 factors ``inv`` into ``2**e * c`` with c in about [0.5, 4):
    returns (2**e, c). Multiplying a raw float16/bfloat16 tile by 2**e is exact (barring
    underflow far below the row's norm), so ``(a * inv) @ x == (a * c) @ (x * 2**e)`` with
    ``a * c`` as small as ``a``."""
    e = tl.minimum(tl.maximum(tl.floor(tl.log2(inv)), -100.0), 100.0).to(tl.int32)
    pw = ((e + 127) << 23).to(tl.float32, bitcast=True)
    return pw, inv / pw


@triton.jit
def load_tile(base, rows, n_rows, cols, n_cols, stride_row):
    """(len(rows), len(cols)) tile of a row-major matrix, zeros outside ``n_rows x n_cols``."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(base + rows[:, None] * stride_row + cols[None, :], mask=mask, other=0.0)


@triton.jit
def store_tile(base, value, rows, n_rows, cols, n_cols, stride_row):
    """Store ``value`` (cast to the pointer's element type) inside ``n_rows x n_cols``."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(base + rows[:, None] * stride_row + cols[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def dot(a, b, DOT: tl.constexpr):
    """a @ b for tiles already exact in ``DOT`` (raw inputs), float32 accumulation."""
    return tl.dot(a.to(DOT), b.to(DOT), input_precision="tf32x3")


@triton.jit
def dot_hi_lo(a, b, DOT: tl.constexpr):
    """a @ b for a float32 tile ``a`` and a raw tile ``b``; ``a`` = head + tail in ``DOT``."""
    hi = a.to(DOT)
    acc = tl.dot(hi, b.to(DOT), input_precision="tf32x3")
    if DOT != tl.float32:
        acc += tl.dot((a - hi.to(tl.float32)).to(DOT), b.to(DOT), input_precision="tf32x3")
    return acc


@triton.jit
def lse_for_probs(lse):
    """Saved log-sum-exp ready for ``p = exp(s - lse)``: rows without keys (-inf) get +inf, so p = 0."""
    return tl.where(lse == float("-inf"), float("inf"), lse)


@triton.jit
def online_softmax_step(m_i, l_i, acc, s, v, DOT: tl.constexpr):
    """Fold one tile of logits ``s`` (-inf = not permitted) and values ``v`` into the running max
    ``m_i``, normaliser ``l_i`` and output accumulator ``acc`` (natural-log domain, so that equal
    logits such as the LSH self logit cancel exactly)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no permitted key yet: shift by 0, not -inf
    p = tl.exp(s - m_ref[:, None])
    alpha = tl.exp(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot_hi_lo(p, v, DOT)
    return m_new, l_i, acc


@triton.jit
def finish_softmax(m_i, l_i, acc):
    """Normalised output and log-sum-exp; rows with no permitted key give 0 and -inf."""
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    lse = tl.where(has_key, m_i + tl.log(l_safe), float("-inf"))
    return acc / l_safe[:, None], lse
