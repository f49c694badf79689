"""Every Triton kernel configuration compiles ahead of time for sm_80 and sm_90, fits in shared
memory and does not spill registers, compiled as the JIT builds it.

The launchable configurations (kernel x dtype x head block x block config; ``causal``,
``causal_mode`` and ``bucket_size`` are runtime arguments) come from
``reformer.kernels.triton_aot.all_specs``, which the launchers' own config lists feed. Each is
compiled with the specialisation the JIT uses for aligned inputs (16-byte aligned pointers,
integer arguments divisible by 16) for sm_80 and sm_90, and without those hints (unaligned
inputs) for sm_90. Compilation needs non-interpreted kernels, so it runs once per session in a
subprocess without ``TRITON_INTERPRET`` (tests/conftest.py sets it for this process), in
parallel over the CPUs; Triton's on-disk cache makes repeated runs fast (a cold run compiles
about 240 kernels: ~10 s each per core).

Spill policy (``triton_aot.check``): aligned variants may not spill, except the configurations
listed with their measured spill-store bytes in docs/triton.md ("Spill exceptions"); float16 /
bfloat16 configurations up to head dim 64 never may. Unaligned variants must compile and fit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from triton.backends.compiler import BaseBackend
from triton.runtime.jit import native_specialize_impl

from reformer.kernels import triton_aot, triton_full, triton_lsh
from reformer.kernels.triton_configs import SIGNATURE_DTYPES, not_specialized

pytestmark = pytest.mark.triton

UNALIGNED_TARGETS = ["sm_90"]
JOBS = triton_aot.select(unaligned_targets=UNALIGNED_TARGETS)


@pytest.fixture(scope="module")
def compiled() -> dict:
    """{label: {target: {"shared", "regs", "stack", "spill_stores", ...} or the compile error}}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch-time default, stated explicitly
    proc = subprocess.run(
        [sys.executable, "-m", "reformer.kernels.triton_aot", "--json", "--unaligned-targets", *UNALIGNED_TARGETS],
        env=env, capture_output=True, text=True, timeout=7200,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_every_configuration_was_compiled(compiled):
    assert sorted((label, target) for label, row in compiled.items() for target in row) == sorted(JOBS)


@pytest.mark.parametrize("label,target", JOBS, ids=[f"{target}-{label}" for label, target in JOBS])
def test_compiles_fits_and_does_not_spill(compiled, label, target):
    problem = triton_aot.check(label, target, compiled[label][target], triton_aot.spill_exceptions())
    assert problem is None, f"{label} on {target}: {problem}"


def test_spill_exceptions_are_current(compiled):
    """Every exception in docs/triton.md names a compiled configuration that does spill that much."""
    for (label, target), stores in triton_aot.spill_exceptions().items():
        result = compiled.get(label, {}).get(target)
        assert isinstance(result, dict), f"docs/triton.md lists {label} on {target}, which is not compiled"
        assert result["spill_stores"] == stores, f"{label} on {target} spills {result['spill_stores']}, not {stores}"


def test_aligned_variants_vectorise_their_loads(compiled):
    """The aligned specialisation is a different kernel: wider (vectorised) global loads."""
    for label, row in compiled.items():
        if label.endswith("-unaligned") or "sm_90" not in row:
            continue
        unaligned = compiled.get(label + "-unaligned", {}).get("sm_90")
        if isinstance(unaligned, dict) and isinstance(row["sm_90"], dict):
            assert row["sm_90"]["vector_loads"] > unaligned["vector_loads"], label


# ----------------------------------------------------------- the AOT specialisation is the JIT's
def _record_launches(monkeypatch, module, names, calls):
    for name in names:
        launcher = getattr(module, name)
        monkeypatch.setattr(launcher, "run",
                            lambda dtype, grid, *args, _l=launcher, **kw: calls.append((_l, dtype, args, kw)))


def _jit_view(launcher, args, kwargs):
    """{arg name: (type, divisible by 16)} as the JIT specialises an aligned launch."""
    kernel, skip = launcher.kernel, not_specialized(launcher.kernel)
    view = {}
    for name, value in zip(kernel.arg_names, args):
        ty, key = native_specialize_impl(BaseBackend, value, False, name not in skip, True)
        view[name] = (ty, key == "D")
    return view


def _aot_view(spec):
    sig, attrs = spec.signature(), spec.attrs()
    return {name: (t, (i,) in attrs) for i, (name, t) in enumerate(sig.items()) if t != "constexpr"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_aot_aligned_specialisation_is_what_the_jit_builds(monkeypatch, dtype):
    """Record the kernel arguments of typical aligned launches (N = 128, D = 64, bucket 64,
    8 heads) and check the JIT's specialisation of each against the aligned AOT spec."""
    calls = []
    for module in (triton_lsh, triton_full):
        _record_launches(monkeypatch, module, ("_FWD", "_BWD_DQ", "_BWD_DKDV"), calls)
    g, n, d = 16, 128, 64
    qk, v, do = (torch.randn(g, n, d, dtype=dtype) for _ in range(3))
    pos = torch.arange(n, dtype=torch.int32).repeat(g, 1)
    kw = dict(bucket_size=64, causal=True, causal_mode="chunk", scale=0.125)
    triton_lsh.fwd(qk, v, pos, pos, **kw)
    triton_lsh.bwd(qk, v, pos, pos, do, torch.zeros(g, n), torch.zeros(g, n), **kw)
    q = qk.view(2, 8, n, d)
    triton_full._forward(*(x.reshape(g, n, d) for x in (q, q, q)), torch.zeros(2, n, dtype=torch.int8), 8, True)
    triton_full._backward(qk, qk, qk, torch.zeros(2, n, dtype=torch.int8), qk, torch.zeros(g, n), do, 8, True)
    assert len(calls) == 6
    specs = {(s.kernel.__name__, s.constexprs["BLOCK_D"], s.types.get("QK", s.types.get("Q"))): s
             for s in triton_aot.all_specs() if s.aligned}
    for launcher, call_dtype, args, kwargs in calls:
        name = launcher.kernel.__name__
        ptr = f"*{SIGNATURE_DTYPES[call_dtype]}"
        spec = specs[(name, kwargs["BLOCK_D"], ptr)]
        jit = _jit_view(launcher, args, kwargs)
        aot = _aot_view(spec)
        assert jit == aot, f"{name}: JIT {jit} vs AOT {aot}"


# ------------------------------------------------------------------------------ policy helpers
def test_half_precision_up_to_head_dim_64_may_never_spill():
    assert not triton_aot.may_spill("_lsh_bwd_dkdv_kernel-fp16-D64-BLOCK_M32-BLOCK_N64-w8-s2")
    assert not triton_aot.may_spill("_fwd_kernel-bf16-D16-BLOCK_M64-BLOCK_N64-w4-s2")
    assert triton_aot.may_spill("_fwd_kernel-bf16-D128-BLOCK_M64-BLOCK_N64-w4-s2")
    assert triton_aot.may_spill("_fwd_kernel-fp32-D64-BLOCK_M32-BLOCK_N32-w4-s2")


def test_check_flags_spills_shared_memory_and_stale_exceptions():
    ok = {"shared": 1000, "regs": 200, "stack": 0, "spill_stores": 0, "spill_loads": 0, "vector_loads": 3}
    spill = dict(ok, stack=64, spill_stores=60, spill_loads=64)
    label = "_fwd_kernel-fp32-D128-BLOCK_M32-BLOCK_N32-w4-s2"
    assert triton_aot.check(label, "sm_90", ok, {}) is None
    assert "not listed" in triton_aot.check(label, "sm_90", spill, {})
    assert triton_aot.check(label, "sm_90", spill, {(label, "sm_90"): 60}) is None
    assert "lists 40" in triton_aot.check(label, "sm_90", spill, {(label, "sm_90"): 40})
    assert "shared memory" in triton_aot.check(label, "sm_80", dict(ok, shared=200_000), {})
    assert "does not compile" in triton_aot.check(label, "sm_80", "CompilationError: x", {})
    half = "_fwd_kernel-fp16-D64-BLOCK_M32-BLOCK_N32-w4-s2"
    assert "must not" in triton_aot.check(half, "sm_90", spill, {(half, "sm_90"): 60})
    assert triton_aot.check(half + "-unaligned", "sm_90", spill, {}) is None  # unaligned: compile and fit only
