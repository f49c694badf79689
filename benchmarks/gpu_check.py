"""One-command check for a machine with an NVIDIA GPU: are the Triton kernels right, and how fast?

    python -m benchmarks gpu-check                 # correctness, then timings at 4K..64K
    python -m benchmarks.gpu_check --no-timing     # correctness only (the same, standalone)

1. Correctness: ``lsh_attention`` and ``full_attention`` with ``backend="triton"`` against
   ``backend="torch"`` on the GPU, outputs and gradients, in float32, float16 and bfloat16,
   on odd and power-of-two lengths, causal and not, with padding. Both are compared to a
   float64 run of the torch backend: the Triton error must be at most twice the torch
   backend's own error in that dtype (plus a small floor). Any failure: exit code 1.
2. Timing (forward + backward, CUDA events, median of ``--repeats``): LSH attention (Triton)
   vs PyTorch SDPA (and ``flash_attn.flash_attn_func`` when installed) at 4K..64K tokens,
   printed with the achieved TFLOP/s and GB/s and their share of the device's peak (a table
   of known peaks by device name; otherwise an estimate from the SM count, marked as such).

FLOP model (forward + backward = 3.5x the forward's two matmuls, as for flash attention):
LSH ``3.5 * 4 * G * N * K * D * n_hashes`` with ``K = 2 * bucket_size`` keys per query;
full attention ``3.5 * 4 * G * N**2 * D`` (halved when causal). Bytes: LSH from
``reformer.kernels.triton_lsh.model_bytes``; SDPA/flash the compulsory traffic (q, k, v, out,
dO read or written once, dq, dk, dv written once).

Without CUDA it prints why it cannot run and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

DEFAULT_LENGTHS = (4096, 8192, 16384, 32768, 65536)


@dataclass(frozen=True)
class Peak:
    """Dense tensor-core FLOP/s for float16/bfloat16 (float32 accumulation), float32 FLOP/s
    (TF32 tensor cores where available: the kernels' float32 dots are 3xTF32) and DRAM bytes/s."""

    half: float
    f32: float
    bandwidth: float
    estimated: bool = False


# name fragment (matched in order against torch.cuda.get_device_name) -> vendor datasheet peaks
KNOWN_PEAKS: tuple[tuple[str, Peak], ...] = (
    ("H100 PCIe", Peak(756e12, 378e12, 2.0e12)),
    ("H100 NVL", Peak(835e12, 418e12, 3.9e12)),
    ("H100", Peak(989e12, 495e12, 3.35e12)),  # SXM5, named e.g. "NVIDIA H100 80GB HBM3"
    ("H200", Peak(989e12, 495e12, 4.8e12)),
    ("GH200", Peak(989e12, 495e12, 4.0e12)),
    ("A100-SXM4-80GB", Peak(312e12, 156e12, 2.039e12)),
    ("A100 80GB PCIe", Peak(312e12, 156e12, 1.935e12)),
    ("A100", Peak(312e12, 156e12, 1.555e12)),
    ("A10G", Peak(70e12, 35e12, 0.6e12)),
    ("A10", Peak(125e12, 62.5e12, 0.6e12)),
    ("L40S", Peak(362e12, 183e12, 0.864e12)),
    ("L4", Peak(121e12, 60e12, 0.3e12)),
    ("RTX 4090", Peak(165e12, 82.6e12, 1.008e12)),
    ("RTX 3090", Peak(71e12, 35.6e12, 0.936e12)),
    ("V100", Peak(125e12, 15.7e12, 0.9e12)),
    ("T4", Peak(65e12, 8.1e12, 0.32e12)),
)


def peak_for(name: str, sm_count: int = 0, major: int = 8) -> Peak:
    """Known peaks for a device name, else a rough estimate from the SM count (marked
    ``estimated``): 1024 (Ampere) / 2048 (Hopper+) dense half FLOP per clock per SM at
    1.4 GHz, float32 at half that, 1 TB/s."""
    for fragment, peak in KNOWN_PEAKS:
        if fragment.lower() in name.lower():
            return peak
    per_clock = 2048 if major >= 9 else 1024
    half = max(sm_count, 1) * per_clock * 1.4e9
    return Peak(half, half / 2, 1.0e12, estimated=True)


def lsh_flops(groups: int, n: int, d: int, bucket_size: int, n_hashes: int) -> float:
    """Forward + backward FLOPs of LSH attention (see the module docstring)."""
    return 3.5 * 4.0 * groups * n * (2 * bucket_size) * d * n_hashes


def full_flops(groups: int, n: int, d: int, causal: bool) -> float:
    """Forward + backward FLOPs of full attention (halved when causal)."""
    return 3.5 * 4.0 * groups * n * n * d * (0.5 if causal else 1.0)


def full_bytes(groups: int, n: int, d: int, element_size: int) -> int:
    """Compulsory traffic of a fused full-attention forward + backward: q, k, v, out (forward)
    and q, k, v, out, dO, dq, dk, dv (backward) once each."""
    return 12 * groups * n * d * element_size


# ---------------------------------------------------------------------------- correctness
def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref).abs().max().item() if x.numel() else 0.0


def _run(fn: Callable, tensors: Sequence[torch.Tensor], do: torch.Tensor, dtype: torch.dtype) -> list[torch.Tensor]:
    xs = [t.to(dtype).detach().requires_grad_() for t in tensors]
    out = fn(*xs)
    return [out.detach(), *torch.autograd.grad(out, xs, do.to(out.dtype))]


def correctness_cases(device: str) -> list[tuple[str, Callable, Callable, list[torch.Tensor], torch.Tensor]]:
    """(name, triton fn, torch fn, inputs, dO) for every case the check runs."""
    from reformer.kernels import full_attention, lsh_attention

    cases = []
    gen = torch.Generator().manual_seed(0)
    for n, d, causal, pad in ((1, 64, False, False), (7, 64, True, True), (100, 32, True, False),
                              (257, 64, False, True), (1024, 128, True, True)):
        b, h = 2, 2
        qk, v, do = (torch.randn(b, h, n, d, generator=gen).to(device) for _ in range(3))
        mask = (torch.rand(b, n, generator=gen) < 0.2).to(device) if pad else None

        def lsh(backend, mask=mask, causal=causal):
            return lambda x, y: lsh_attention(x, y, bucket_size=32, n_hashes=2, causal=causal, key_padding_mask=mask,
                                              seed=0, backend=backend)

        def full(backend, mask=mask, causal=causal):
            return lambda q, k, w: full_attention(q, k, w, causal=causal, key_padding_mask=mask, backend=backend)

        tag = f"N={n} D={d}{' causal' if causal else ''}{' padded' if pad else ''}"
        cases.append((f"lsh  {tag}", lsh("triton"), lsh("torch"), [qk, v], do))
        k = torch.randn(b, h, n, d, generator=gen).to(device)
        cases.append((f"full {tag}", full("triton"), full("torch"), [qk, k, v], do))
    return cases


def check_correctness(device: str, dtypes: Sequence[torch.dtype], out=None) -> bool:
    """Triton vs torch backends (outputs and gradients) on ``device``; prints one line per case."""
    out = out or sys.stdout
    ok = True
    for name, triton_fn, torch_fn, tensors, do in correctness_cases(device):
        ref = _run(torch_fn, tensors, do, torch.float64)
        for dtype in dtypes:
            mine = [_max_err(x, r) for x, r in zip(_run(triton_fn, tensors, do, dtype), ref)]
            theirs = [_max_err(x, r) for x, r in zip(_run(torch_fn, tensors, do, dtype), ref)]
            floor = 1e-4 if dtype == torch.float32 else 1e-3
            good = all(m <= 2 * t + floor for m, t in zip(mine, theirs))
            ok &= good
            errs = " ".join(f"{m:.1e}/{t:.1e}" for m, t in zip(mine, theirs))
            print(f"  {'ok  ' if good else 'FAIL'} {name:32s} {str(dtype).split('.')[-1]:9s} "
                  f"max error triton/torch (out, grads): {errs}", file=out)
    return ok


# ---------------------------------------------------------------------------- timing
def _time_ms(fn: Callable[[], None], repeats: int) -> float:
    """Median milliseconds of ``fn`` (forward + backward) over ``repeats`` after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _fwd_bwd(fn: Callable, xs: Sequence[torch.Tensor], do: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        out = fn(*xs)
        torch.autograd.grad(out, xs, do)
    return step


def timing_rows(args: argparse.Namespace, peak: Peak, out=None) -> list[dict]:
    """Time every method at every length; prints and returns one row per (method, N)."""
    out = out or sys.stdout
    import torch.nn.functional as F

    from reformer.kernels import lsh_attention
    from reformer.kernels.triton_lsh import model_bytes

    dtype = getattr(torch, args.dtype)
    esize = torch.tensor([], dtype=dtype).element_size()
    peak_flops = peak.half if dtype != torch.float32 else peak.f32
    methods: list[tuple[str, Callable, Callable, Callable]] = [
        ("lsh-triton",
         lambda qk, v: lsh_attention(qk, v, bucket_size=args.bucket_size, n_hashes=args.n_hashes, causal=args.causal,
                                     seed=0, backend="triton"),
         lambda g, n, d: lsh_flops(g, n, d, args.bucket_size, args.n_hashes),
         lambda g, n, d: model_bytes(g, n, d, bucket_size=args.bucket_size, element_size=esize,
                                     n_hashes=args.n_hashes, block=64 if esize == 2 else 32)),
        ("sdpa", lambda qk, v: F.scaled_dot_product_attention(qk, qk, v, is_causal=args.causal),
         lambda g, n, d: full_flops(g, n, d, args.causal), lambda g, n, d: full_bytes(g, n, d, esize)),
    ]
    if importlib.util.find_spec("flash_attn") is not None and dtype != torch.float32:
        from flash_attn import flash_attn_func

        methods.append((
            "flash-attn",
            lambda qk, v: flash_attn_func(qk.transpose(1, 2), qk.transpose(1, 2), v.transpose(1, 2),
                                          causal=args.causal).transpose(1, 2),
            lambda g, n, d: full_flops(g, n, d, args.causal), lambda g, n, d: full_bytes(g, n, d, esize)))
    rows = []
    print(f"  {'method':11s} {'N':>6s} {'ms':>9s} {'TFLOP/s':>8s} {'% peak':>7s} {'GB/s':>7s} {'% peak':>7s}", file=out)
    for n in args.lengths:
        for name, fn, flops, nbytes in methods:
            g = args.batch * args.heads
            qk, v, do = (torch.randn(args.batch, args.heads, n, args.head_dim, device="cuda", dtype=dtype)
                         for _ in range(3))
            qk.requires_grad_()
            v.requires_grad_()
            try:
                ms = _time_ms(_fwd_bwd(fn, (qk, v), do), args.repeats)
            except torch.cuda.OutOfMemoryError:
                print(f"  {name:11s} {n:6d} {'OOM':>9s}", file=out)
                rows.append({"method": name, "n": n, "ms": None})
                continue
            finally:
                del qk, v, do
                torch.cuda.empty_cache()
            tflops = flops(g, n, args.head_dim) / ms / 1e9
            gbs = nbytes(g, n, args.head_dim) / ms / 1e6
            print(f"  {name:11s} {n:6d} {ms:9.3f} {tflops:8.1f} {100 * tflops * 1e12 / peak_flops:6.1f}% "
                  f"{gbs:7.0f} {100 * gbs * 1e9 / peak.bandwidth:6.1f}%", file=out)
            rows.append({"method": name, "n": n, "ms": ms, "tflops": tflops, "gbs": gbs})
    return rows


# ---------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS), metavar="N",
                        help="sequence lengths to time (default: 4K..64K)")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16",
                        help="dtype of the timing runs (the correctness check runs all three)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--bucket-size", type=int, default=64)
    parser.add_argument("--n-hashes", type=int, default=4)
    parser.add_argument("--causal", action="store_true", help="causal attention in the timing runs")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median)")
    parser.add_argument("--no-timing", action="store_true", help="only the correctness check")


def run(args: argparse.Namespace, out=None) -> int:
    """Run the check; 0 when everything passed (or there is no GPU to check), 1 on a failure."""
    out = out or sys.stdout
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible to PyTorch (torch.cuda.is_available() is False, "
              f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); nothing to check on "
              "this machine. Run it on a machine with an NVIDIA GPU and a CUDA build of PyTorch.", file=out)
        return 0
    if importlib.util.find_spec("triton") is None:
        print("gpu-check: the triton package is not installed (pip install 'reformer[triton]').", file=out)
        return 1
    props = torch.cuda.get_device_properties(0)
    peak = peak_for(props.name, props.multi_processor_count, props.major)
    print(f"gpu-check on {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
          f"{props.total_memory / 2**30:.0f} GiB); peaks used: {peak.half / 1e12:.0f} TFLOP/s half, "
          f"{peak.f32 / 1e12:.0f} TFLOP/s float32, {peak.bandwidth / 1e9:.0f} GB/s"
          f"{' (ESTIMATED: device not in the table)' if peak.estimated else ''}", file=out)
    print("correctness: Triton vs torch backend (errors vs a float64 run)", file=out)
    ok = check_correctness("cuda", (torch.float32, torch.float16, torch.bfloat16), out=out)
    print(f"correctness: {'all passed' if ok else 'FAILURES above'}", file=out)
    if not args.no_timing:
        print(f"timing: forward + backward, B={args.batch} H={args.heads} D={args.head_dim} {args.dtype}"
              f"{' causal' if args.causal else ''}; LSH bucket_size={args.bucket_size} n_hashes={args.n_hashes}",
              file=out)
        timing_rows(args, peak, out=out)
    return 0 if ok else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gpu-check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
