"""Every Triton kernel configuration compiles ahead of time for sm_80 and sm_90 and fits.

The launchable configurations (kernel x dtype x head block x block config; ``causal`` and
``bucket_size`` are runtime arguments) come from ``reformer.kernels.triton_aot.all_specs``,
which the launchers' own config lists feed. Compilation needs non-interpreted kernels, so it
runs once per session in a subprocess without ``TRITON_INTERPRET`` (tests/conftest.py sets it
for this process), in parallel over the CPUs; Triton's on-disk cache makes repeated runs fast.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from reformer.kernels import triton_aot

pytestmark = pytest.mark.triton

LABELS = [spec.label for spec in triton_aot.all_specs()]
CASES = [(label, target) for label in LABELS for target in triton_aot.TARGETS]


@pytest.fixture(scope="module")
def compiled() -> dict:
    """{label: {target: shared-memory bytes, or the compile error}} from one subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch-time default, stated explicitly
    proc = subprocess.run(
        [sys.executable, "-m", "reformer.kernels.triton_aot", "--json"],
        env=env, capture_output=True, text=True, timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_configuration_was_compiled(compiled):
    assert sorted(compiled) == sorted(LABELS)


@pytest.mark.parametrize("label,target", CASES, ids=[f"{target}-{label}" for label, target in CASES])
def test_compiles_and_fits_in_shared_memory(compiled, label, target):
    shared = compiled[label][target]
    assert isinstance(shared, int), f"{label} does not compile for {target}: {shared}"
    limit = triton_aot.TARGETS[target][1]
    assert shared <= limit, f"{label} needs {shared} bytes of shared memory on {target}; the limit is {limit}"
