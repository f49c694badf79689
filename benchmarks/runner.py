"""Runs a list of cases: decides what to skip, runs the rest (each in a fresh process), and
shows a progress bar.

A case is not run, and gets a record saying why, when:

- its provider's code is not importable: ``unavailable``;
- it is a Triton backend and the device is not CUDA: ``skipped (needs CUDA)``;
- its estimated peak memory (``Provider.est_bytes``) exceeds the memory limit:
  ``skipped (est. X GiB > limit Y GiB)``;
- the forward+backward time predicted from the last measured case of the same series (scaled
  by the provider's FLOP formula) exceeds ``max_call_s``, or a shorter case of the same series
  already timed out or was skipped for time: ``skipped (est. X s per call ...)``.

Cases that run longer than ``timeout_s`` are stopped: ``timeout``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from tqdm import tqdm

from .cases import Case, Provider, make_record
from .worker import load_provider, run_case

GIB = 2**30
BWD_FLOPS_FACTOR = 3.5  # forward+backward FLOPs = forward FLOPs x (1 + 2.5), as flash-attention counts


@dataclass(frozen=True)
class RunOptions:
    """device: "cpu" or "cuda". repeats: timed calls per phase (fewer for slow cases, see
    ``harness``). budget_s: time allowed for each timing phase. max_call_s: longest predicted
    forward+backward call that is still run. timeout_s: per case. mem_limit_bytes: largest
    estimated peak that is still run. threads: torch threads in the workers (None = default)."""

    device: str
    repeats: int
    budget_s: float
    max_call_s: float
    timeout_s: float
    mem_limit_bytes: float
    threads: Optional[int] = None


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

    def predict_s(self, case: Case, provider: Provider) -> Optional[float]:
        if case.series not in self.last:
            return None
        cost, seconds = self.last[case.series]
        return seconds * provider.cost(case.params) / cost


def preflight(case: Case, provider: Provider, opts: RunOptions, history: _SeriesHistory) -> Optional[dict]:
    """A record for a case that must not run (see the module docstring), or None."""
    reason = provider.missing()
    if reason is not None:
        return make_record(case, "unavailable", reason)
    if provider.needs_cuda and opts.device != "cuda":
        return make_record(case, "skipped", "needs CUDA")
    est = provider.est_bytes(case.params)
    if est > opts.mem_limit_bytes:
        return make_record(case, "skipped", f"est. {est / GIB:.1f} GiB > limit {opts.mem_limit_bytes / GIB:.1f} GiB",
                           est_mem_mib=est / 2**20)
    if case.series in history.too_slow:
        return make_record(case, "skipped",
                           f"a shorter case of this series was already over {opts.max_call_s:.0f} s per call")
    predicted = history.predict_s(case, provider)
    if predicted is not None and predicted > opts.max_call_s:
        return make_record(case, "skipped", f"est. {predicted:.0f} s per call > {opts.max_call_s:.0f} s")
    return None


def progress_line(record: dict[str, Any]) -> str:
    """One line per finished case for the progress log, e.g.
    ``attention | sdpa | N=4096 | ok | fwd+bwd 1,800 ms | 42 MiB``."""
    params = record["params"]
    where = " ".join(f"{k}={params[k]}" for k in ("depth", "seq_len", "n_hashes") if k in params)
    if record["status"] != "ok":
        what = f"{record['status']} ({record['note']})"
    elif record.get("time_fwdbwd_ms") is not None:
        what = f"ok | fwd+bwd {record['time_fwdbwd_ms']:,.0f} ms | {record['peak_mem_mib']:,.0f} MiB"
    else:
        what = f"ok | rel. error {record['rel_err']:.3f} | recall {record['recall_at_k']:.3f}"
    return f"{record['benchmark']} | {record['series']} | {where} | {what}"


def run_cases(cases: list[Case], opts: RunOptions, desc: str,
              run_local: Optional[Callable[[Case], dict]] = None) -> list[dict[str, Any]]:
    """Runs ``cases`` in order, with a progress bar and one line per finished case on stderr;
    ``run_local`` (if given) runs a case in this process instead of a worker (the quality
    benchmark, which measures no time or memory)."""
    history = _SeriesHistory()
    records = []
    bar = tqdm(cases, desc=desc, unit="case", file=sys.stderr, disable=None, dynamic_ncols=True)
    for case in bar:
        bar.set_postfix_str(f"{case.series} N={case.params.get('seq_len')}")
        if run_local is not None:
            records.append(run_local(case))
            bar.write(progress_line(records[-1]), file=sys.stderr)
            continue
        provider = load_provider(case)
        record = preflight(case, provider, opts, history) or run_case(
            case, device=opts.device, repeats=opts.repeats, budget_s=opts.budget_s, timeout_s=opts.timeout_s,
            threads=opts.threads)
        record.setdefault("est_mem_mib", provider.est_bytes(case.params) / 2**20)
        record["flops_fwd"] = provider.cost(case.params)
        if record["status"] == "ok":
            record["gflops_fwdbwd"] = BWD_FLOPS_FACTOR * record["flops_fwd"] / (record["time_fwdbwd_ms"] * 1e6)
        history.update(case, provider, record)
        records.append(record)
        bar.write(progress_line(record), file=sys.stderr)
    return records
