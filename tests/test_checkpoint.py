"""Atomic checkpoints: round trip under weights_only, RNG capture/restore, crashes and kills mid-write."""
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from reformer.checkpoint import CheckpointError, capture_process_rng, load_checkpoint, restore_process_rng, save_checkpoint


def _draws():
    return torch.rand(4), random.random(), np.random.rand(2)


def test_round_trip_with_rng_state_under_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    state = {"step": 7, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": capture_process_rng(),
             "meta": {"axial_shape": (4, 8), "name": "x", "none": None}}
    save_checkpoint(state, tmp_path / "ck.pt")
    loaded = load_checkpoint(tmp_path / "ck.pt")
    assert loaded["step"] == 7 and loaded["meta"] == state["meta"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    expected = _draws()
    restore_process_rng(loaded["rng"])
    got = _draws()
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1] and np.array_equal(got[2], expected[2])


def test_load_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": pickle.loads(pickle.dumps(ValueError("not a tensor")))}, path)
    with pytest.raises(CheckpointError, match="holds objects other than tensors") as info:
        load_checkpoint(path)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_exception_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]


KILLED_WRITER = textwrap.dedent("""
    import sys, time, io, torch
    from reformer.checkpoint import save_checkpoint
    path = sys.argv[1]
    save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save
    def slow_save(obj, f):
        buf = io.BytesIO(); real_save(obj, buf); data = buf.getvalue()
        f.write(data[: len(data) // 2]); f.flush()
        print("half written", flush=True)
        time.sleep(60)
        f.write(data[len(data) // 2:])
    torch.save = slow_save
    save_checkpoint({"step": 2, "w": torch.zeros(1_000_000)}, path)
""")


def test_sigkill_mid_write_never_corrupts(tmp_path):
    path = tmp_path / "ck.pt"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half written"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = [p for p in tmp_path.iterdir() if p != path]
    assert len(partial) == 1 and partial[0].name.startswith(".ck.pt.") and partial[0].stat().st_size > 0
    assert load_checkpoint(path)["step"] == 1
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(1000))
    save_checkpoint({"step": 3}, path)  # the next save sweeps the stale partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"] and load_checkpoint(path)["step"] == 3
