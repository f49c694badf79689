"""The benchmark command line: ``python -m benchmarks COMMAND [options]`` in a checkout,
``reformer-bench COMMAND [options]`` (or ``python -m reformer_bench``) after ``pip install``.

Commands: ``attention``, ``model``, ``quality``, ``all`` (the three in turn), ``generate``
(text-generation speed, ``benchmarks/generate.py``), ``gpu-check`` (``benchmarks/gpu_check.py``)
and ``attention-map`` (a plot of recorded LSH attention, ``benchmarks/attention_map.py``).
``COMMAND --help`` shows that command's options. Each measuring command prints a banner and its
plan (cases to run and to skip, estimated duration), runs the cases with a progress bar showing
the estimated time left, prints the tables and writes ``DIR/results.json``, ``DIR/summary.md``
and one PNG per sub-benchmark (``--no-plots`` to skip them; plots need matplotlib, the ``bench``
extra).
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib
import importlib.util
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from . import attention, model, quality
from .cases import Case
from .machine import banner, describe
from .memory import available_bytes
from .report import all_tables, write_json
from .runner import Remaining, RunOptions, _fmt_s, estimate, plan_lines, run_cases
from .settings import FULL, LONG, QUICK, Settings
from .summary import headline, write_summary

BENCHMARKS = ("attention", "model", "quality")
DTYPES = ("float32", "float16", "bfloat16")
MODEL_SWEEPS = ("depth", "length", "ffn", "long")
QUICK_MINUTES = 5  # what --quick takes on a 2-core CPU (README and --help say the same)
FULL_MINUTES = 20
# sub-commands implemented by modules that expose add_arguments(parser) and run(args) -> int
EXTERNAL = {
    "generate": ("generate", "text-generation speed of ReformerLM (benchmarks/generate.py)"),
    "gpu-check": ("gpu_check", "check and time the Triton kernels on a CUDA GPU (benchmarks/gpu_check.py)"),
    "attention-map": ("attention_map", "record a small ReformerLM's LSH attention and plot one layer and head "
                                       "(benchmarks/attention_map.py)"),
}
PROG = "python -m benchmarks"


def _prog() -> str:
    return "reformer-bench" if __package__ != "benchmarks" else PROG


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run options")
    g.add_argument("--quick", action="store_true",
                   help=f"small sweep, about {QUICK_MINUTES} minutes on a 2-core CPU (default: the full sweep, "
                        f"within {FULL_MINUTES} minutes)")
    g.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR",
                   help="output directory (default: bench_out)")
    g.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--allocator", choices=("default", "tuned"), default="default",
                   help="CPU timing: 'default' = glibc malloc as a user's process has it (default); 'tuned' = "
                        "glibc switched to its settled caching thresholds, faster for LSH (see docs/benchmarks.md)")
    g.add_argument("--repeats", type=int, help="timed calls per median (fewer for slow cases)")
    g.add_argument("--timeout", type=float, help="seconds per case before it is stopped")
    g.add_argument("--max-call-s", type=float, help="skip cases whose predicted fwd+bwd call exceeds this")
    g.add_argument("--max-mem-gib", type=float,
                   help="skip cases whose estimated peak plus inputs exceeds this (default: 85%% of available memory)")
    g.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's default)")
    g.add_argument("--no-plots", action="store_true", help="write no PNG plots (matplotlib not needed)")
    g.add_argument("--plan-only", action="store_true", help="print the plan and its estimated duration, run nothing")


def _attention_options(p: argparse.ArgumentParser, with_providers: bool = True) -> None:
    g = p.add_argument_group("attention")
    g.add_argument("--long", action="store_true",
                   help="long-sequence preset: lsh-torch (n_hashes=4) at N = 32K, 128K and 1M (1,048,576), one "
                        "call per case, time ratio to 32K; naive and sdpa skipped with estimates where they "
                        "cannot run")
    g.add_argument("--lengths", type=int, nargs="+", metavar="N", help="sequence lengths")
    g.add_argument("--n-hashes", type=int, nargs="+", metavar="H", help="LSH hash rounds")
    g.add_argument("--batch", type=int, help="batch size B")
    g.add_argument("--heads", type=int, help="heads H")
    g.add_argument("--head-dim", type=int, help="head dim D")
    g.add_argument("--bucket-size", type=int, help="LSH bucket size")
    g.add_argument("--causal", action="store_true", help="causal attention")
    if with_providers:
        g.add_argument("--providers", nargs="+", metavar="NAME",
                       help="run only these providers/series (names or shell patterns, e.g. sdpa 'lsh*'): "
                            + ", ".join(attention.PROVIDERS))


def _model_options(p: argparse.ArgumentParser, with_providers: bool = True) -> None:
    g = p.add_argument_group("model")
    if with_providers:
        g.add_argument("--long", action="store_true",
                       help="one training step of a reversible LSH ReformerLM with axial positions at N = 1,048,576")
    g.add_argument("--depths", type=int, nargs="+", metavar="L", help="model depths of the depth sweep")
    g.add_argument("--sweeps", nargs="+", choices=MODEL_SWEEPS, help="model sweeps to run (default: depth length ffn)")
    if with_providers:
        g.add_argument("--providers", nargs="+", metavar="NAME",
                       help="run only these providers/series (names or shell patterns, e.g. 'reformer_lm*'): "
                            + ", ".join(model.PROVIDERS))


def parse_hashing_entry(text: str) -> tuple:
    """``--hashing`` entry ``N:N1xN2[:N1xN2xN3...]`` (a plain bucket count, then factorisations
    with that product) as ``(N, (n1, n2), ...)``."""
    try:
        plain, *factorisations = text.split(":")
        entry = (int(plain), *(tuple(int(f) for f in part.lower().split("x")) for part in factorisations))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 512:16x32:8x8x8, got {text!r}")
    if not factorisations:
        raise argparse.ArgumentTypeError(f"must name at least one factorisation, like 512:16x32, got {text!r}")
    try:
        quality.check_hashing([entry])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return entry


def _quality_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quality")
    g.add_argument("--seq-len", type=int, metavar="N", help="sequence length N")
    g.add_argument("--quality-sweeps", nargs="+", choices=quality.SWEEPS, metavar="SWEEP",
                   help="which sweeps: n_hashes, hashing (default: both)")
    g.add_argument("--hashing", type=parse_hashing_entry, nargs="+", metavar="N:N1xN2[:N1xN2xN3]",
                   help="the hashing sweep's bucket counts and factorisations, e.g. 4096:64x64:16x16x16 (default: "
                        + " ".join(map(quality.format_hashing_entry, quality.HASHING_PAIRS)) + ")")
    g.add_argument("--hashing-n-hashes", type=int, metavar="H",
                   help=f"hash rounds of the hashing sweep (default: {quality.HASHING_N_HASHES})")


def _selected_command(argv: Sequence[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; an external sub-command's module is imported only when ``argv`` selects it."""
    p = argparse.ArgumentParser(prog=_prog(), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", metavar="COMMAND", required=True)
    a = sub.add_parser("attention", help="attention ops: time and peak memory versus sequence length",
                       description=attention.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(a)
    _attention_options(a)
    m = sub.add_parser("model", help="training-step memory and time: ReformerLM vs Transformer, feed-forward",
                       description=model.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(m)
    _model_options(m)
    q = sub.add_parser("quality", help="LSH vs full shared-QK attention: error and recall versus n_hashes, "
                                       "plain vs factorised hashing",
                       description=quality.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(q)
    _quality_options(q)
    al = sub.add_parser("all", help="attention, model and quality in turn (make bench / make bench-quick)")
    _common(al)
    al.add_argument("--providers", nargs="+", metavar="NAME",
                    help="run only these providers/series (names or shell patterns): "
                         + ", ".join([*attention.PROVIDERS, *model.PROVIDERS]))
    chosen = _selected_command(argv)
    for command, (module, help_text) in EXTERNAL.items():
        if command == chosen:
            mod = _external_module(module)
            e = sub.add_parser(command, help=help_text, description=mod.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
            mod.add_arguments(e)
            e.set_defaults(external=mod)
        else:
            sub.add_parser(command, help=help_text, add_help=False)
    return p


def _external_module(module: str) -> Any:
    name = f"{__package__}.{module}"
    if importlib.util.find_spec(name) is None:
        raise SystemExit(f"{_prog()}: this installation has no {module}.py benchmark module "
                         f"(benchmarks/{module}.py), so this sub-command is not available")
    mod = importlib.import_module(name)
    for attr in ("add_arguments", "run"):
        if not callable(getattr(mod, attr, None)):
            raise SystemExit(f"{_prog()}: {name} has no {attr}() function")
    return mod


def _positive(parser: argparse.ArgumentParser, name: str, values: object) -> None:
    for v in values if isinstance(values, (list, tuple)) else [values]:
        if v is not None and v <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {v}")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if getattr(args, "external", None) is not None:
        return args
    for name in ("lengths", "n_hashes", "depths", "batch", "heads", "head_dim", "bucket_size", "repeats",
                 "timeout", "max_call_s", "max_mem_gib", "threads", "seq_len", "hashing_n_hashes"):
        _positive(parser, name, getattr(args, name, None))
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if getattr(args, "long", False) and args.quick:
        parser.error("--long and --quick are different presets: choose one")
    return args


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The ``--quick``, ``--long`` or full preset with the command-line overrides applied."""
    long = getattr(args, "long", False)
    base = LONG if long else QUICK if args.quick else FULL
    if long and args.benchmark == "model":  # the model preset runs the 1M step; attention stays at its default
        base = dataclasses.replace(base, attention=FULL.attention)
    get = lambda k: getattr(args, k, None)  # noqa: E731
    attn: dict[str, Any] = {k: get(k) for k in ("batch", "heads", "head_dim", "bucket_size") if get(k)}
    if get("lengths"):
        attn["lengths"] = tuple(args.lengths)
    if get("n_hashes"):
        attn["n_hashes"] = tuple(args.n_hashes)
    attn["causal"] = bool(get("causal")) or base.attention.causal
    mdl: dict[str, Any] = {"depths": tuple(args.depths)} if get("depths") else {}
    if get("sweeps"):
        mdl["sweeps"] = tuple(args.sweeps)
    qual: dict[str, Any] = {k: get(k) for k in ("seq_len", "hashing_n_hashes") if get(k)}
    if get("hashing"):
        qual["hashing"] = tuple(args.hashing)
    if get("quality_sweeps"):
        qual["sweeps"] = tuple(args.quality_sweeps)
    run = {k: v for k, v in (("repeats", args.repeats), ("timeout_s", args.timeout),
                             ("max_call_s", args.max_call_s)) if v}
    return dataclasses.replace(base, attention=dataclasses.replace(base.attention, **attn),
                               model=dataclasses.replace(base.model, **mdl),
                               quality=dataclasses.replace(base.quality, **qual), **run)


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
        if "long" in m.sweeps:
            cases.append(model.long_case(m.long_len, m.long_axial, m.long_dims, dtype))
        return [c for c in cases if c.params["sweep"] in m.sweeps]
    q = s.quality
    cases = quality.plan(q.n_hashes, q.bucket_sizes, batch=q.batch, heads=q.heads, seq_len=q.seq_len,
                         head_dim=q.head_dim, seeds=q.seeds, top_k=q.top_k,
                         hashing=quality.HASHING_PAIRS if q.hashing is None else q.hashing,
                         hashing_n_hashes=q.hashing_n_hashes or quality.HASHING_N_HASHES)
    return [c for c in cases if c.params["sweep"] in q.sweeps]


def _names(case: Case) -> set[str]:
    """Names a pattern may match: series and provider, also in the earlier spellings."""
    names = {case.series, case.provider}
    old = attention.OLD_NAMES.get(case.provider) if case.benchmark == "attention" else None
    if old is not None:
        names |= {old, old + case.series[len(case.provider):]}
    return names


def select(cases: list[Case], patterns: Optional[Sequence[str]]) -> list[Case]:
    """Cases whose series or provider matches one of the shell patterns (all when None)."""
    if not patterns:
        return cases
    return [c for c in cases if any(fnmatch.fnmatchcase(n, p) for n in _names(c) for p in patterns)]


def shapes(benchmarks: Sequence[str], s: Settings) -> list[str]:
    a, m, q = s.attention, s.model, s.quality
    model_text = f"model: {m.dims} sweeps={list(m.sweeps)}"
    if "depth" in m.sweeps:
        model_text += f" depths={list(m.depths)}@N={m.depth_len}"
    if "length" in m.sweeps:
        model_text += f" lengths={list(m.lengths)}@depth={m.length_depth}"
    if "ffn" in m.sweeps:
        model_text += f" | ffn N={m.ffn_len} d_model={m.ffn_d_model} d_ff={m.ffn_d_ff} chunks 1 vs {m.ff_chunks}"
    if "long" in m.sweeps:
        model_text += f" | long: N={m.long_len} axial={m.long_axial} {m.long_dims}"
    text = {
        "attention": f"attention: B={a.batch} H={a.heads} D={a.head_dim} bucket_size={a.bucket_size} "
                     f"causal={a.causal} N={list(a.lengths)} n_hashes={list(a.n_hashes)}",
        "model": model_text,
        "quality": f"quality: B={q.batch} H={q.heads} N={q.seq_len} D={q.head_dim} bucket_size={list(q.bucket_sizes)} "
                   f"n_hashes={list(q.n_hashes)} seeds={q.seeds} top_k={q.top_k} | hashing: plain vs factorised "
                   + ", ".join(quality.format_hashing_entry(e, " vs ")
                               for e in (quality.HASHING_PAIRS if q.hashing is None else q.hashing))
                   + f" at bucket_size={max(q.bucket_sizes)} n_hashes={q.hashing_n_hashes or quality.HASHING_N_HASHES}",
    }
    return [text[b] for b in benchmarks]


def _quality_s(case: Case) -> float:
    """Rough seconds of one quality case (full probabilities plus the one-hot LSH calls)."""
    p = case.params
    copies = -(-p["seq_len"] // p["head_dim"])
    flops = attention.lsh_flops(dict(p, batch=p["batch"] * copies)) + 4.0 * p["heads"] * p["seq_len"] ** 2 * p["head_dim"]
    return p["seeds"] * flops / 20e9


def run(benchmarks: Sequence[str], s: Settings, opts: RunOptions, dtype: str,
        patterns: Optional[Sequence[str]] = None, plan_only: bool = False) -> list[dict]:
    """Prints the plan, then runs the sub-benchmarks in order and returns all records."""
    chosen = {name: select(plan(name, s, dtype), patterns) for name in benchmarks}
    planned = {name: estimate(cases, opts, _quality_s if name == "quality" else None)
               for name, cases in chosen.items()}
    lines = [line for name in benchmarks for line in plan_lines(name, planned[name])]
    total = sum(sec for rows in planned.values() for _, _, sec in rows)
    print("\n".join(lines + [f"plan: estimated duration {_fmt_s(total)} (rough: from each provider's typical "
                             "CPU rate; the progress bar refines it)"]), flush=True)
    if plan_only:
        return []
    remaining = Remaining([sec for name in benchmarks for _, _, sec in planned[name]])
    records = []
    for name in benchmarks:
        records += run_cases(chosen[name], opts, name, run_local=quality.run if name == "quality" else None,
                             remaining=remaining)
    return records


def write_outputs(out: Path, meta: dict, records: list[dict], plots: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", meta, records)
    names = []
    if plots:
        from .plots import write_plots

        names = write_plots(records, out, f"{meta['device_name']} | torch {meta['torch']} | {meta['dtype']}")
    write_summary(out / "summary.md", meta, records, names)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so the running worker process is killed too."""
    print(f"\nbenchmarks: stopped by signal {signum}", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if getattr(args, "external", None) is not None:
        result = args.external.run(args)  # generate returns its results dict, gpu-check an exit code
        return result if isinstance(result, int) else 0
    plots = not args.no_plots and not args.plan_only
    if plots and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f"{_prog()}: the plots need matplotlib, which is not installed: "
                         "pip install 'reformer-attention[bench]' (or pass --no-plots)")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    s = settings_from_args(args)
    benchmarks = BENCHMARKS if args.benchmark == "all" else (args.benchmark,)
    limit = args.max_mem_gib * 2**30 if args.max_mem_gib else 0.85 * available_bytes(torch.device(args.device))
    opts = RunOptions(device=args.device, repeats=s.repeats, budget_s=s.budget_s, max_call_s=s.max_call_s,
                      timeout_s=s.timeout_s, mem_limit_bytes=limit, threads=args.threads, allocator=args.allocator,
                      single_call=s.single_call, max_call_s_by_provider=dict(s.max_call_s_by_provider))
    preset = "long" if getattr(args, "long", False) else "quick" if args.quick else "full"
    meta = describe(args.device, args.dtype, args.quick, args.threads)
    if s.single_call:  # --long: the .grad buffers are allocated up front instead of by a warm-up call
        meta["memory_method"] = meta["memory_method"].replace("after one warm-up call", "one call, .grad buffers "
                                                              "allocated before it")
    meta.update(preset=preset, allocator=args.allocator,
                command=" ".join([_prog(), *(sys.argv[1:] if argv is None else argv)]))
    meta["settings"] = {"run": dataclasses.asdict(opts), **dataclasses.asdict(s)}
    patterns = getattr(args, "providers", None) or s.attention.providers or None
    print(banner(meta, shapes(benchmarks, s) + [f"memory limit {limit / 2**30:.1f} GiB | out {args.out}"]),
          flush=True)
    records = run(benchmarks, s, opts, args.dtype, patterns, plan_only=args.plan_only)
    if args.plan_only:
        return 0
    print("\n" + all_tables(records) + "\n")
    print("\n".join(headline(records)))
    write_outputs(args.out, meta, records, plots)
    print(f"\nwrote {args.out}/results.json, summary.md" + (" and plots" if plots else ""))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
