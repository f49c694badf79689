"""``python -m reformer.experiments``: the ``compare`` grid (causal_mode x hashing scheme on the
duplication and text tasks) and the LSH scheme options of ``duplication``, at tiny sizes."""
import json
import math

import pytest

from reformer.checkpoint import load_training_checkpoint
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.experiments import compare, compare_parser, duplication, format_compare_table, left_to_right_logits

TINY = ["--threads", "1", "--n-hashes", "2", "--eval-batches", "1",
        "--dup-seq-len", "16", "--dup-vocab-size", "8", "--dup-d-model", "16", "--dup-bucket-size", "4",
        "--dup-steps", "2", "--dup-batch-size", "4", "--dup-n-buckets", "4", "2x2",
        "--text-seq-len", "32", "--text-depth", "1", "--text-d-model", "16", "--text-bucket-size", "8",
        "--text-steps", "2", "--text-batch-size", "2", "--text-n-buckets", "4", "2x2"]


def test_compare_runs_the_grid_and_records_each_scheme(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    out = tmp_path / "grid"
    table = compare([*TINY, "--text", str(corpus), "--out", str(out)])
    printed = capsys.readouterr().out
    assert table in printed and "machine:" in printed
    report = json.loads((out / "compare.json").read_text())
    cells = [(r["task"], r["causal_mode"], r["n_buckets"]) for r in report["results"]]
    assert cells == [(t, m, n) for t in ("duplication", "text") for m in ("chunk", "bucket") for n in ("4", "2x2")]
    lines = table.splitlines()
    assert len(lines) == 2 + len(cells) and lines[0].startswith("| task | causal_mode | n_buckets |")
    for r in report["results"]:
        assert math.isfinite(r["loss"]) and 0.0 <= r["acc"] <= 1.0
        assert r["bits_per_char"] == pytest.approx(r["loss"] / math.log(2))
        assert r["steps"] == 2 and r["n_hashes"] == 2 and r["seed"] == 0
        folder = out / f"{r['task']}-{r['causal_mode']}-{r['n_buckets']}"
        setup = load_training_checkpoint(folder / "checkpoint.pt")["meta"]["setup"]
        expected = [2, 2] if r["n_buckets"] == "2x2" else 4
        assert setup["causal_mode"] == r["causal_mode"] and setup["n_buckets"] == expected
        assert setup["task"] == r["task"]
    # the same budget in every cell of a task: only causal_mode and n_buckets differ
    for task in ("duplication", "text"):
        setups = [load_training_checkpoint(out / f"{task}-{m}-{n}" / "checkpoint.pt")["meta"]["setup"]
                  for m in ("chunk", "bucket") for n in ("4", "2x2")]
        rest = [{k: v for k, v in s.items() if k not in ("causal_mode", "n_buckets")} for s in setups]
        assert all(r == rest[0] for r in rest)
    # left to right: bucket mode has no look-ahead, so it scores exactly as teacher-forced
    for r in report["results"]:
        assert 0.0 <= r["l2r_acc"] <= 1.0 and math.isfinite(r["l2r_loss"])
        if r["causal_mode"] == "bucket":
            assert r["l2r_acc"] == r["tf_acc"] and r["l2r_loss"] == pytest.approx(r["tf_loss"], rel=1e-5)
    # --eval-only scores the finished runs again without training
    again = compare([*TINY, "--text", str(corpus), "--out", str(out), "--eval-only"])
    rerun = json.loads((out / "compare.json").read_text())["results"]
    assert [r["acc"] for r in rerun] == [r["acc"] for r in report["results"]]
    assert all(r["seconds"] is None for r in rerun) and again.splitlines()[2].endswith("| - |")
    with pytest.raises(FileNotFoundError, match="no finished run"):
        compare([*TINY, "--text", str(corpus), "--out", str(tmp_path / "empty"), "--eval-only"])


def _lm(causal_mode):
    config = ReformerConfig(vocab_size=16, d_model=16, n_heads=2, depth=1, d_ff=32, max_seq_len=48, bucket_size=4,
                            n_hashes=2, n_buckets=4, causal_mode=causal_mode, causal=True, seed=3)
    torch.manual_seed(0)
    return ReformerLM(config).eval()


def test_left_to_right_logits_see_only_the_prefix():
    """Row t comes from tokens[:, :t + 1] alone: equal to the teacher-forced row in bucket mode (no
    look-ahead), different somewhere in chunk mode (later tokens move chunk boundaries), and in
    both modes unchanged when the tokens after t change."""
    tokens = torch.randint(0, 16, (2, 48), generator=torch.Generator().manual_seed(1))
    positions = list(range(47))
    for mode in ("bucket", "chunk"):
        model = _lm(mode)
        with torch.no_grad():
            forced = model(tokens)
        prefix = left_to_right_logits(model, tokens, positions)
        changed = tokens.clone()
        changed[:, 30:] = (changed[:, 30:] + 1) % 16
        assert torch.equal(left_to_right_logits(model, changed, positions[:30])[:, :30], prefix[:, :30])
        assert torch.equal(prefix[:, 47], torch.zeros_like(prefix[:, 47]))  # rows not asked for stay zero
        if mode == "bucket":
            torch.testing.assert_close(prefix[:, :47], forced[:, :47], rtol=1e-5, atol=1e-5)
        else:
            assert not torch.allclose(prefix[:, :47], forced[:, :47], rtol=1e-4, atol=1e-4)


def test_compare_table_format():
    rows = [{"task": "text", "causal_mode": "bucket", "n_buckets": "4x4", "bucket_size": 32, "loss": 1.0,
             "bits_per_char": 1.4427, "acc": 0.5, "tf_acc": 0.5, "l2r_acc": 0.375, "seconds": 3.0},
            {"task": "duplication", "causal_mode": "chunk", "n_buckets": "16", "bucket_size": 8, "loss": 2.0,
             "bits_per_char": 2.9, "acc": 0.25, "seconds": None}]
    lines = format_compare_table(rows).splitlines()
    assert lines[2] == "| text | bucket | 4x4 | 32 | 1.000 | 1.443 | 50.0% | 50.0% / 37.5% | 3 |"
    assert lines[3] == "| duplication | chunk | 16 | 8 | 2.000 | - | 25.0% | - | - |"


def test_compare_rejects_bad_schemes():
    with pytest.raises(SystemExit):
        compare_parser().parse_args(["--dup-n-buckets", "4x4x4x4"])
    with pytest.raises(SystemExit):
        compare_parser().parse_args(["--causal-modes", "global"])
    with pytest.raises(ValueError, match=r"n_buckets \(--n-buckets\)"):
        compare(["--tasks", "duplication", "--dup-n-buckets", "6x3", "--out", "unused"])


def test_duplication_experiment_passes_the_lsh_scheme(tmp_path):
    out = tmp_path / "dup"
    duplication(["--seq-len", "16", "--vocab-size", "8", "--d-model", "16", "--bucket-size", "4",
                 "--train-hashes", "2", "--eval-hashes", "2", "--steps", "2", "--batch-size", "4",
                 "--eval-batches", "1", "--threads", "1", "--causal-mode", "chunk", "--n-buckets", "2x2",
                 "--out", str(out)])
    lsh = load_training_checkpoint(out / "LSH-2" / "checkpoint.pt")["meta"]["setup"]
    assert lsh["causal_mode"] == "chunk" and lsh["n_buckets"] == [2, 2]
    full = load_training_checkpoint(out / "full" / "checkpoint.pt")["meta"]["setup"]
    assert full["causal_mode"] == "chunk" and full["n_buckets"] is None and full["bucket_size"] == 16


def test_duplication_full_attention_is_exact(tmp_path):
    """The "full" column: LSH with one chunk in chunk mode equals causal full shared-QK attention,
    whatever the model's own causal_mode (bucket mode alone would split a chunk into buckets)."""
    import torch
    from reformer import ReformerConfig, ReformerLM
    from reformer.experiments import lsh_settings
    common = dict(vocab_size=8, d_model=16, n_heads=2, depth=1, d_ff=32, max_seq_len=16, bucket_size=4, n_hashes=2,
                  causal=True, reversible=False)
    torch.manual_seed(0)
    lsh = ReformerLM(ReformerConfig(attention="lsh", causal_mode="bucket", **common)).eval()
    tokens = torch.randint(0, 8, (2, 16))
    with torch.no_grad(), lsh_settings(lsh, bucket_size=16, n_hashes=1, causal_mode="chunk"):
        full_like = lsh(tokens)
    with torch.no_grad(), lsh_settings(lsh, bucket_size=16, n_hashes=1):
        bucketed = lsh(tokens)
    assert [m.causal_mode for m in lsh.modules() if hasattr(m, "causal_mode")] == ["bucket"]
    # the chunk-mode run attends to all earlier positions: flipping the first token changes the last output
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 8
    with torch.no_grad(), lsh_settings(lsh, bucket_size=16, n_hashes=1, causal_mode="chunk"):
        assert not torch.allclose(lsh(changed)[:, -1], full_like[:, -1])
    assert not torch.allclose(full_like, bucketed)
