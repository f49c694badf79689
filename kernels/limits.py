"""What the Triton kernels accept: one definition for the dispatcher and the kernels.

No ``triton`` import here, so ``reformer.kernels.api`` can decide whether a call is within the
Triton kernels' limits (and fall back to the pure-PyTorch reference when it is not) without
Triton installed.
"""
from __future__ import annotations

import torch

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_HEAD_DIMS = (16, 128)  # inclusive range of head dims the Triton kernels take


def triton_supports(dtype: torch.dtype, *head_dims: int) -> bool:
    """True when the Triton kernels take this dtype and these head dims."""
    lo, hi = TRITON_HEAD_DIMS
    return dtype in TRITON_DTYPES and all(lo <= d <= hi for d in head_dims)
