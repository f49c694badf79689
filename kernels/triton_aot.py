"""Ahead-of-time compilation of every Triton kernel configuration for real GPU targets.

Works on a machine without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with ptxas). Each
configuration is compiled as the JIT would build it for aligned inputs (16-byte aligned
pointers, integer arguments divisible by 16: vectorised loads) and without those hints
(unaligned inputs), and reports:

- shared memory per block, which must fit the target's limit;
- registers per thread and the stack frame (local memory; non-zero means register spills),
  read from the cubin with ``cuobjdump -res-usage``; when the stack frame is non-zero, the
  spill stores/loads in bytes from ``ptxas -v``.

Policy (:func:`check`): every variant must compile and fit in shared memory; no aligned variant
may spill, except those listed with their measured spill-store bytes in the "Spill exceptions"
table of docs/triton.md; float16/bfloat16 configurations with head dims up to 64 may never
spill. Unaligned variants (scalar loads: a fallback for unusual strides) are reported, not held
to the spill rule.

    python -m reformer.kernels.triton_aot                 # table, progress on stderr
    python -m reformer.kernels.triton_aot --json          # {label: {target: {...} or error}}
    python -m reformer.kernels.triton_aot --only lsh_bwd  # configurations whose label contains it

Needs ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled). Results are cached
by Triton in ``~/.triton/cache``: a warm run takes seconds, a cold one about
``COLD_SECONDS`` per compilation and CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Optional, Union

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_full, triton_lsh
from .triton_configs import AotSpec, is_interpreted

# target name -> (compute capability, shared memory per block in bytes)
TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448)}
COLD_SECONDS = 8.0  # rough cold compile time of one configuration for one target on one CPU core
Result = Union[dict, str]


def all_specs() -> list[AotSpec]:
    """Every launchable configuration of every kernel (aligned and unaligned), longest compiles
    (largest tiles) first."""
    specs = triton_full.aot_specs() + triton_lsh.aot_specs()
    return sorted(specs, key=lambda s: (-s.constexprs["BLOCK_D"], s.constexprs["DOT"] != tl.float32))


def _tool(name: str) -> str:
    return getattr(triton.knobs.nvidia, name).path


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers per thread, stack frame bytes) of the single kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cannot parse cuobjdump -res-usage output: {text!r}")
    return int(match.group(1)), int(match.group(2))


def _spills(ptx: str, capability: int) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from ``ptxas -v`` on the kernel's PTX (the ptxas
    Triton itself uses for this target)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas, arch = get_ptxas(capability).path, sm_arch_from_capability(capability)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", str(src), "-o",
                               str(Path(tmp) / "k.o")], capture_output=True, text=True, check=True)
    match = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stderr + proc.stdout)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def compile_spec(spec: AotSpec, target: str) -> dict:
    """Compile one configuration for ``target`` ("sm_80" / "sm_90").

    Returns ``{"shared": bytes, "regs": per thread, "stack": bytes, "spill_stores": bytes,
    "spill_loads": bytes, "vector_loads": number of vectorised global load instructions in the PTX}``.
    """
    if is_interpreted(spec.kernel):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset when the kernels are imported")
    capability = TARGETS[target][0]
    src = ASTSource(fn=spec.kernel, signature=spec.signature(), constexprs={**spec.constexprs, **spec.config.blocks},
                    attrs=spec.attrs())
    options = {"num_warps": spec.config.num_warps, "num_stages": spec.config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    regs, stack = _resource_usage(compiled.asm["cubin"])
    stores, loads = _spills(compiled.asm["ptx"], capability) if stack else (0, 0)
    return {"shared": int(compiled.metadata.shared), "regs": regs, "stack": stack, "spill_stores": stores,
            "spill_loads": loads, "vector_loads": compiled.asm["ptx"].count("ld.global.v")}


def _compile_or_error(job: tuple[str, str]) -> Result:
    label, target = job
    try:
        spec = next(s for s in all_specs() if s.label == label)
        return compile_spec(spec, target)
    except Exception as exc:  # reported per configuration, not raised
        return f"{type(exc).__name__}: {exc}"


def select(only: Optional[str] = None, targets: Optional[list[str]] = None,
           unaligned_targets: Optional[list[str]] = None) -> list[tuple[str, str]]:
    """(label, target) jobs: every configuration whose label contains ``only``, aligned for
    ``targets`` (default: all) and unaligned for ``unaligned_targets`` (default: ``targets``)."""
    targets = list(targets or TARGETS)
    unaligned_targets = targets if unaligned_targets is None else list(unaligned_targets)
    jobs = []
    for spec in all_specs():
        if only and only not in spec.label:
            continue
        for target in (targets if spec.aligned else unaligned_targets):
            jobs.append((spec.label, target))
    return jobs


def compile_all(jobs: list[tuple[str, str]], workers: Optional[int] = None,
                progress=None) -> dict[str, dict[str, Result]]:
    """Compile ``jobs`` in parallel: {label: {target: result or error}}. ``progress(done, total,
    label, target, result, seconds)`` is called as each one finishes."""
    workers = workers or os.cpu_count() or 1
    table: dict[str, dict[str, Result]] = {}
    start = time.monotonic()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_compile_or_error, job): job for job in jobs}
        for done, future in enumerate(as_completed(futures), 1):
            label, target = futures[future]
            table.setdefault(label, {})[target] = future.result()
            if progress is not None:
                progress(done, len(jobs), label, target, table[label][target], time.monotonic() - start)
    return {label: table[label] for label, _ in jobs if label in table}


DOC = Path(__file__).resolve().parent.parent / "docs" / "triton.md"


def spill_exceptions(doc: Path = DOC) -> dict[tuple[str, str], int]:
    """{(label, target): spill-store bytes} from the "Spill exceptions" table of docs/triton.md
    (rows ``| `label` | target | bytes | ... |``); empty if the file or the table is absent."""
    if not doc.exists():
        return {}
    text = doc.read_text()
    start = text.find("## Spill exceptions")
    if start < 0:
        return {}
    section = text[start:].split("\n## ", 1)[0]
    rows = re.findall(r"^\|\s*`([^`]+)`\s*\|\s*(sm_\d+)\s*\|\s*(\d+)\s*\|", section, flags=re.MULTILINE)
    return {(label, target): int(stores) for label, target, stores in rows}


def may_spill(label: str) -> bool:
    """False for float16/bfloat16 configurations with head blocks up to 64: those never may."""
    match = re.search(r"-(fp16|bf16|fp32)-D(\d+)-", label)
    return not (match and match.group(1) in ("fp16", "bf16") and int(match.group(2)) <= 64)


def check(label: str, target: str, result: Result, exceptions: dict[tuple[str, str], int]) -> Optional[str]:
    """None when the configuration is fine, else what is wrong with it."""
    if not isinstance(result, dict):
        return f"does not compile: {result}"
    limit = TARGETS[target][1]
    if result["shared"] > limit:
        return f"needs {result['shared']} bytes of shared memory; the limit is {limit}"
    if result["stack"] == 0 or label.endswith("-unaligned"):
        return None  # unaligned variants (scalar loads, a slower fallback) must compile and fit
    listed = exceptions.get((label, target))
    if not may_spill(label):
        return f"spills ({result['spill_stores']} bytes of stores); float16/bfloat16 up to D=64 must not"
    if listed is None:
        return (f"spills {result['spill_stores']} bytes (stack {result['stack']}) and is not listed in the spill "
                f"exceptions of docs/triton.md")
    if listed != result["spill_stores"]:
        return f"spills {result['spill_stores']} bytes but docs/triton.md lists {listed}"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: all CPUs)")
    parser.add_argument("--only", default=None, help="only configurations whose label contains this")
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), default=None,
                        help="targets for the aligned variant (default: all)")
    parser.add_argument("--unaligned-targets", nargs="*", choices=sorted(TARGETS), default=None,
                        help="targets for the unaligned variant (default: the --targets)")
    args = parser.parse_args(argv)
    jobs = select(args.only, args.targets, args.unaligned_targets)
    workers = args.workers or os.cpu_count() or 1
    print(f"compiling {len(jobs)} configurations x targets on {workers} processes: about "
          f"{len(jobs) * COLD_SECONDS / workers / 60:.0f} min when Triton's cache is cold, seconds when warm",
          file=sys.stderr, flush=True)

    def progress(done, total, label, target, result, seconds):
        what = (f"regs {result['regs']:3d} stack {result['stack']:5d} shared {result['shared']:6d}"
                if isinstance(result, dict) else "ERROR")
        print(f"[{done:3d}/{total}] {seconds:6.0f}s {target} {label} {what}", file=sys.stderr, flush=True)

    table = compile_all(jobs, workers, progress)
    if args.json:
        json.dump(table, sys.stdout)
        return 0
    exceptions = spill_exceptions()
    print(f"{'configuration':72s} {'target':6s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s} {'shared':>8s}  status")
    failed = False
    for label, row in table.items():
        for target, result in row.items():
            problem = check(label, target, result, exceptions)
            failed |= problem is not None
            if isinstance(result, dict):
                cells = f"{result['regs']:5d} {result['spill_stores']:9d} {result['spill_loads']:9d} {result['shared']:8d}"
            else:
                cells = f"{'-':>5s} {'-':>9s} {'-':>9s} {'-':>8s}"
            print(f"{label:72s} {target:6s} {cells}  {problem or 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
