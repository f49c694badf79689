"""AxialPositionalEncoding: values against a per-position construction, any N <= prod(shape),
parameter counts, gradients to every axis table, and that only the needed rows are expanded."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reformer import AxialPositionalEncoding

CASES = [  # (d_model, axial_shape, axial_dims)
    (12, (4, 5), None),
    (12, (4, 5), (5, 7)),
    (10, (2, 3, 4), None),
    (10, (2, 3, 4), (3, 3, 4)),
]


def expected_encoding(enc: AxialPositionalEncoding, n: int) -> torch.Tensor:
    """Position by position: row-major grid index, then sum or concatenate the axis rows."""
    rows = []
    for p in range(n):
        index, rest = [], p
        for size in reversed(enc.axial_shape):
            rest, i = divmod(rest, size)
            index.insert(0, i)
        parts = [table[i] for table, i in zip(enc.weights, index)]
        rows.append(torch.cat(parts) if enc.axial_dims is not None else torch.stack(parts).sum(0))
    return torch.stack(rows)


@pytest.mark.parametrize("d_model, shape, dims", CASES)
def test_values_for_every_length_up_to_prod(d_model, shape, dims):
    torch.manual_seed(0)
    enc = AxialPositionalEncoding(d_model, shape, dims)
    full = math.prod(shape)
    for n in (1, shape[-1] - 1, shape[-1] + 1, full - 1, full):
        torch.testing.assert_close(enc.encoding(n), expected_encoding(enc, n), rtol=0, atol=1e-6)


@pytest.mark.parametrize("d_model, shape, dims", CASES)
def test_forward_adds_to_input(d_model, shape, dims):
    enc = AxialPositionalEncoding(d_model, shape, dims)
    x = torch.randn(3, 7, d_model, dtype=torch.float64)
    out = enc(x)
    assert out.shape == x.shape and out.dtype == torch.float64
    torch.testing.assert_close(out - x, enc.encoding(7).double().expand(3, -1, -1))


@pytest.mark.parametrize("d_model, shape, dims", CASES)
def test_longer_than_prod_raises(d_model, shape, dims):
    enc = AxialPositionalEncoding(d_model, shape, dims)
    with pytest.raises(ValueError, match="longer than prod"):
        enc(torch.zeros(1, math.prod(shape) + 1, d_model))


@pytest.mark.parametrize("d_model, shape, dims", CASES)
def test_parameter_count_is_sum_over_axes(d_model, shape, dims):
    enc = AxialPositionalEncoding(d_model, shape, dims)
    widths = dims if dims is not None else (d_model,) * len(shape)
    count = sum(p.numel() for p in enc.parameters())
    assert count == sum(n * w for n, w in zip(shape, widths))
    assert count < math.prod(shape) * d_model


@pytest.mark.parametrize("d_model, shape, dims", CASES)
def test_gradients_reach_every_axis_table(d_model, shape, dims):
    enc = AxialPositionalEncoding(d_model, shape, dims)
    inner = math.prod(shape[1:])
    n = inner + 1  # two rows of the first axis, every row of the others
    enc(torch.zeros(2, n, d_model)).square().sum().backward()
    first, *others = enc.weights
    assert first.grad[:2].abs().sum(-1).gt(0).all() and first.grad[2:].eq(0).all()
    for table in others:
        assert table.grad.abs().sum(-1).gt(0).all()


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("dims", [None, (2, 2)])
def test_short_sequence_expands_only_the_rows_it_needs(dims):
    enc = AxialPositionalEncoding(4, (4096, 4096), dims)  # 16.7M positions; 32K table rows
    with _LargestTensor() as probe:
        table = enc.encoding(100)
    assert table.shape == (100, 4)
    assert probe.largest <= 4096 * 4  # one first-axis row of the grid, not 16.7M positions


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="axial_shape"):
        AxialPositionalEncoding(8, (16,))
    with pytest.raises(ValueError, match="axial_shape"):
        AxialPositionalEncoding(8, (4, 0))
    with pytest.raises(ValueError, match="sum to d_model"):
        AxialPositionalEncoding(8, (4, 4), (4, 3))
    with pytest.raises(ValueError, match="one entry per axis"):
        AxialPositionalEncoding(8, (4, 4), (2, 2, 4))
    enc = AxialPositionalEncoding(8, (4, 4))
    with pytest.raises(ValueError, match="d_model=8"):
        enc(torch.zeros(1, 3, 6))


@pytest.mark.parametrize("shape", [(48,), [], (8, 0, 6), (8, True, 6), (6, 8.0), "68", 48])
def test_config_and_module_reject_bad_axial_shape_alike(shape):
    """ReformerConfig and AxialPositionalEncoding share one axial_shape check: same error, same text."""
    from reformer import ReformerConfig
    errors = []
    for build in (lambda: AxialPositionalEncoding(48, shape),
                  lambda: ReformerConfig(d_model=48, n_heads=4, max_seq_len=48, axial_shape=shape)):
        with pytest.raises((ValueError, TypeError)) as info:
            build()
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1] and "axial_shape" in errors[0][1]
