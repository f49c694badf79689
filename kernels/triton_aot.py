"""Ahead-of-time compilation of every Triton kernel configuration for real GPU targets.

Works on a machine without a GPU: ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs the whole NVIDIA pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with ptxas) and
reports the shared memory each kernel needs, which must fit the target's per-block limit.

    python -m reformer.kernels.triton_aot            # table of shared memory per config
    python -m reformer.kernels.triton_aot --json     # {label: {target: bytes or error}}

Needs ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Optional, Union

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import triton_full, triton_lsh
from .triton_configs import AotSpec, is_interpreted

# target name -> (compute capability, shared memory per block in bytes)
TARGETS = {"sm_80": (80, 166_912), "sm_90": (90, 232_448)}


def all_specs() -> list[AotSpec]:
    """Every launchable configuration of every kernel, longest compiles (largest tiles) first."""
    specs = triton_full.aot_specs() + triton_lsh.aot_specs()
    return sorted(specs, key=lambda s: (-s.constexprs["BLOCK_D"], s.constexprs["DOT"] != tl.float32))


def compile_spec(spec: AotSpec, target: str) -> int:
    """Compile one configuration for ``target`` ("sm_80" / "sm_90"); returns its shared memory in bytes."""
    if is_interpreted(spec.kernel):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset when the kernels are imported")
    capability = TARGETS[target][0]
    src = ASTSource(fn=spec.kernel, signature=spec.signature(), constexprs={**spec.constexprs, **spec.config.blocks})
    options = {"num_warps": spec.config.num_warps, "num_stages": spec.config.num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    return int(compiled.metadata.shared)


def _compile_or_error(job: tuple[int, str]) -> Union[int, str]:
    index, target = job
    try:
        return compile_spec(all_specs()[index], target)
    except Exception as exc:  # reported per configuration, not raised
        return f"{type(exc).__name__}: {exc}"


def compile_all(workers: Optional[int] = None) -> dict[str, dict[str, Union[int, str]]]:
    """Compile every configuration for every target in parallel: {label: {target: bytes or error}}."""
    specs = all_specs()
    jobs = [(i, target) for i in range(len(specs)) for target in TARGETS]
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count()) as pool:
        results = list(pool.map(_compile_or_error, jobs))
    table: dict[str, dict[str, Union[int, str]]] = {spec.label: {} for spec in specs}
    for (i, target), result in zip(jobs, results):
        table[specs[i].label][target] = result
    return table


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--workers", type=int, default=None, help="compile processes (default: all CPUs)")
    args = parser.parse_args(argv)
    table = compile_all(args.workers)
    if args.json:
        json.dump(table, sys.stdout)
        return 0
    print(f"{'configuration':70s}" + "".join(f"{t:>10s}" for t in TARGETS))
    failed = False
    for label, row in table.items():
        cells = []
        for target, (_, limit) in TARGETS.items():
            ok = isinstance(row[target], int) and row[target] <= limit
            failed |= not ok
            cells.append(f"{row[target]:>10}" if isinstance(row[target], int) else "     ERROR")
        print(f"{label:70s}" + "".join(cells))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
