"""Launch plumbing shared by the Triton kernels: block configs, dtypes, head-dim checks, AOT specs.

A kernel launcher runs its kernel through a :class:`Launcher`: on a GPU the kernel is
autotuned over a short list of :class:`KernelConfig`; under ``TRITON_INTERPRET=1`` (CPU
tensors, the test suite) it runs with one fixed small config, because the autotuner needs
CUDA timers. Each kernel module also lists every configuration it can be launched with as
:class:`AotSpec` records, which :mod:`reformer.kernels.triton_aot` compiles ahead of time for
sm_80 / sm_90 to check that all of them build, fit in shared memory and do not spill registers.

Interpreter caveats (Triton 3.9), bfloat16 only: the interpreter computes ``tl.dot`` on bfloat16
operands from their raw uint16 bits, and it truncates float32 -> bfloat16 where GPUs round to
nearest. So under the interpreter bfloat16 dot operands are cast to float32 (:func:`dot_dtype`)
and kernels write float32 scratch that torch rounds to bfloat16 (:func:`storage_dtype`).
Compiled kernels use bfloat16 tensor-core dots and bfloat16 stores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .limits import TRITON_HEAD_DIMS as HEAD_DIMS  # supported head dims, inclusive (one definition)

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
SIGNATURE_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes (constexpr name -> value) plus warps and software-pipelining stages."""

    blocks: Mapping[str, int]
    num_warps: int = 4
    num_stages: int = 2

    def to_triton(self) -> triton.Config:
        return triton.Config(dict(self.blocks), num_warps=self.num_warps, num_stages=self.num_stages)

    def label(self) -> str:
        parts = [f"{k}{v}" for k, v in self.blocks.items()] + [f"w{self.num_warps}", f"s{self.num_stages}"]
        return "-".join(parts)


@dataclass(frozen=True)
class AotSpec:
    """One launchable configuration of one kernel: what ``ASTSource`` + ``triton.compile`` need.

    ``aligned``: compile the variant the JIT builds for 16-byte aligned pointers and integer
    arguments divisible by 16 (``tt.divisibility = 16`` on each, the usual case: contiguous
    tensors with head dim and lengths multiples of 16), which vectorises loads; otherwise the
    variant without those hints (scalar loads). Arguments listed in the kernel's
    ``do_not_specialize`` never get hints (the JIT does not specialise them either).
    """

    kernel: Any  # JITFunction (AOT compilation only works outside the interpreter)
    types: Mapping[str, str]  # argument -> Triton type when not "i32", e.g. {"Q": "*fp16", "scale": "fp32"}
    constexprs: Mapping[str, Any]
    config: KernelConfig
    label: str
    aligned: bool = True

    def signature(self) -> dict[str, str]:
        """Triton signature: ``constexpr`` for constexprs, ``types[name]`` or else ``i32``."""
        constexprs = {**self.constexprs, **self.config.blocks}
        return {
            name: "constexpr" if name in constexprs else self.types.get(name, "i32")
            for name in self.kernel.arg_names
        }

    def attrs(self) -> dict[tuple[int, ...], list]:
        """Divisibility hints as the JIT derives them for aligned inputs (none when unaligned)."""
        if not self.aligned:
            return {}
        fixed = not_specialized(self.kernel)
        return {
            (i,): [["tt.divisibility", 16]]
            for i, (name, t) in enumerate(self.signature().items())
            if name not in fixed and (t.startswith("*") or t in ("i32", "i64"))
        }


def not_specialized(kernel: Any) -> set[str]:
    """Names of the kernel arguments listed in its ``do_not_specialize`` (JIT or interpreted)."""
    if hasattr(kernel, "params"):
        return {p.name for p in kernel.params if p.do_not_specialize}
    names = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    return {kernel.arg_names[n] if isinstance(n, int) else n for n in names}


def is_interpreted(kernel: Any) -> bool:
    """True when ``kernel`` was decorated under ``TRITON_INTERPRET=1``."""
    return isinstance(kernel, InterpretedFunction)


def dot_dtype(dtype: torch.dtype, interpreted: bool) -> tl.dtype:
    """Element type that ``tl.dot`` operands are cast to (see the interpreter caveat above)."""
    if dtype == torch.bfloat16 and interpreted:
        return tl.float32
    return TL_DTYPES[dtype]


def storage_dtype(dtype: torch.dtype, interpreted: bool) -> torch.dtype:
    """dtype of the buffers kernels write their outputs to (see the interpreter caveats above)."""
    return torch.float32 if (dtype == torch.bfloat16 and interpreted) else dtype


def check_kernel_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in TL_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton backend, got {dtype}")


def head_block(name: str, head_dim: int) -> int:
    """Power-of-two block covering ``head_dim``; raises for head dims outside 16..128."""
    lo, hi = HEAD_DIMS
    if not lo <= head_dim <= hi:
        raise ValueError(f"{name} head dim must be in {lo}..{hi} for the Triton backend, got {head_dim}")
    return triton.next_power_of_2(head_dim)


def head_blocks() -> tuple[int, ...]:
    """Every power-of-two head block a launcher can pick."""
    return tuple(sorted({head_block("D", d) for d in range(HEAD_DIMS[0], HEAD_DIMS[1] + 1)}))


class Launcher:
    """Runs ``kernel`` autotuned over its configs (GPU) or with ``interpreter_config``.

    ``configs`` maps ``(dtype, BLOCK_D)`` (or just ``dtype``) to the block configs tried for
    that input dtype and head block; ``grid`` maps the chosen config's block sizes to the launch
    grid; ``key`` names the kernel arguments whose values select a tuned config (argument dtypes
    are always part of it); ``restore`` names tensors the kernel reads and then overwrites, which
    the autotuner must restore between its benchmark runs.
    """

    def __init__(self, kernel: Any, configs: Mapping[Any, Sequence[KernelConfig]], key: Sequence[str],
                 interpreter_config: KernelConfig, restore: Sequence[str] = ()) -> None:
        self.kernel = kernel
        self.configs = {k: tuple(cfgs) for k, cfgs in configs.items()}
        self.key = list(key)
        self.interpreter_config = interpreter_config
        self.restore = list(restore)
        self._tuned: dict[Any, Any] = {}

    @property
    def interpreted(self) -> bool:
        return is_interpreted(self.kernel)

    def configs_for(self, dtype: torch.dtype, block_d: int) -> tuple[KernelConfig, ...]:
        """The block configs for inputs of ``dtype`` with head block ``block_d``."""
        return self.configs.get((dtype, block_d)) or self.configs[dtype]

    def run(self, dtype: torch.dtype, grid: Callable[[Mapping[str, Any]], tuple], *args: Any, **kwargs: Any) -> None:
        """Launch for inputs of ``dtype`` (which, with the ``BLOCK_D`` keyword, selects the configs)."""
        if self.interpreted:
            cfg = self.interpreter_config
            self.kernel[grid(cfg.blocks)](*args, **kwargs, **cfg.blocks)
            return
        key = (dtype, kwargs["BLOCK_D"])
        if key not in self._tuned:
            configs = [c.to_triton() for c in self.configs_for(*key)]
            self._tuned[key] = triton.autotune(configs, key=self.key, restore_value=self.restore)(self.kernel)
        self._tuned[key][grid](*args, **kwargs)

    def aot_specs(self, types: Mapping[str, str]) -> list[AotSpec]:
        """Every configuration this launcher can run: dtype x head block x block config, each
        aligned and unaligned (see :class:`AotSpec`).

        ``types`` gives the non-i32 arguments' Triton types, ``{dt}`` standing for the input
        dtype (e.g. ``{"Q": "*{dt}", "Lse": "*fp32", "scale": "fp32"}``).
        """
        specs = []
        for dtype, name in SIGNATURE_DTYPES.items():
            arg_types = {arg: t.format(dt=name) for arg, t in types.items()}
            for block_d in head_blocks():
                for cfg in self.configs_for(dtype, block_d):
                    consts = {"DOT": dot_dtype(dtype, False), "BLOCK_D": block_d}
                    label = f"{self.kernel.__name__}-{name}-D{block_d}-{cfg.label()}"
                    for aligned in (True, False):
                        specs.append(AotSpec(self.kernel, arg_types, consts, cfg, label + ("" if aligned else "-unaligned"),
                                             aligned))
        return specs
