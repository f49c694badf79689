"""Functional ops (``reformer.kernels``): pure-PyTorch references and Triton kernels.

This package never imports from the ``reformer`` modules; they import from it.
"""
from .api import full_attention, lsh_attention, lsh_buckets, resolve_backend, triton_available

__all__ = ["full_attention", "lsh_attention", "lsh_buckets", "resolve_backend", "triton_available"]
