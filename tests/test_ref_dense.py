"""The dense shared-QK oracle (``reformer.kernels.dense_shared_qk_attention``) against a hand
computation on three positions, its gradients, and the documented constants (docs/lsh.md)."""
from __future__ import annotations

import math

import pytest
import torch

from reformer.kernels import dense_shared_qk_attention, dense_shared_qk_weights
from reformer.kernels.ref_dense import KEY_EPS, SELF_ONLY_LSE

# three positions, D = 2: |qk| = 1, 2, 5, so the keys are (1, 0), (0, 1), (0.6, 0.8)
QK = [[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]]
V = [[1.0, 2.0], [-3.0, 0.5], [4.0, -1.0]]


def by_hand(causal=False, padded=(), scale=1 / math.sqrt(2)):
    """Output rows and lse from the dot products written out with plain floats."""
    keys = [[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]
    out, lse = [], []
    for i in range(3):
        if i in padded:
            out.append([0.0, 0.0])
            lse.append(float("-inf"))
            continue
        allowed = [j for j in range(3) if j != i and j not in padded and (j <= i or not causal)]
        if not allowed:  # the self rule
            out.append(list(V[i]))
            lse.append(-1e5)
            continue
        logits = {j: (QK[i][0] * keys[j][0] + QK[i][1] * keys[j][1]) * scale for j in allowed}
        total = sum(math.exp(s) for s in logits.values())
        out.append([sum(math.exp(logits[j]) / total * V[j][c] for j in allowed) for c in range(2)])
        lse.append(math.log(total))
    return torch.tensor([[out]], dtype=torch.float64), torch.tensor([[lse]], dtype=torch.float64)


@pytest.mark.parametrize("causal,padded", [(False, ()), (True, ()), (False, (1,)), (True, (0,)), (True, (1,))])
def test_oracle_matches_a_hand_computation(causal, padded):
    qk = torch.tensor([[QK]], dtype=torch.float64)
    v = torch.tensor([[V]], dtype=torch.float64)
    mask = None
    if padded:
        mask = torch.zeros(1, 3, dtype=torch.bool)
        mask[0, list(padded)] = True
    out, lse = dense_shared_qk_attention(qk, v, causal=causal, key_padding_mask=mask, return_lse=True)
    want_out, want_lse = by_hand(causal, padded)
    torch.testing.assert_close(out, want_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=0)
    weights = dense_shared_qk_weights(qk, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(weights @ v, want_out, atol=1e-12, rtol=0)


def test_hand_values_of_the_first_rows():
    """Row 0 sees keys 1 and 2 with logits 0 and 0.6/sqrt(2); causal row 1 sees key 0 only."""
    qk = torch.tensor([[QK]], dtype=torch.float64)
    v = torch.tensor([[V]], dtype=torch.float64)
    w = dense_shared_qk_weights(qk)[0, 0]
    p2 = math.exp(0.6 / math.sqrt(2)) / (1 + math.exp(0.6 / math.sqrt(2)))
    torch.testing.assert_close(w[0], torch.tensor([0.0, 1 - p2, p2], dtype=torch.float64), atol=1e-12, rtol=0)
    causal = dense_shared_qk_attention(qk, v, causal=True)[0, 0]
    assert torch.equal(causal[0], v[0, 0, 0])  # nothing before position 0: its own value
    torch.testing.assert_close(causal[1], v[0, 0, 0], atol=1e-12, rtol=0)  # its only key is position 0


def test_scale_and_documented_constants():
    assert KEY_EPS == 1e-6 and SELF_ONLY_LSE == -1e5  # docs/lsh.md, "Shared QK" and "The self rule"
    qk = torch.tensor([[QK]], dtype=torch.float64)
    v = torch.tensor([[V]], dtype=torch.float64)
    out = dense_shared_qk_attention(qk, v, scale=0.25)
    torch.testing.assert_close(out, by_hand(scale=0.25)[0], atol=1e-12, rtol=0)
    qk = torch.tensor([[[[1e-9, 0.0], [1.0, 0.0]]]], dtype=torch.float64)  # |qk_0| below KEY_EPS
    _, lse = dense_shared_qk_attention(qk, torch.ones_like(qk), return_lse=True)
    # one key each, so lse = its logit; k_0 = qk_0 / KEY_EPS = (1e-3, 0), not a unit vector
    torch.testing.assert_close(lse[0, 0], torch.tensor([1e-9, 1e-3], dtype=torch.float64) / math.sqrt(2),
                               atol=1e-15, rtol=1e-9)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    qk = torch.randn(1, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, False, True, False, False]])
    for causal in (False, True):
        torch.autograd.gradcheck(lambda a, b: dense_shared_qk_attention(a, b, causal=causal, key_padding_mask=mask),
                                 (qk, v))


def test_padding_cannot_leak_and_half_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    qk = torch.randn(2, 1, 6, 4, generator=g)
    v = torch.randn(2, 1, 6, 4, generator=g)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    clean = dense_shared_qk_attention(qk, v, key_padding_mask=mask)
    poisoned = dense_shared_qk_attention(qk.masked_fill(mask[:, None, :, None], float("nan")),
                                         v.masked_fill(mask[:, None, :, None], float("inf")), key_padding_mask=mask)
    assert torch.equal(clean, poisoned) and torch.all(clean[1, :, 4:] == 0)
    half = dense_shared_qk_attention(qk.half(), v.half(), key_padding_mask=mask)
    assert half.dtype == torch.float16 and dense_shared_qk_weights(qk.half()).dtype == torch.float32
    torch.testing.assert_close(half.float(), clean, atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        dense_shared_qk_attention(qk, v, key_padding_mask=mask.long())
    with pytest.raises(ValueError, match=r"qk must be \(B, H, N, D\)"):
        dense_shared_qk_attention(qk[0], v[0])
