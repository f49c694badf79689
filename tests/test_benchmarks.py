"""Tests of the benchmark suite itself (tiny sizes): argument parsing, skip rules, the JSON
schema, the CPU peak-memory method and a small end-to-end run of each sub-benchmark."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from benchmarks import attention, cli, memory, quality, summary
from benchmarks.cases import Case, Provider, make_record
from benchmarks.harness import Workload, measure
from benchmarks.runner import RunOptions, _SeriesHistory, estimate, plan_lines, preflight, run_cases
from benchmarks.settings import FULL, QUICK
from benchmarks.worker import run_case

MIB = 2**20
ATTN = dict(batch=1, heads=2, head_dim=64, dtype="float32", causal=False)
needs_proc = pytest.mark.skipif(not memory.cpu_method_available(), reason="needs Linux /proc/self/clear_refs")


def _opts(**kw) -> RunOptions:
    base = dict(device="cpu", repeats=1, budget_s=0.5, max_call_s=60.0, timeout_s=120.0, mem_limit_bytes=4 * 2**30)
    return RunOptions(**{**base, **kw})


# ----------------------------------------------------------------------------- argument parsing

def test_parse_defaults_and_overrides():
    args = cli.parse_args(["attention", "--quick", "--lengths", "128", "256", "--n-hashes", "2", "--heads", "4",
                           "--repeats", "2", "--device", "cpu", "--providers", "sdpa", "lsh*"])
    s = cli.settings_from_args(args)
    assert args.benchmark == "attention" and args.quick and args.providers == ["sdpa", "lsh*"]
    assert args.allocator == "default"  # time what a user's process gets unless asked otherwise
    assert s.attention.lengths == (128, 256) and s.attention.n_hashes == (2,) and s.attention.heads == 4
    assert s.repeats == 2 and s.attention.head_dim == QUICK.attention.head_dim  # untouched fields keep the preset
    full = cli.settings_from_args(cli.parse_args(["all"]))
    assert full == FULL and max(full.attention.lengths) == 16384
    depth_only = cli.settings_from_args(cli.parse_args(["model", "--sweeps", "depth", "--depths", "2", "12"]))
    assert {c.params["sweep"] for c in cli.plan("model", depth_only, "float32")} == {"depth"}
    assert {c.params["depth"] for c in cli.plan("model", depth_only, "float32")} == {2, 12}
    assert cli.parse_args(["attention", "--allocator", "tuned"]).allocator == "tuned"


def test_long_presets():
    long = cli.settings_from_args(cli.parse_args(["attention", "--long"]))
    assert long.attention.lengths == (32768, 131072, 1048576) and long.attention.n_hashes == (4,)
    assert long.single_call and long.attention.providers == ("naive", "sdpa", "lsh-torch")
    cases = cli.select(cli.plan("attention", long, "float32"), long.attention.providers)
    assert {c.series for c in cases} == {"naive", "sdpa", "lsh-torch h=4"}
    assert all(c.params["bucket_size"] == 64 for c in cases if c.provider == "lsh-torch")
    step = cli.plan("model", cli.settings_from_args(cli.parse_args(["model", "--long"])), "float32")
    assert len(step) == 1 and step[0].params["seq_len"] == 2**20 and step[0].params["reversible"]
    assert step[0].params["axial_shape"] == [1024, 1024] and step[0].params["depth"] == 2
    with pytest.raises(SystemExit):
        cli.parse_args(["attention", "--long", "--quick"])


@pytest.mark.parametrize("argv", [["nonsense"], ["attention", "--lengths", "0"], ["model", "--repeats", "-1"],
                                  ["attention", "--dtype", "int8"], ["model", "--sweeps", "width"], [],
                                  ["quality", "--lengths", "128"], ["attention", "--allocator", "jemalloc"]])
def test_parse_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)


def test_subcommand_help_shows_only_its_options(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["attention", "--help"])
    text = capsys.readouterr().out
    assert "--lengths" in text and "--long" in text and "--depths" not in text and "--sweeps" not in text
    for name in attention.PROVIDERS:  # provider names are listed
        assert name in text
    with pytest.raises(SystemExit):
        cli.parse_args(["model", "--help"])
    text = capsys.readouterr().out
    assert "--depths" in text and "--lengths" not in text and "reformer_lm" in text
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = capsys.readouterr().out
    for command in ("attention", "model", "quality", "all", "generate", "gpu-check", "attention-map"):
        assert command in text


def test_quick_duration_in_help_matches_readme(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["all", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"about {cli.QUICK_MINUTES} minutes" in text
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f"about {cli.QUICK_MINUTES} minutes" in " ".join(readme.split())


@pytest.mark.parametrize("command, module", [("generate", "generate"), ("gpu-check", "gpu_check")])
def test_external_subcommands(command, module, capsys, monkeypatch):
    """generate / gpu-check are lazily imported; a missing module gives a clear message, a present
    one contributes its own options."""
    present = importlib.util.find_spec(f"benchmarks.{module}") is not None
    if not present:
        with pytest.raises(SystemExit, match=f"no {module}.py benchmark module"):
            cli.parse_args([command])
    fake = types.ModuleType(f"benchmarks.{module}")
    fake.add_arguments = lambda p: p.add_argument("--fake-option", type=int, default=3)
    fake.run = lambda args: 7 if args.fake_option == 5 else 1
    monkeypatch.setitem(sys.modules, f"benchmarks.{module}", fake)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert cli.main([command, "--fake-option", "5"]) == 7
    with pytest.raises(SystemExit):
        cli.parse_args([command, "--help"])
    assert "--fake-option" in capsys.readouterr().out


def test_real_external_modules_have_the_interface():
    """Once benchmarks/generate.py or gpu_check.py exist, they expose add_arguments and run and
    their options show in their sub-command's help."""
    for module in ("generate", "gpu_check"):
        if importlib.util.find_spec(f"benchmarks.{module}") is None:
            continue
        mod = importlib.import_module(f"benchmarks.{module}")
        assert callable(mod.add_arguments) and callable(mod.run)
        parser = cli.build_parser([module.replace("_", "-")])
        assert parser.parse_args([module.replace("_", "-")]).external is mod


def test_provider_patterns_select_series():
    cases = cli.plan("attention", dataclasses.replace(QUICK, attention=dataclasses.replace(
        QUICK.attention, lengths=(128,), n_hashes=(1, 4))), "float32")
    picked = cli.select(cases, ["sdpa", "lsh-torch"])
    assert [c.series for c in picked] == ["sdpa", "lsh-torch h=1", "lsh-torch h=4"]
    assert [c.series for c in cli.select(cases, ["lsh[[]torch]*"])] == ["lsh-torch h=1", "lsh-torch h=4"]  # old
    assert [c.series for c in cli.select(cases, ["lsh-torch h=4"])] == ["lsh-torch h=4"]
    assert cases[0].provider == "naive"  # the baseline comes first


def test_plan_estimates_and_skips_before_running(capsys):
    """The plan printed before a run: what runs, what is skipped and why, an estimated duration;
    nothing is started (a worker would fail the test)."""
    s = cli.settings_from_args(cli.parse_args(["attention", "--long"]))
    opts = _opts(mem_limit_bytes=16 * 2**30, max_call_s=s.max_call_s, single_call=True,
                 max_call_s_by_provider=s.max_call_s_by_provider)
    cases = cli.select(cli.plan("attention", s, "float32"), s.attention.providers)
    planned = estimate(cases, opts)
    by = {(c.series, c.params["seq_len"]): (r, sec) for c, r, sec in planned}
    assert by[("naive", 32768)][0]["note"].startswith("est. ")  # 112 GiB of scores
    assert by[("sdpa", 32768)][0] is None and by[("sdpa", 32768)][1] > 10
    assert "s per call" in by[("sdpa", 131072)][0]["note"]  # quadratic time, predicted from 32K
    assert by[("lsh-torch h=4", 131072)][0] is None
    lines = plan_lines("attention", planned)
    assert lines[0].startswith("plan: attention: 9 cases") and "est." in lines[0]
    assert cli.main(["attention", "--long", "--plan-only", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "plan: estimated duration" in out and "lsh-torch h=4" in out


def test_full_preset_is_planned_within_twenty_minutes():
    """The full sweep's estimate (the providers' rough CPU rates, 2 threads) stays within 20 minutes."""
    s = cli.settings_from_args(cli.parse_args(["all"]))
    opts = _opts(repeats=s.repeats, budget_s=s.budget_s, max_call_s=s.max_call_s, mem_limit_bytes=16 * 2**30)
    total = sum(sec for name in cli.BENCHMARKS
                for _, _, sec in estimate(cli.plan(name, s, "float32"), opts,
                                          cli._quality_s if name == "quality" else None))
    assert 5 * 60 < total < 20 * 60


# ----------------------------------------------------------------------------- skip rules

def test_naive_attention_too_big_is_skipped_with_estimate():
    params = dict(ATTN, heads=8, seq_len=65536)
    case = Case("attention", "naive", "naive", params)
    opts = _opts(mem_limit_bytes=20 * 2**30)
    record = preflight(case, attention.PROVIDERS["naive"], opts, _SeriesHistory())
    n2_gib = 8 * 65536**2 * 4 / 2**30  # one score matrix: 128 GiB
    assert record["status"] == "skipped" and record["note"].startswith("est. ")
    assert float(record["note"].split()[1]) >= n2_gib
    # the same length fits for LSH
    lsh = Case("attention", "lsh-torch", "lsh-torch h=4", dict(params, bucket_size=64, n_hashes=4))
    assert preflight(lsh, attention.PROVIDERS["lsh-torch"], opts, _SeriesHistory()) is None


def test_skip_reasons_cuda_unavailable_and_time():
    case = Case("attention", "x", "x", dict(ATTN, seq_len=1024))
    fake = Provider("x", build=None, est_bytes=lambda p: 0.0, cost=lambda p: float(p["seq_len"] ** 2))
    history = _SeriesHistory()
    history.predict_s = lambda case, provider, device="cpu": _SeriesHistory.predict_s(history, case, provider, "cuda")
    assert preflight(case, dataclasses.replace(fake, needs_cuda=True), _opts(), history)["note"] == "needs CUDA"
    gone = preflight(case, dataclasses.replace(fake, missing=lambda: "pkg not importable"), _opts(), history)
    assert gone["status"] == "unavailable" and "pkg" in gone["note"]
    # 1 s measured at N=1024; cost ~ N^2 predicts 16 s at N=4096 > 10 s cap
    history.update(case, fake, make_record(case, "ok", time_fwdbwd_ms=1000.0))
    longer = dataclasses.replace(case, params=dict(case.params, seq_len=4096))
    skipped = preflight(longer, fake, _opts(max_call_s=10.0), history)
    assert skipped["status"] == "skipped" and skipped["note"].startswith("est. 16 s")
    assert preflight(longer, fake, _opts(max_call_s=20.0), history) is None


def test_run_cases_reports_instead_of_crashing(monkeypatch):
    """Skipped cases never start a worker; a failing or hung worker gives an error/timeout record."""
    monkeypatch.setattr("benchmarks.runner.run_case", lambda *a, **k: pytest.fail("worker started"))
    cases = [Case("attention", "naive", "naive", dict(ATTN, heads=8, seq_len=65536)),
             Case("attention", "lsh-triton", "lsh-triton h=4", dict(ATTN, seq_len=256, bucket_size=64, n_hashes=4))]
    records = run_cases(cases, _opts(), "test")
    assert records[0]["status"] == "skipped" and records[0]["note"].startswith("est. ")
    assert records[1]["status"] in ("skipped", "unavailable")  # needs CUDA (or Triton is not installed)
    bad = Case("attention", "lsh-torch", "lsh", dict(ATTN, seq_len=64, bucket_size=0, n_hashes=1))
    record = run_case(bad, device="cpu", repeats=1, budget_s=1.0, timeout_s=120.0)
    assert record["status"] == "error" and "bucket_size" in record["note"]
    hung = run_case(bad, device="cpu", repeats=1, budget_s=1.0, timeout_s=0.05)
    assert hung["status"] == "timeout"


# ----------------------------------------------------------------------------- memory method

@pytest.fixture
def exact_rss():
    memory.exact_rss_mode()
    yield
    memory.caching_mode()


@needs_proc
def test_peak_memory_matches_known_allocations(exact_rss):
    def alloc(mib: int):
        return lambda: torch.ones(mib * MIB // 4).sum()

    for mib in (8, 40):
        alloc(mib)()  # freed again: a cached block must not hide the next call's allocation
        assert abs(memory.peak_extra_bytes(alloc(mib), torch.device("cpu")) / MIB - mib) < 2
    assert memory.peak_extra_bytes(lambda: None, torch.device("cpu")) / MIB < 1
    held = [torch.ones(16 * MIB // 4)]
    held[0].add_(1)  # warm-up, as in the protocol
    # memory that stays allocated before the call is baseline, not peak
    assert memory.peak_extra_bytes(lambda: held[0].add_(1), torch.device("cpu")) / MIB < 1


@needs_proc
def test_naive_attention_peak_covers_its_score_matrix():
    """In a worker, like every benchmark case: the measured peak holds at least the
    (B, H, N, N) float32 score matrix; a no-op step (the identity on a tiny tensor) shows ~0."""
    b, h, n = 1, 2, 1024
    case = Case("attention", "naive", "naive", dict(ATTN, batch=b, heads=h, seq_len=n))
    record = run_case(case, device="cpu", repeats=1, budget_s=0.5, timeout_s=120.0)
    assert record["status"] == "ok", record["note"]
    assert record["peak_mem_mib"] * MIB >= b * h * n * n * 4
    x = torch.zeros(4, requires_grad=True)
    assert measure(Workload(lambda: x.view(2, 2)), torch.device("cpu"), 1, 0.1)["peak_mem_mib"] < 1



def test_single_call_memory_in_exact_rss_mode_and_time_with_the_users_allocator(monkeypatch):
    """The ``--long`` protocol: the memory call runs in the exact-RSS mode and reports no time;
    the time call runs with glibc untouched (``allocator="default"``), after one warm-up call
    when the first call is shorter than ``SINGLE_CALL_WARMUP_S``."""
    from benchmarks import harness

    calls, modes = [], []
    x = torch.ones(4, requires_grad=True)
    workload = Workload(lambda: (calls.append(1), (x * 2).sum())[1], leaves=[x])
    monkeypatch.setattr(harness, "exact_rss_mode", lambda: modes.append("exact-rss"))
    monkeypatch.setattr(harness, "caching_mode", lambda: modes.append("tuned"))
    monkeypatch.setattr(harness, "peak_extra_bytes", lambda step, device: (step(), 3 * MIB)[1])
    cpu = torch.device("cpu")
    mem = measure(workload, cpu, 1, 0.0, phase="memory", allocator="default", single_call=True)
    assert (mem["peak_mem_mib"], mem["time_fwdbwd_ms"], modes, len(calls)) == (3.0, None, ["exact-rss"], 1)
    assert x.grad is not None  # allocated up front, as a warm-up would leave it
    modes.clear(), calls.clear()
    monkeypatch.setattr(harness, "SINGLE_CALL_WARMUP_S", 1e6)
    timed = measure(workload, cpu, 1, 0.0, phase="time", allocator="default", single_call=True)
    assert modes == [] and len(calls) == 2 and timed["peak_mem_mib"] is None
    assert timed["warmup_ms"] > 0 and timed["time_fwdbwd_ms"] > 0
    calls.clear()
    monkeypatch.setattr(harness, "SINGLE_CALL_WARMUP_S", 0.0)
    slow = measure(workload, cpu, 1, 0.0, phase="time", allocator="default", single_call=True)
    assert len(calls) == 1 and slow["warmup_ms"] == 0.0  # a long first call is the measurement
    calls.clear()
    both = measure(workload, cpu, 1, 0.0, phase="both", allocator="tuned", single_call=True)
    assert modes == ["exact-rss", "tuned"] and len(calls) == 2 and both["peak_mem_mib"] == 3.0
    with pytest.raises(ValueError, match="process of its own"):
        measure(workload, cpu, 1, 0.0, phase="both", allocator="default", single_call=True)


# ----------------------------------------------------------------------------- outputs

def test_crossover_statement_from_records():
    def rec(series, n, ms):
        return make_record(Case("attention", series.split()[0], series, {"seq_len": n}), "ok", time_fwdbwd_ms=ms,
                           peak_mem_mib=1.0)

    records = [rec("lsh-torch h=4", n, 10.0) for n in (1024, 2048, 4096)]
    records += [rec("naive", 1024, 5.0), rec("naive", 2048, 20.0), rec("naive", 4096, 80.0)]
    records += [rec("sdpa", n, 1.0) for n in (1024, 2048, 4096)]
    text = summary.crossover(records, "lsh-torch h=4", "naive")
    assert "between N = 1024" in text and "N = 2048" in text and "N ~ 1,448" in text
    assert "not faster" in summary.crossover(records, "lsh-torch h=4", "sdpa")
    records.append(rec("lsh-torch h=4", 8192, 20.0))
    records.append(make_record(Case("attention", "naive", "naive", {"seq_len": 8192}), "skipped", "est. 9 GiB"))
    longest = summary.at_longest(records, "lsh-torch h=4", "naive")
    assert longest.startswith("N = 4096: lsh-torch h=4 10 ms vs naive 80 ms (8.0x faster)")
    assert longest.endswith("N = 8192: lsh-torch h=4 20 ms, 1 MiB; naive skipped (est. 9 GiB)")


def _check_schema(path):
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1
    for key in ("device", "torch", "cpu", "threads", "memory_method", "settings", "command"):
        assert key in data["metadata"]
    for r in data["records"]:
        assert {"benchmark", "provider", "series", "params", "status", "note", "time_fwd_ms", "time_fwdbwd_ms",
                "peak_mem_mib"} <= set(r)
        assert r["status"] in ("ok", "skipped", "unavailable", "timeout", "error")
        if r["status"] == "ok" and r["benchmark"] != "quality":
            assert r["time_fwd_ms"] > 0 and r["time_fwdbwd_ms"] > 0 and r["peak_mem_mib"] >= 0
    return data["records"]


@needs_proc
def test_attention_end_to_end(tmp_path, capsys):
    code = cli.main(["attention", "--quick", "--lengths", "64", "128", "--heads", "2", "--n-hashes", "1",
                     "--bucket-size", "16", "--repeats", "1", "--device", "cpu", "--providers", "naive", "lsh*",
                     "--max-call-s", "600",  # a busy machine must not turn the second length into a skip
                     "--out", str(tmp_path)])
    assert code == 0
    records = _check_schema(tmp_path / "results.json")
    assert {r["series"]: r["status"] for r in records if r["params"]["seq_len"] in (64, 128)} == {
        "naive": "ok", "lsh-torch h=1": "ok", "lsh-triton h=1": "skipped"}
    lsh = {r["params"]["seq_len"]: r for r in records if r["series"] == "lsh-torch h=1"}
    assert lsh[64]["ratio_to_first"] == 1.0 and lsh[128]["first_seq_len"] == 64
    assert lsh[128]["ratio_to_first"] == pytest.approx(lsh[128]["time_fwdbwd_ms"] / lsh[64]["time_fwdbwd_ms"])
    assert all(r["allocator"] == "default" for r in records if r["status"] == "ok")
    assert all(r["model_bytes"] > 0 for r in records), records  # every attention record has the bytes model
    naive = next(r for r in records if r["series"] == "naive" and r["params"]["seq_len"] == 128)
    assert naive["model_bytes"] == 12 * 2 * 128 * 64 * 4 and naive["gbs_fwdbwd"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["metadata"]["allocator"] == "default"
    assert (tmp_path / "attention.png").stat().st_size > 0 and "lsh-torch h=1" in (tmp_path / "summary.md").read_text()
    out = capsys.readouterr().out
    assert "forward+backward time (ms) [allocator: default]" in out and "plan: estimated duration" in out


@needs_proc
def test_model_and_quality_end_to_end(tmp_path):
    s = dataclasses.replace(
        QUICK,
        model=dataclasses.replace(QUICK.model, depths=(1,), depth_len=128, lengths=(), ffn_len=256, ffn_d_model=32,
                                  ffn_d_ff=64, ff_chunks=4,
                                  dims=dict(vocab_size=32, d_model=32, n_heads=2, d_ff=64, bucket_size=16, n_hashes=1)),
        quality=dataclasses.replace(QUICK.quality, seq_len=64, heads=1, bucket_sizes=(16,), n_hashes=(1, 2), seeds=1),
    )
    patterns = ["transformer", "reformer_lm reversible*", "ffn ff_chunks=4", "lsh*"]
    records = cli.run(["model", "quality"], s, _opts(), "float32", patterns)
    meta = {"device": "cpu", "device_name": "test", "torch": torch.__version__, "dtype": "float32", "cpu": "test",
            "threads": 1, "memory_method": "test", "settings": {}, "command": "test"}
    cli.write_outputs(tmp_path, meta, records)
    records = _check_schema(tmp_path / "results.json")
    assert [r["status"] for r in records if r["benchmark"] == "model"] == ["ok"] * 3, records
    q = [r for r in records if r["benchmark"] == "quality"]
    assert len(q) == 4 + 2 * sum(len(entry) for entry in quality.HASHING_PAIRS)  # n_hashes sweep + schemes per input
    assert all(r["status"] == "ok" and 0 <= r["recall_at_k"] <= 1 and r["rel_err"] >= 0 for r in q)
    assert (tmp_path / "model.png").exists() and (tmp_path / "quality.png").exists()


def test_quality_weights_reproduce_lsh_output():
    """The W read back with one-hot values is the op's attention matrix: W @ v == lsh_attention."""
    from reformer.kernels import lsh_attention

    qk, v = quality.make_inputs("clustered", (1, 2, 100, 16), seed=0)
    kw = dict(bucket_size=8, n_hashes=2, seed=3, backend="torch")
    w = quality.lsh_weights(qk, **kw)
    torch.testing.assert_close(w @ v, lsh_attention(qk, v, **kw), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 100))


def test_quality_hashing_axis_compares_plain_and_factorised_at_equal_bucket_counts(tmp_path, monkeypatch):
    from benchmarks import plots, report

    cases = quality.plan((1, 2), (8, 16), batch=1, heads=1, seq_len=64, head_dim=16, seeds=1, top_k=4,
                         hashing=[(64, (8, 8)), (256, (16, 16))])
    assert [c.params["sweep"] for c in cases] == ["n_hashes"] * 8 + ["hashing"] * 8
    assert all(c.params["n_buckets"] is None and c.params["hashing"] == "default" for c in cases[:8])
    hashing = cases[8:]
    assert [(c.params["input"], c.series, c.params["n_buckets"], c.params["hashing"]) for c in hashing[:4]] == [
        ("random", "random plain", 64, "plain 64"), ("random", "random factorised", [8, 8], "factorised 8x8"),
        ("random", "random plain", 256, "plain 256"), ("random", "random factorised", [16, 16], "factorised 16x16")]
    assert [c.params["input"] for c in hashing[4:]] == ["clustered"] * 4
    assert {(c.params["n_hashes"], c.params["bucket_size"]) for c in hashing} == {(quality.HASHING_N_HASHES, 16)}
    assert [c.params["total_buckets"] for c in hashing[:4]] == [64, 64, 256, 256]
    assert not [c for c in quality.plan((1,), (8,), batch=1, heads=1, seq_len=64, head_dim=16, seeds=1, top_k=4,
                                        hashing=()) if c.params["sweep"] == "hashing"]
    for bad in [(64, (8, 4)), (64, (4, 4, 2)), (64, (2, 2, 2, 8))]:
        with pytest.raises(ValueError, match="product of factors == n"):
            quality.plan((1,), (8,), batch=1, heads=1, seq_len=64, head_dim=16, seeds=1, top_k=4, hashing=[bad])
    three = quality.plan((1,), (8,), batch=1, heads=1, seq_len=64, head_dim=16, seeds=1, top_k=4,
                         hashing=[(64, (8, 8), (4, 4, 4))])[2:5]
    assert [(c.series, c.params["n_buckets"], c.params["hashing"]) for c in three] == [
        ("random plain", 64, "plain 64"), ("random factorised", [8, 8], "factorised 8x8"),
        ("random factorised x3", [4, 4, 4], "factorised 4x4x4")]
    assert quality.run(three[2])["status"] == "ok"  # JSON [4, 4, 4] reaches lsh_attention as three factors

    seen = []
    compare = quality.compare
    monkeypatch.setattr(quality, "compare", lambda *a, **kw: seen.append(kw["n_buckets"]) or compare(*a, **kw))
    records = [quality.run(c) for c in cases[4:8] + hashing[4:]]  # the clustered cases
    assert seen == [None] * 4 + [64, (8, 8), 256, (16, 16)]  # JSON [8, 8] reaches lsh_attention as a pair
    assert all(r["status"] == "ok" for r in records)
    plain, factorised = records[4], records[5]
    assert plain["rel_err"] != factorised["rel_err"]  # different hashes, so different keys seen
    table = report.quality_table(records)
    assert "hashing (buckets)" in table and "factorised 16x16" in table and "plain 64" in table
    plots.quality_plot(records, tmp_path / "quality.png", "test")
    plots.quality_plot(records[4:], tmp_path / "hashing_only.png", "test")
    assert (tmp_path / "quality.png").stat().st_size > (tmp_path / "hashing_only.png").stat().st_size > 0


def test_quality_command_line_chooses_length_sweeps_and_hashing_schemes(capsys):
    args = cli.parse_args(["quality", "--quick", "--seq-len", "128", "--quality-sweeps", "hashing",
                           "--hashing", "64:8x8:4x4x4", "256:16x16", "--hashing-n-hashes", "3"])
    cases = cli.plan("quality", cli.settings_from_args(args), "float32")
    assert {c.params["sweep"] for c in cases} == {"hashing"} and {c.params["seq_len"] for c in cases} == {128}
    assert [c.params["n_buckets"] for c in cases[:5]] == [64, [8, 8], [4, 4, 4], 256, [16, 16]]
    assert {c.params["n_hashes"] for c in cases} == {3} and len(cases) == 2 * 5
    default = cli.plan("quality", cli.settings_from_args(cli.parse_args(["quality", "--quick"])), "float32")
    assert {c.params["sweep"] for c in default} == {"n_hashes", "hashing"}
    for bad in ("64:8x4", "64", "64:8x8x", "x:8x8", "64:2x2x2x8"):
        with pytest.raises(SystemExit):
            cli.parse_args(["quality", "--hashing", bad])
        assert "--hashing" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["quality", "--seq-len", "0"])


def test_quick_quality_preset_stays_short():
    """The hashing sweep costs about as much as the n_hashes sweep (estimated work, at most 25%
    more), and the quick preset's quality part stays planned at well under a minute."""
    cases = cli.plan("quality", QUICK, "float32")
    by_sweep = {sweep: sum(cli._quality_s(c) for c in cases if c.params["sweep"] == sweep)
                for sweep in quality.SWEEPS}
    assert 0 < by_sweep["hashing"] <= 1.25 * by_sweep["n_hashes"]
    assert sum(by_sweep.values()) < 60


def test_attention_map_command_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["attention-map", "--out", str(tmp_path), "--layer", "1", "--head", "3",
                     "--text", "a short text"]) == 0
    png = tmp_path / "attention_map.png"
    assert png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert "over N=12 tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="head=4 is out of range"):
        cli.main(["attention-map", "--out", str(tmp_path), "--head", "4"])


def test_profile_lsh_times_every_phase_and_restores_the_functions(capsys):
    from benchmarks import profile_lsh
    from reformer.kernels import lsh_function, ref_lsh

    originals = (lsh_function.hash_buckets, lsh_function.sort_rounds, ref_lsh.forward_round, ref_lsh.backward_round)
    t = profile_lsh.profile(200, heads=2, head_dim=16, bucket_size=8, n_hashes=2)
    assert set(t) == {"hash", "sort", "forward rounds", "backward rounds", "forward", "total"}
    assert all(v > 0 for v in t.values()) and t["forward rounds"] + t["backward rounds"] < t["total"]
    assert (lsh_function.hash_buckets, lsh_function.sort_rounds, ref_lsh.forward_round,
            ref_lsh.backward_round) == originals
    assert profile_lsh.main(["64"]) == 0 and "N=64: total" in capsys.readouterr().out
