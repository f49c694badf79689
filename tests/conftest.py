"""Shared test set-up. Triton kernels run on CPU tensors under the Triton interpreter in this test suite.

``TRITON_INTERPRET`` is read when a ``@triton.jit`` kernel is decorated, i.e. when a
``reformer.kernels.triton_*`` module is first imported; pytest imports this file before any
test module, so every kernel imported by the tests is interpreted. The ahead-of-time compile
tests (tests/test_triton_compile.py) need real kernels and run in a subprocess without it.
"""
import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy machine
    (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
