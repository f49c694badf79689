"""Runs are never lost or silently changed: refusal to overwrite, resume rules, log repair,
damaged checkpoints, the run folder checked up front, option validation and --help."""
import json
import subprocess
import sys

import pytest
import torch

from reformer.kernels import default_n_buckets
from reformer.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint, load_training_checkpoint
from reformer.train import RunExistsError, TrainSetupError, lr_factor, run
from reformer.train_config import TrainConfig, build_parser

FAST = ["--task", "duplication", "--seq-len", "16", "--vocab-size", "8", "--d-model", "16", "--n-heads", "2",
        "--d-ff", "32", "--depth", "1", "--attention", "full", "--batch-size", "4", "--threads", "1",
        "--log-every", "1", "--eval-every", "0", "--warmup", "1", "--lr", "3e-3", "--steps", "4", "--no-export"]


def _config(out, *extra):
    return TrainConfig.from_args([*FAST, "--out", str(out), *extra])


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "reformer.train", *map(str, args)], capture_output=True,
                          text=True, timeout=180)


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_new_run_refuses_a_folder_that_holds_a_run(tmp_path):
    run(_config(tmp_path, "--stop-at", "2"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RunExistsError, match=r"already holds a run \(checkpoint.pt, log.jsonl\).*--resume.*--overwrite"):
        run(_config(tmp_path))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing touched
    proc = _cli(*FAST, "--out", tmp_path)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    fresh = run(_config(tmp_path, "--overwrite"))  # explicit: start over
    assert [r["step"] for r in _log(tmp_path)] == [1, 2, 3, 4] == [r["step"] for r in fresh.history]


def test_resume_needs_a_checkpoint_and_excludes_overwrite(tmp_path):
    with pytest.raises(TrainSetupError, match="no checkpoint at"):
        run(_config(tmp_path, "--resume"))
    with pytest.raises(ValueError, match="exclude each other"):
        TrainConfig(resume=True, overwrite=True)


def test_partial_last_log_line_is_dropped_on_resume(tmp_path):
    full = run(_config(tmp_path / "full"))
    run(_config(tmp_path / "cut", "--stop-at", "2"))
    log = tmp_path / "cut" / "log.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "loss": 1.2')  # killed in the middle of a write
    with pytest.warns(RuntimeWarning, match=r"dropped 1 incomplete line\(s\) \(line 3"):
        run(_config(tmp_path / "cut", "--resume"))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]  # noqa: E731
    assert strip(_log(tmp_path / "cut")) == strip(json.loads(json.dumps(full.history)))


def test_resume_applies_a_changed_lr_and_logs_it(tmp_path, capsys):
    run(_config(tmp_path, "--stop-at", "2"))
    new = _config(tmp_path, "--resume", "--lr", "1e-3", "--steps", "6", "--stop-at", "3")
    trainer = run(new)
    assert trainer.history[0] == {"step": 2, "resumed_with": {"lr": [3e-3, 1e-3], "steps": [4, 6]}}
    assert "lr 0.003 -> 0.001" in capsys.readouterr().err
    factor = lr_factor(new)
    expected = 1e-3 * factor(3)  # the new peak lr and the new schedule, at the step reached
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [expected, expected]
    assert trainer.history[1]["step"] == 3 and trainer.history[1]["lr"] == expected
    assert _log(tmp_path)[2] == trainer.history[0]
    saved = load_training_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["meta"]["settings"]["lr"] == 1e-3 and saved["optimizer"]["param_groups"][0]["initial_lr"] == 1e-3


def test_resume_refuses_model_changes_naming_the_fields(tmp_path):
    run(_config(tmp_path, "--stop-at", "2"))
    with pytest.raises(CheckpointError) as info:
        run(_config(tmp_path, "--resume", "--depth", "2", "--d-model", "32"))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "checkpoint.pt") in message
    assert "--depth (saved 1, given 2)" in message and "--d-model (saved 16, given 32)" in message
    assert "--lr" not in message
    proc = _cli(*FAST, "--out", tmp_path, "--resume", "--depth", "2")
    assert proc.returncode == 2 and "--depth (saved 1, given 2)" in proc.stderr and "Traceback" not in proc.stderr


def test_resume_refuses_steps_below_the_saved_step(tmp_path):
    run(_config(tmp_path, "--stop-at", "3"))
    with pytest.raises(TrainSetupError, match=r"--steps 2 is below the checkpoint's step 3"):
        run(_config(tmp_path, "--resume", "--steps", "2", "--warmup", "0"))
    with pytest.raises(TrainSetupError, match=r"--stop-at 3 is not after the checkpoint's step 3"):
        run(_config(tmp_path, "--resume", "--stop-at", "3"))
    proc = _cli(*FAST, "--out", tmp_path, "--resume", "--steps", "2", "--warmup", "0")
    assert proc.returncode == 2 and "below the checkpoint's step 3" in proc.stderr


def _write(path, data):
    path.write_bytes(data)
    return path


def damaged_checkpoints(tmp_path):
    """Damaged versions of a real checkpoint, and what the error must say about each."""
    run(_config(tmp_path / "run", "--steps", "1"))
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    cases = {
        "truncated": (good[: len(good) // 2], "truncated or corrupted"),
        "random bytes": (bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()),
                         "not a torch.save file"),
        "empty": (b"", "is empty"),
    }
    for name, (data, why) in cases.items():
        yield name, _write(tmp_path / name.replace(" ", "_"), data), why
    structures = {
        "no meta": ({k: v for k, v in state.items() if k != "meta"}, "incomplete: missing meta"),
        "meta not a dict": ({**state, "meta": [1]}, "meta is a list, expected dict"),
        "no format": ({k: v for k, v in state.items() if k != "format"}, "no 'format' entry"),
        "old format": ({**state, "format": 1}, f"format version 1; this version of reformer reads version {FORMAT_VERSION}"),
        "a list": ([1, 2], "holds a list, expected a dict"),
    }
    for name, (obj, why) in structures.items():
        path = tmp_path / name.replace(" ", "_")
        torch.save(obj, path)
        yield name, path, why


def test_damaged_checkpoints_raise_one_clear_error(tmp_path):
    cases = list(damaged_checkpoints(tmp_path))
    assert len(cases) == 8
    for name, path, why in cases:
        with pytest.raises(CheckpointError) as info:
            load_training_checkpoint(path)
        assert isinstance(info.value, ValueError) and info.value.path == path, name
        assert str(path) in str(info.value) and why in str(info.value), (name, str(info.value))
    name, path, why = cases[0]  # through the CLI: one line, exit status 2, the checkpoint left alone
    (tmp_path / "run" / "checkpoint.pt").write_bytes(path.read_bytes())
    proc = _cli(*FAST, "--out", tmp_path / "run", "--resume")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "checkpoint.pt: is truncated or corrupted" in proc.stderr
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == path.read_bytes()


def test_unusable_run_folder_is_reported_before_training(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainSetupError, match=r"run folder --out .*file/run is not usable"):
        run(_config(tmp_path / "file" / "run"))
    import reformer.train as train

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    built = []
    monkeypatch.setattr(train.tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(train, "build_trainer", lambda *a: built.append(a))
    with pytest.raises(TrainSetupError, match=r"--out .*ro is not usable: Permission denied"):
        run(_config(tmp_path / "ro"))
    assert built == []  # refused before the model was built


@pytest.mark.parametrize("args, message", [
    (["--stop-at", "-5"], "stop_at (--stop-at) must be >= 1, got -5"),
    (["--weight-decay", "-1"], "weight_decay (--weight-decay) must be >= 0.0 (and finite), got -1.0"),
    (["--threads", "-1"], "threads (--threads) must be >= 1, got -1"),
    (["--lr", "nan"], "lr (--lr) must be >= 0.0 (and finite), got nan"),
    (["--resume", "--overwrite"], "not allowed with argument"),
])
def test_cli_rejects_bad_options_up_front(args, message, tmp_path):
    proc = _cli(*FAST, "--out", tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "usage:" in proc.stderr and not any(tmp_path.iterdir())


def test_config_validation_types_and_values():
    with pytest.raises(TypeError, match=r"steps \(--steps\) must be an int, got 1.5"):
        TrainConfig(steps=1.5)
    with pytest.raises(TypeError, match=r"depth \(--depth\) must be an int, got True"):
        TrainConfig(depth=True)
    with pytest.raises(ValueError, match=r"task \(--task\) must be one of duplication, text"):
        TrainConfig(task="copy")
    with pytest.raises(ValueError, match=r"dropout \(--dropout\) must be in \[0.0, 1.0\)"):
        TrainConfig(dropout=1.0)
    with pytest.raises(TypeError, match=r"lr \(--lr\) must be a number"):
        TrainConfig(lr="0.1")
    with pytest.raises(TypeError, match="config must be a TrainConfig"):
        run(build_parser().parse_args([]))
    c = TrainConfig(axial_shape=[4, 8], out="runs/x", resume="runs/x/old.pt")
    assert c.axial_shape == (4, 8) and c.checkpoint_path.name == "old.pt" and c.out_dir.name == "x"


def test_help_shows_every_default_once_and_warmup_warns(tmp_path):
    text = " ".join(build_parser().format_help().split()).split(" task: ", 1)[1]  # the options, not usage
    for option, default in (("--steps STEPS total optimizer steps", "1000"), ("--lr LR peak learning rate", "0.001"),
                            ("--depth DEPTH number of layers", "2"), ("--seq-len SEQ_LEN", "1024")):
        assert option in text
        assert text.split(option, 1)[1].split("--", 1)[0].count(f"(default: {default})") == 1, option
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: on)") == 2 and "(default: runs/<task>)" in text
    for chunk in text.split(" --")[1:]:
        assert chunk.count("default") <= 1, chunk
    with pytest.warns(UserWarning, match=r"warmup \(--warmup\) = 50 exceeds steps \(--steps\) = 10"):
        TrainConfig(warmup=50, steps=10)
    proc = _cli(*FAST, "--out", tmp_path, "--warmup", "9", "--steps", "1")
    assert proc.returncode == 0 and "warning: warmup (--warmup) = 9 exceeds steps (--steps) = 1" in proc.stderr


def test_training_checkpoint_layout(tmp_path):
    trainer = run(_config(tmp_path, "--steps", "1"))
    state = load_training_checkpoint(tmp_path / "checkpoint.pt")
    assert state["format"] == FORMAT_VERSION and state["step"] == trainer.step == 1
    assert set(state) == {"format", "step", "meta", "model", "optimizer", "scheduler", "rng"}
    assert set(state["meta"]) == {"setup", "settings"} and state["meta"]["setup"]["depth"] == 1
    assert set(state["meta"]["settings"]) >= {"lr", "steps", "warmup", "eval_every"}


def test_finished_run_exports_the_model(tmp_path):
    from reformer import ReformerLM

    config = TrainConfig.from_args([*FAST[:-1], "--out", str(tmp_path), "--stop-at", "2"])  # FAST minus --no-export
    assert config.export
    run(config)
    assert not (tmp_path / "model").exists()  # stopped early: nothing exported yet
    trainer = run(config.replace(resume=True, stop_at=None))
    assert trainer.step == 4 and sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json",
                                                                                            "model.safetensors"]
    loaded = ReformerLM.from_pretrained(tmp_path / "model")
    assert loaded.config == trainer.model.config
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(RunExistsError, match=r"\(checkpoint.pt, log.jsonl, model\)"):
        run(config)


@pytest.mark.parametrize("text, value", [("16", 16), ("4x4", (4, 4)), ("2X8", (2, 8)), ("2x4x6", (2, 4, 6)), ("auto", None)])
def test_n_buckets_option_parses_plain_factorised_and_auto(text, value):
    config = _config("runs/x", "--n-buckets", text, "--attention", "lsh", "--bucket-size", "4")
    assert config.n_buckets == value
    model_config = config.model_config(8)
    assert model_config.n_buckets == (value if value is not None else default_n_buckets(16, 4))


@pytest.mark.parametrize("args, message", [
    (["--n-buckets", "4x4x4x4"], "argument --n-buckets: must be an even int like 16, N1xN2 like 4x4"),
    (["--n-buckets", "abc"], "argument --n-buckets: must be an even int like 16"),
    (["--n-buckets", "6x3"], "n_buckets (--n-buckets): n_buckets entries must be even ints >= 2"),
    (["--n-buckets", "0"], "n_buckets (--n-buckets): n_buckets entries must be even ints >= 2"),
    (["--causal-mode", "global"], "argument --causal-mode: invalid choice: 'global'"),
])
def test_cli_rejects_bad_lsh_scheme_options(args, message, tmp_path):
    proc = _cli(*FAST, "--out", tmp_path, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not any(tmp_path.iterdir())


def test_lsh_scheme_validation_in_python():
    with pytest.raises(ValueError, match=r"causal_mode \(--causal-mode\) must be one of bucket, chunk"):
        TrainConfig(causal_mode="global")
    with pytest.raises(TypeError, match=r"n_buckets \(--n-buckets\).*even int"):
        TrainConfig(n_buckets=8.0)
    with pytest.raises(ValueError, match=r"n_buckets \(--n-buckets\).*even ints >= 2"):
        TrainConfig(n_buckets=(4, 3))
    with pytest.raises(ValueError, match=r"n_buckets \(--n-buckets\).*tuple of 2 or 3"):
        TrainConfig(n_buckets=(2, 2, 2, 2))
    assert TrainConfig(n_buckets=[4, 2]).n_buckets == (4, 2)
    assert TrainConfig(n_buckets=[4, 2, 6]).n_buckets == (4, 2, 6)
    assert TrainConfig().causal_mode == "chunk" and TrainConfig().n_buckets is None


def test_trained_model_has_the_requested_lsh_scheme_and_resume_refuses_a_change(tmp_path):
    lsh = ["--attention", "lsh", "--bucket-size", "4", "--n-hashes", "2"]
    trainer = run(_config(tmp_path, *lsh, "--causal-mode", "bucket", "--n-buckets", "2x2", "--stop-at", "2"))
    assert trainer.model.config.causal_mode == "bucket" and trainer.model.config.n_buckets == (2, 2)
    setup = load_training_checkpoint(tmp_path / "checkpoint.pt")["meta"]["setup"]
    assert setup["causal_mode"] == "bucket" and setup["n_buckets"] == [2, 2]
    with pytest.raises(CheckpointError, match=r"--causal-mode \(saved 'bucket', given 'chunk'\)"):
        run(_config(tmp_path, *lsh, "--resume", "--n-buckets", "2x2"))
    with pytest.raises(CheckpointError, match=r"--n-buckets \(saved \[2, 2\], given 4\)"):
        run(_config(tmp_path, *lsh, "--resume", "--causal-mode", "bucket", "--n-buckets", "4"))
    resumed = run(_config(tmp_path, *lsh, "--resume", "--causal-mode", "bucket", "--n-buckets", "2x2"))
    assert resumed.step == 4
