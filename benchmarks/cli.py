"""``python -m benchmarks {attention,model,quality,all} [--quick] [--out DIR] ...``

Prints a banner (device, versions, CPU, threads, shapes), runs the cases with a progress bar,
prints the tables and writes ``DIR/results.json``, ``DIR/summary.md`` and one PNG per
sub-benchmark.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import attention, model, quality
from .cases import Case
from .machine import banner, describe
from .memory import available_bytes
from .plots import write_plots
from .report import all_tables, write_json
from .runner import RunOptions, run_cases
from .settings import FULL, QUICK, Settings
from .summary import headline, write_summary

BENCHMARKS = ("attention", "model", "quality")
DTYPES = ("float32", "float16", "bfloat16")
MODEL_SWEEPS = ("depth", "length", "ffn")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=(*BENCHMARKS, "all"), help="which sub-benchmark to run")
    p.add_argument("--quick", action="store_true", help="small sweep, about 3 minutes on a 2-core CPU")
    p.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR",
                   help="output directory (default: bench_out)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--lengths", type=int, nargs="+", metavar="N", help="attention sequence lengths")
    p.add_argument("--n-hashes", type=int, nargs="+", metavar="H", help="LSH hash rounds (attention)")
    p.add_argument("--depths", type=int, nargs="+", metavar="L", help="model depths of the depth sweep")
    p.add_argument("--sweeps", nargs="+", choices=MODEL_SWEEPS, help="model sweeps to run (default: all)")
    p.add_argument("--batch", type=int, help="attention batch size B")
    p.add_argument("--heads", type=int, help="attention heads H")
    p.add_argument("--head-dim", type=int, help="attention head dim D")
    p.add_argument("--bucket-size", type=int, help="LSH bucket size (attention)")
    p.add_argument("--causal", action="store_true", help="causal attention")
    p.add_argument("--providers", nargs="+", metavar="PATTERN",
                   help="run only series/providers matching these shell patterns, e.g. sdpa 'lsh*'")
    p.add_argument("--repeats", type=int, help="timed calls per median (fewer for slow cases)")
    p.add_argument("--timeout", type=float, help="seconds per case before it is stopped")
    p.add_argument("--max-call-s", type=float, help="skip cases whose predicted fwd+bwd call exceeds this")
    p.add_argument("--max-mem-gib", type=float, help="skip cases estimated above this (default: 85%% of free memory)")
    p.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's default)")
    return p


def _positive(parser: argparse.ArgumentParser, name: str, values: object) -> None:
    for v in values if isinstance(values, (list, tuple)) else [values]:
        if v is not None and v <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {v}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("lengths", "n_hashes", "depths", "batch", "heads", "head_dim", "bucket_size", "repeats",
                 "timeout", "max_call_s", "max_mem_gib", "threads"):
        _positive(parser, name, getattr(args, name))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The ``--quick`` or full preset with the command-line overrides applied."""
    base = QUICK if args.quick else FULL
    attn = {k: getattr(args, k) for k in ("batch", "heads", "head_dim", "bucket_size") if getattr(args, k)}
    if args.lengths:
        attn["lengths"] = tuple(args.lengths)
    if args.n_hashes:
        attn["n_hashes"] = tuple(args.n_hashes)
    attn["causal"] = args.causal or base.attention.causal
    mdl = {"depths": tuple(args.depths)} if args.depths else {}
    if args.sweeps:
        mdl["sweeps"] = tuple(args.sweeps)
    run = {k: v for k, v in (("repeats", args.repeats), ("timeout_s", args.timeout),
                             ("max_call_s", args.max_call_s)) if v}
    return dataclasses.replace(base, attention=dataclasses.replace(base.attention, **attn),
                               model=dataclasses.replace(base.model, **mdl), **run)


def plan(benchmark: str, s: Settings, dtype: str) -> list[Case]:
    """The cases of one sub-benchmark."""
    if benchmark == "attention":
        a = s.attention
        return attention.plan(a.lengths, a.n_hashes, a.peer_hashes, batch=a.batch, heads=a.heads,
                              head_dim=a.head_dim, bucket_size=a.bucket_size, dtype=dtype, causal=a.causal)
    if benchmark == "model":
        m = s.model
        cases = model.plan(m.depths, m.depth_len, m.lengths, m.length_depth, m.ffn_len, m.ffn_d_model,
                           m.ffn_d_ff, m.ff_chunks, dims=m.dims, dtype=dtype)
        return [c for c in cases if c.params["sweep"] in m.sweeps]
    q = s.quality
    return quality.plan(q.n_hashes, q.bucket_sizes, batch=q.batch, heads=q.heads, seq_len=q.seq_len,
                        head_dim=q.head_dim, seeds=q.seeds, top_k=q.top_k)


def select(cases: list[Case], patterns: Optional[Sequence[str]]) -> list[Case]:
    """Cases whose series or provider matches one of the shell patterns (all when None)."""
    if not patterns:
        return cases
    return [c for c in cases if any(fnmatch.fnmatchcase(c.series, p) or fnmatch.fnmatchcase(c.provider, p)
                                    for p in patterns)]


def shapes(benchmarks: Sequence[str], s: Settings) -> list[str]:
    a, m, q = s.attention, s.model, s.quality
    text = {
        "attention": f"attention: B={a.batch} H={a.heads} D={a.head_dim} bucket_size={a.bucket_size} "
                     f"causal={a.causal} N={list(a.lengths)} n_hashes={list(a.n_hashes)}",
        "model": f"model: {m.dims} sweeps={list(m.sweeps)} depths={list(m.depths)}@N={m.depth_len} "
                 f"lengths={list(m.lengths)}@depth={m.length_depth} | ffn N={m.ffn_len} d_model={m.ffn_d_model} "
                 f"d_ff={m.ffn_d_ff} chunks 1 vs {m.ff_chunks}",
        "quality": f"quality: B={q.batch} H={q.heads} N={q.seq_len} D={q.head_dim} bucket_size={list(q.bucket_sizes)} "
                   f"n_hashes={list(q.n_hashes)} seeds={q.seeds} top_k={q.top_k}",
    }
    return [text[b] for b in benchmarks]


def run(benchmarks: Sequence[str], s: Settings, opts: RunOptions, dtype: str,
        patterns: Optional[Sequence[str]] = None) -> list[dict]:
    """Runs the sub-benchmarks in order and returns all records."""
    records = []
    for name in benchmarks:
        cases = select(plan(name, s, dtype), patterns)
        records += run_cases(cases, opts, name, run_local=quality.run if name == "quality" else None)
    return records


def write_outputs(out: Path, meta: dict, records: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", meta, records)
    names = write_plots(records, out, f"{meta['device_name']} | torch {meta['torch']} | {meta['dtype']}")
    write_summary(out / "summary.md", meta, records, names)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the running worker process is killed too."""
    print(f"\nbenchmarks: stopped by signal {signum}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    s = settings_from_args(args)
    benchmarks = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    limit = args.max_mem_gib * 2**30 if args.max_mem_gib else 0.85 * available_bytes(torch.device(args.device))
    opts = RunOptions(device=args.device, repeats=s.repeats, budget_s=s.budget_s, max_call_s=s.max_call_s,
                      timeout_s=s.timeout_s, mem_limit_bytes=limit, threads=args.threads)
    meta = describe(args.device, args.dtype, args.quick, args.threads)
    meta["settings"] = {"run": dataclasses.asdict(opts), **dataclasses.asdict(s)}
    print(banner(meta, shapes(benchmarks, s) + [f"memory limit {limit / 2**30:.1f} GiB | out {args.out}"]),
          flush=True)
    records = run(benchmarks, s, opts, args.dtype, args.providers)
    print("\n" + all_tables(records) + "\n")
    print("\n".join(headline(records)))
    write_outputs(args.out, meta, records)
    print(f"\nwrote {args.out}/results.json, summary.md and plots")
    return 0
