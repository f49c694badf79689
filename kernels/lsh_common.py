"""Compatibility names for modules written against the earlier layout of the LSH machinery.

Hashing now lives in :mod:`reformer.kernels.hashing`, the multi-round Function and the core
seam in :mod:`reformer.kernels.lsh_function` (semantics: docs/lsh.md). The per-round core no
longer uses a constant own-position logit: the own position is masked with -inf, and
``SELF_LOGIT`` survives only as the lse reported for rows with no permitted key.
"""
from .hashing import KEY_EPS, compute_dtype, padded_length  # noqa: F401
from .lsh_function import SELF_ONLY_LSE

SELF_LOGIT = SELF_ONLY_LSE  # kept for importers; see the module docstring
