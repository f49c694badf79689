"""Runs a list of cases: decides what to skip, runs the rest (each in a fresh process), and
shows a progress bar.

A case is not run, and gets a record saying why, when:

- its provider's code is not importable: ``unavailable``;
- it is a Triton backend and the device is not CUDA: ``skipped (needs CUDA)``;
- its estimated peak memory (``Provider.est_bytes``) plus what the worker holds before the call
  (``Provider.base_bytes``: inputs and their gradients) exceeds the memory limit:
  ``skipped (est. X GiB + Z GiB inputs > limit Y GiB)``;
- the forward+backward time predicted from the last measured case of the same series (scaled
  by the provider's FLOP formula) exceeds ``max_call_s``, or a shorter case of the same series
  already timed out or was skipped for time: ``skipped (est. X s per call ...)``.

Cases that run longer than ``timeout_s`` are stopped: ``timeout``.

Before running, :func:`plan_lines` prints the plan: which cases will run, which will be skipped
(by the same rules, with run times predicted from each provider's rough CPU rate until a
shorter case has been measured) and the estimated duration. While running, the progress bar
shows the estimated time left (the remaining cases' estimates, scaled by how the finished cases
compared with theirs).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from tqdm import tqdm

from .cases import Case, Provider, make_record
from .worker import load_provider, run_case

GIB = 2**30
BWD_FLOPS_FACTOR = 3.5  # forward+backward FLOPs = forward FLOPs x (1 + 2.5), as flash-attention counts
STARTUP_S = 3.0  # starting a worker process (Python, torch, the package) for the estimates


@dataclass(frozen=True)
class RunOptions:
    """device: "cpu" or "cuda". repeats: timed calls per phase (fewer for slow cases, see
    ``harness``). budget_s: time allowed for each timing phase. max_call_s: longest predicted
    forward+backward call that is still run. timeout_s: per case. mem_limit_bytes: largest
    estimated peak that is still run. threads: torch threads in the workers (None = default).
    allocator: "default" (glibc as a user's process has it) or "tuned" (see ``harness``).
    single_call: one call per case for memory and one (after a warm-up when short) for time
        (``--long``; ``harness``).
    max_call_s_by_provider: a tighter ``max_call_s`` for some providers (``--long``: the
    quadratic baselines)."""

    device: str
    repeats: int
    budget_s: float
    max_call_s: float
    timeout_s: float
    mem_limit_bytes: float
    threads: Optional[int] = None
    allocator: str = "default"
    single_call: bool = False
    max_call_s_by_provider: dict = field(default_factory=dict)


class _SeriesHistory:
    """Per series: the last measured (cost, seconds) and whether it already ran out of time."""

    def __init__(self) -> None:
        self.last: dict[str, tuple[float, float]] = {}
        self.too_slow: set[str] = set()

    def update(self, case: Case, provider: Provider, record: dict[str, Any]) -> None:
        if record["status"] == "ok" and record["time_fwdbwd_ms"]:
            self.last[case.series] = (provider.cost(case.params), record["time_fwdbwd_ms"] / 1e3)
        elif record["status"] == "timeout" or " s per call" in record["note"]:
            self.too_slow.add(case.series)

    def predict_s(self, case: Case, provider: Provider, device: str = "cuda") -> Optional[float]:
        """Forward+backward seconds: scaled from the last measured case of the series, else (on
        CPU) from the provider's rough rate, else None."""
        if case.series not in self.last:
            return prior_call_s(case, provider) if device == "cpu" else None
        cost, seconds = self.last[case.series]
        return seconds * provider.cost(case.params) / cost


def prior_call_s(case: Case, provider: Provider) -> float:
    """A forward+backward call's seconds from the provider's FLOPs and rough CPU rate."""
    return BWD_FLOPS_FACTOR * provider.cost(case.params) / (provider.gflops * 1e9)


def estimate_case_s(call_s: float, opts: RunOptions, time_forward: bool = True) -> float:
    """Wall time of one case whose forward+backward call takes ``call_s`` (see ``harness``)."""
    if opts.single_call:  # memory: one call in the exact-RSS mode (up to ~2x slower); time: one call (+ a warm-up)
        from .harness import SINGLE_CALL_WARMUP_S

        timing = call_s * (2 if call_s < SINGLE_CALL_WARMUP_S else 1)
        return (2 if opts.allocator == "default" else 1) * STARTUP_S + 2 * call_s + timing
    fwd = call_s / BWD_FLOPS_FACTOR if time_forward else 0.0
    n = max(1, min(opts.repeats, int(opts.budget_s / max(call_s, 1e-3))))
    slow = call_s >= opts.budget_s
    memory = 2 * call_s
    if opts.allocator == "default":
        timing = call_s + fwd if slow else call_s + n * (call_s + fwd)
        return 2 * STARTUP_S + memory + timing
    timing = n * (call_s + fwd) + (0.0 if slow else call_s)
    return STARTUP_S + memory + timing


def preflight(case: Case, provider: Provider, opts: RunOptions, history: _SeriesHistory) -> Optional[dict]:
    """A record for a case that must not run (see the module docstring), or None."""
    reason = provider.missing()
    if reason is not None:
        return make_record(case, "unavailable", reason)
    if provider.needs_cuda and opts.device != "cuda":
        return make_record(case, "skipped", "needs CUDA")
    est, base = provider.est_bytes(case.params), provider.base_bytes(case.params)
    if est + base > opts.mem_limit_bytes:
        inputs = f" + {base / GIB:.1f} GiB inputs" if base else ""
        return make_record(case, "skipped",
                           f"est. {est / GIB:.1f} GiB{inputs} > limit {opts.mem_limit_bytes / GIB:.1f} GiB",
                           est_mem_mib=est / 2**20)
    max_call_s = opts.max_call_s_by_provider.get(case.provider, opts.max_call_s)
    if case.series in history.too_slow:
        return make_record(case, "skipped",
                           f"a shorter case of this series was already over {max_call_s:.0f} s per call")
    predicted = history.predict_s(case, provider, opts.device)
    if predicted is not None and predicted > max_call_s:
        return make_record(case, "skipped", f"est. {predicted:.0f} s per call > {max_call_s:.0f} s")
    return None


def _fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def estimate(cases: list[Case], opts: RunOptions, local_s: Optional[Callable[[Case], float]] = None
             ) -> list[tuple[Case, Optional[dict], float]]:
    """For each case: the skip record it is expected to get (None: it runs) and its estimated
    seconds, simulating the skip rules with predicted times (``local_s``: quality cases)."""
    history = _SeriesHistory()
    out = []
    for case in cases:
        if local_s is not None:
            out.append((case, None, local_s(case)))
            continue
        provider = load_provider(case)
        record = preflight(case, provider, opts, history)
        if record is not None:
            out.append((case, record, 0.0))
            continue
        call_s = history.predict_s(case, provider, "cpu")
        history.update(case, provider, make_record(case, "ok", time_fwdbwd_ms=call_s * 1e3))
        out.append((case, None, estimate_case_s(call_s, opts)))
    return out


def plan_lines(name: str, planned: list[tuple[Case, Optional[dict], float]]) -> list[str]:
    """The plan of one sub-benchmark: per series, the lengths/depths run and skipped, and the total."""
    def where(case: Case) -> str:
        p = case.params
        if name == "quality":
            return f"h={p['n_hashes']}" + (f" {p['hashing']}" if p.get("sweep") == "hashing" else "")
        return f"depth {p['depth']}" if p.get("sweep") == "depth" else f"N={p.get('seq_len')}"

    total = sum(s for _, _, s in planned)
    runs = sum(1 for _, r, _ in planned if r is None)
    lines = [f"plan: {name}: {len(planned)} cases, {runs} to run, est. {_fmt_s(total)}"]
    for series in dict.fromkeys(c.series for c, _, _ in planned):
        rows = [(c, r, s) for c, r, s in planned if c.series == series]
        ran = [where(c) for c, r, _ in rows if r is None]
        skipped = [where(c) for c, r, _ in rows if r is not None]
        text = f"  {series:<34} {', '.join(ran) or 'nothing'}"
        if skipped:
            reasons = sorted({r['note'].split(' >')[0] if r['note'].startswith('est. ') else r['note'][:40]
                              for _, r, _ in rows if r is not None})
            text += f"; skipped {', '.join(skipped)} ({'; '.join(reasons)[:80]})"
        lines.append(text + f"  ~{_fmt_s(sum(s for _, _, s in rows))}")
    return lines


def progress_line(record: dict[str, Any]) -> str:
    """One line per finished case for the progress log, e.g.
    ``attention | sdpa | N=4096 | ok | fwd+bwd 1,800 ms | 42 MiB``."""
    params = record["params"]
    where = " ".join(f"{k}={params[k]}" for k in ("depth", "seq_len", "n_hashes") if k in params)
    if record["status"] != "ok":
        what = f"{record['status']} ({record['note']})"
    elif record.get("time_fwdbwd_ms") is not None:
        what = f"ok | fwd+bwd {record['time_fwdbwd_ms']:,.0f} ms | {record['peak_mem_mib']:,.0f} MiB"
        if record.get("allocator"):
            what += f" | allocator {record['allocator']}"
    else:
        what = f"ok | rel. error {record['rel_err']:.3f} | recall {record['recall_at_k']:.3f}"
    return f"{record['benchmark']} | {record['series']} | {where} | {what}"


class Remaining:
    """Estimated seconds left: the remaining estimates times (actual / estimated) so far."""

    def __init__(self, estimates: list[float]):
        self.estimates, self.done, self.spent, self.expected = list(estimates), 0, 0.0, 0.0

    def finished(self, seconds: float) -> None:
        self.spent += seconds
        self.expected += self.estimates[self.done]
        self.done += 1

    def left_s(self) -> float:
        rest = sum(self.estimates[self.done:])
        scale = self.spent / self.expected if self.expected > 5 and self.spent > 5 else 1.0
        return rest * scale


def run_cases(cases: list[Case], opts: RunOptions, desc: str,
              run_local: Optional[Callable[[Case], dict]] = None, estimates: Optional[list[float]] = None,
              remaining: Optional[Remaining] = None) -> list[dict[str, Any]]:
    """Runs ``cases`` in order, with a progress bar (estimated time left) and one line per
    finished case on stderr; ``run_local`` (if given) runs a case in this process instead of a
    worker (the quality benchmark, which measures no time or memory). ``estimates``: seconds per
    case (from :func:`estimate`); ``remaining``: a shared :class:`Remaining` over several calls."""
    history = _SeriesHistory()
    records = []
    if remaining is None:
        remaining = Remaining(estimates if estimates is not None else [0.0] * len(cases))
    bar = tqdm(cases, desc=desc, unit="case", file=sys.stderr, disable=None, dynamic_ncols=True,
               bar_format="{desc}: {n_fmt}/{total_fmt} cases [{elapsed}] {postfix}")
    for case in bar:
        bar.set_postfix_str(f"~{_fmt_s(remaining.left_s())} left | {case.series} "
                            f"{'N=' + str(case.params['seq_len']) if 'seq_len' in case.params else ''}")
        start = time.monotonic()
        if run_local is not None:
            records.append(run_local(case))
            remaining.finished(time.monotonic() - start)
            bar.write(f"{progress_line(records[-1])} | ~{_fmt_s(remaining.left_s())} left", file=sys.stderr)
            continue
        provider = load_provider(case)
        record = preflight(case, provider, opts, history) or run_case(
            case, device=opts.device, repeats=opts.repeats, budget_s=opts.budget_s, timeout_s=opts.timeout_s,
            threads=opts.threads, allocator=opts.allocator, single_call=opts.single_call,
            time_forward=not opts.single_call)
        remaining.finished(time.monotonic() - start)
        record.setdefault("est_mem_mib", provider.est_bytes(case.params) / 2**20)
        record["flops_fwd"] = provider.cost(case.params)
        if case.benchmark == "attention":
            from .attention import model_bytes

            record["model_bytes"] = model_bytes(case.params)
        if record["status"] == "ok":
            record["gflops_fwdbwd"] = BWD_FLOPS_FACTOR * record["flops_fwd"] / (record["time_fwdbwd_ms"] * 1e6)
            if record.get("model_bytes"):
                record["gbs_fwdbwd"] = record["model_bytes"] / (record["time_fwdbwd_ms"] * 1e6)
        history.update(case, provider, record)
        records.append(record)
        bar.write(f"{progress_line(record)} | ~{_fmt_s(remaining.left_s())} left", file=sys.stderr)
    add_ratio_to_first(records)
    return records


def add_ratio_to_first(records: list[dict[str, Any]]) -> None:
    """``ratio_to_first``: forward+backward time over that of the series' first measured case
    (e.g. the time at 1M tokens over the time at 32K), with ``first_seq_len``."""
    first: dict[str, dict] = {}
    for r in records:
        if r["status"] != "ok" or not r.get("time_fwdbwd_ms"):
            continue
        base = first.setdefault(r["series"], r)
        r["ratio_to_first"] = r["time_fwdbwd_ms"] / base["time_fwdbwd_ms"]
        r["first_seq_len"] = base["params"].get("seq_len")
