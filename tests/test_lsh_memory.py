"""Memory of the torch LSH path: linear in N with a small slope, and the benchmark's model of it.

The peak is measured as the benchmarks measure it (a fresh worker process, peak RSS above the
RSS before one forward+backward call; ``benchmarks/memory.py``).
"""
from __future__ import annotations

import pytest

from benchmarks import attention, cli, memory
from benchmarks.cases import Case
from benchmarks.runner import RunOptions, estimate
from benchmarks.worker import run_case

MIB, GIB = 2**20, 2**30
needs_proc = pytest.mark.skipif(not memory.cpu_method_available(), reason="needs Linux /proc/self/clear_refs")


def _lsh_case(n: int, heads: int = 1) -> Case:
    params = dict(batch=1, heads=heads, seq_len=n, head_dim=64, dtype="float32", causal=False, bucket_size=64,
                  n_hashes=4)
    return Case("attention", "lsh-torch", "lsh-torch h=4", params)


def _peak_mib(case: Case) -> float:
    record = run_case(case, device="cpu", repeats=1, budget_s=0.0, timeout_s=600.0, single_call=True,
                      memory_only=True)
    assert record["status"] == "ok", record["note"]
    return record["peak_mem_mib"]


@needs_proc
def test_peak_grows_by_little_more_than_output_and_gradients():
    """From N = 8K to 32K (one head, D=64) the peak grows by the output, its gradient and the two
    input gradients (4 x 256 bytes per row) plus at most 256 bytes per row: the sorted copies,
    per-round results and logits live in fixed-size slabs. (Gathering whole groups into sorted
    order, as the torch path once did, grows by over 2 KiB per row.)"""
    small, large = _lsh_case(8192), _lsh_case(32768)
    growth = (_peak_mib(large) - _peak_mib(small)) * MIB
    rows = large.params["seq_len"] - small.params["seq_len"]
    assert growth <= rows * (4 * 64 * 4 + 256), growth / MIB


@needs_proc
def test_the_memory_model_bounds_the_measured_peak():
    case = _lsh_case(16384, heads=2)
    peak = _peak_mib(case) * MIB
    est = attention.PROVIDERS["lsh-torch"].est_bytes(case.params)
    rows = 2 * 16384
    assert rows * 4 * 64 * 4 <= peak <= est, (peak / MIB, est / MIB)


def test_long_preset_plans_one_million_tokens_on_a_24_gib_machine():
    """With 22 GiB available (a 24 GiB machine at rest), the 85% limit keeps the 1M LSH case; a
    machine with half that memory skips it with its estimate."""
    s = cli.settings_from_args(cli.parse_args(["attention", "--long"]))
    cases = [c for c in cli.plan("attention", s, "float32") if c.provider == "lsh-torch"]
    assert [c.params["seq_len"] for c in cases] == [32768, 131072, 1048576]

    def planned(available_gib: float) -> dict:
        opts = RunOptions(device="cpu", repeats=1, budget_s=0.0, max_call_s=s.max_call_s, timeout_s=s.timeout_s,
                          mem_limit_bytes=0.85 * available_gib * GIB, single_call=True)
        return {c.params["seq_len"]: record for c, record, _ in estimate(cases, opts)}

    assert all(record is None for record in planned(22.0).values())
    small = planned(11.0)
    assert small[131072] is None and small[1048576]["note"].startswith("est. ")
    est = attention.PROVIDERS["lsh-torch"].est_bytes(cases[-1].params)
    assert 8 * GIB < est < 10 * GIB  # output, its gradient and two input gradients alone are 8 GiB
