"""Functional ops (``reformer.kernels``): pure-PyTorch references and Triton kernels.

This package never imports from the ``reformer`` modules; they import from it. The LSH
attention semantics are documented in docs/lsh.md.
"""
from .api import full_attention, lsh_attention, lsh_buckets, resolve_backend, triton_available
from .hashing import default_n_buckets
from .ref_dense import dense_shared_qk_attention, dense_shared_qk_weights

__all__ = ["default_n_buckets", "dense_shared_qk_attention", "dense_shared_qk_weights", "full_attention",
           "lsh_attention", "lsh_buckets", "resolve_backend", "triton_available"]
