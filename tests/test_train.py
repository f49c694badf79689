"""Tasks, the training loop and its CLI: learning the duplication task, exact resume, crash recovery."""
import json
import subprocess
import sys

import pytest
import torch

from reformer.checkpoint import load_checkpoint
from reformer.data import DuplicationTask, Shard, TextTask, stdlib_sources
from reformer.train import run
from reformer.train_config import TrainConfig
from reformer.train_loop import masked_lm_loss

TINY = ["--task", "duplication", "--seq-len", "32", "--vocab-size", "8", "--d-model", "32", "--n-heads", "2",
        "--d-ff", "64", "--depth", "2", "--batch-size", "8", "--threads", "1", "--log-every", "1",
        "--warmup", "2", "--lr", "3e-3"]
LSH = ["--attention", "lsh", "--bucket-size", "8", "--n-hashes", "2"]


def _train(out, *extra):
    return run(TrainConfig.from_args([*TINY, "--out", str(out), *extra]))


def _losses(history):
    """Every logged number except the wall-clock throughput."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history]


def test_duplication_batches():
    task = DuplicationTask(seq_len=12, vocab_size=5, seed=3)
    tokens, mask = task.batch(7, 6)
    assert tokens.shape == (6, 12) and mask.shape == (6, 11)
    assert (tokens[:, 0] == 0).all() and (tokens[:, 6] == 0).all()
    assert torch.equal(tokens[:, 1:6], tokens[:, 7:]) and ((tokens[:, 1:6] >= 1) & (tokens[:, 1:6] <= 4)).all()
    assert mask[:, 6:].all() and not mask[:, :6].any()  # exactly the predictions of tokens 7..11
    assert torch.equal(task.batch(7, 6)[0], tokens) and not torch.equal(task.batch(8, 6)[0], tokens)
    assert not torch.equal(task.batch(7, 6, split="val")[0], tokens)
    halves = [task.batch(7, 6, shard=Shard(r, 2))[0] for r in range(2)]
    assert torch.equal(torch.cat(halves), tokens)
    with pytest.raises(ValueError, match="divisible"):
        task.batch(0, 5, shard=Shard(0, 2))
    with pytest.raises(ValueError, match="even"):
        DuplicationTask(seq_len=11)


def test_text_batches(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "b.txt").write_text("hello world\n" * 50)
    task = TextTask.from_path(tmp_path, seq_len=16, seed=1, val_fraction=0.25)
    tokens, mask = task.batch(0, 4)
    assert tokens.shape == (4, 16) and tokens.max() < 256 and mask.all()
    corpus = bytes(task.splits["train"].tolist())
    for row in tokens.tolist():
        assert bytes(row) in corpus
    sources = stdlib_sources()
    assert any(p.name == "argparse.py" for p in sources)
    assert not any("site-packages" in p.parts for p in sources)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TextTask.from_path(tmp_path / "b.txt", seq_len=10_000)


def test_masked_loss_counts_only_scored_positions():
    tokens = torch.tensor([[1, 2, 3, 4]])
    logits = torch.full((1, 4, 5), -10.0)
    logits[0, 0, 2] = logits[0, 1, 0] = logits[0, 2, 4] = 10.0  # right, wrong, right
    mask = torch.tensor([[False, True, True]])
    loss, correct, count = masked_lm_loss(logits, tokens, mask)
    assert count.item() == 2 and correct.item() == 1
    expected = torch.nn.functional.cross_entropy(logits[0, 1:3], tokens[0, 2:4])
    assert torch.allclose(loss, expected)


def test_duplication_learns_above_chance(tmp_path):
    trainer = _train(tmp_path, *LSH, "--vocab-size", "16", "--d-model", "64", "--d-ff", "128", "--axial-shape", "4,8",
                     "--batch-size", "16", "--steps", "200", "--eval-every", "200", "--log-every", "50")
    final = trainer.history[-1]
    assert final["step"] == 200
    chance = 1 / 15
    assert final["eval_acc"] > 5 * chance, final
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log == json.loads(json.dumps(trainer.history))
    assert all(r["tokens_per_s"] > 0 for r in log if "loss" in r)


RESUME = [*LSH, "--reversible", "--dropout", "0.1", "--grad-accum", "2", "--steps", "8", "--eval-every", "3",
          "--save-every", "100"]


def test_resume_is_exact(tmp_path):
    full = _train(tmp_path / "full", *RESUME)
    first = _train(tmp_path / "split", *RESUME, "--stop-at", "4")
    assert first.step == 4 and load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 4
    second = _train(tmp_path / "split", *RESUME, "--resume")
    assert _losses(first.history + second.history) == _losses(full.history)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_crash_during_checkpoint_resumes_from_previous_one(tmp_path, monkeypatch):
    args = [*RESUME, "--save-every", "2"]
    full = _train(tmp_path / "full", *args)
    import reformer.checkpoint as checkpoint

    real_save, calls = checkpoint.save_checkpoint, []

    def crash_on_second(state, path):
        calls.append(state["step"])
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")
        real_save(state, path)

    monkeypatch.setattr(checkpoint, "save_checkpoint", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "crash", *args)
    monkeypatch.setattr(checkpoint, "save_checkpoint", real_save)
    assert load_checkpoint(tmp_path / "crash" / "checkpoint.pt")["step"] == 2
    assert [p.name for p in (tmp_path / "crash").iterdir() if p.name.startswith(".")] == []
    resumed = _train(tmp_path / "crash", *args, "--resume")
    assert resumed.history[0]["step"] == 3
    log = [json.loads(line) for line in (tmp_path / "crash" / "log.jsonl").read_text().splitlines()]
    assert _losses(log) == _losses(json.loads(json.dumps(full.history)))


def test_resume_refuses_a_different_setup_and_run_restores_the_callers_rng(tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _train(tmp_path, "--attention", "full", "--steps", "1", "--eval-every", "0")
    assert torch.equal(torch.get_rng_state(), before)
    with pytest.raises(ValueError, match=r"other model/data options: --depth \(saved 2, given 3\)"):
        _train(tmp_path, "--attention", "full", "--steps", "2", "--eval-every", "0", "--depth", "3", "--resume")


def test_text_task_trains_and_cli_rejects_bad_options(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    trainer = _train(tmp_path / "out", "--task", "text", "--text", str(corpus), "--attention", "full",
                     "--axial-shape", "4,8", "--ff-chunks", "2", "--steps", "3", "--eval-every", "3")
    assert trainer.history[-1]["step"] == 3 and trainer.history[-1]["eval_loss"] < 5.6  # below uniform ln(256)
    with pytest.raises(ValueError, match="divisible"):
        _train(tmp_path / "bad", "--batch-size", "6", "--grad-accum", "4", "--steps", "1")
    proc = subprocess.run([sys.executable, "-m", "reformer.train", "--steps", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "steps (--steps) must be >= 1, got 0" in proc.stderr


def test_duplication_table_smoke(tmp_path, capsys):
    from reformer.experiments import duplication

    table = duplication(["--seq-len", "16", "--vocab-size", "8", "--d-model", "16", "--n-heads", "2",
                         "--bucket-size", "4", "--train-hashes", "1", "--eval-hashes", "1,2", "--steps", "2",
                         "--batch-size", "4", "--eval-batches", "1", "--threads", "1", "--out", str(tmp_path)])
    lines = table.splitlines()
    assert lines[0] == "| train \\ eval | full | LSH-1 | LSH-2 |" and len(lines) == 4
    assert lines[2].startswith("| full | ") and lines[3].startswith("| LSH-1 | ")
    assert "machine:" in capsys.readouterr().out
