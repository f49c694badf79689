"""torchrun data parallelism (gloo, 2 CPU processes) with reversible LSH layers: the ranks stay
identical and match a single-process run on the same global batch."""
import math
import os
import socket
import subprocess
import sys
import textwrap

import torch

from reformer.checkpoint import load_checkpoint
from reformer.train import run
from reformer.train_config import TrainConfig

ARGS = ["--task", "duplication", "--seq-len", "32", "--vocab-size", "8", "--d-model", "32", "--n-heads", "2",
        "--d-ff", "64", "--depth", "2", "--attention", "lsh", "--bucket-size", "8", "--n-hashes", "2",
        "--reversible", "--ff-chunks", "2", "--batch-size", "8", "--steps", "4",
        "--warmup", "1", "--lr", "3e-3", "--log-every", "1", "--eval-every", "2", "--save-every", "2",
        "--threads", "1", "--no-export"]

DRIVER = textwrap.dedent("""
    import os, sys, torch
    from reformer.train import run
    from reformer.train_config import TrainConfig
    config = TrainConfig.from_args(sys.argv[1:])
    trainer = run(config)
    torch.save(trainer.model.state_dict(), config.out / f"rank{os.environ['RANK']}.pt")
    torch.save(trainer.history, config.out / f"history{os.environ['RANK']}.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path, out, *extra):
    """Run the training driver on 2 gloo ranks; returns each rank's final parameters and history."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(driver), *ARGS, *extra, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    params = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    histories = [[{k: v for k, v in rec.items() if k != "tokens_per_s"} for rec in
                  torch.load(out / f"history{r}.pt", weights_only=True)] for r in range(2)]
    for name in params[0]:
        assert torch.equal(params[0][name], params[1][name]), f"ranks differ at {name}"
    assert histories[0] == histories[1]  # losses are summed over ranks before logging
    written = sorted(p.name for p in out.iterdir())  # rank 0 alone wrote the checkpoint and the log
    assert written == ["checkpoint.pt", "history0.pt", "history1.pt", "log.jsonl", "rank0.pt", "rank1.pt"]
    return params[0], histories[0]


def test_torchrun_two_ranks_match_single_process(tmp_path):
    """Each rank trains on its half of every global batch; DDP averages the gradients, so the
    result equals one process on the whole batch (LSH rotations agree: same RNG stream)."""
    params, history = _torchrun(tmp_path, tmp_path / "ddp")
    single = run(TrainConfig.from_args([*ARGS, "--out", str(tmp_path / "single")]))
    assert single.step == 4
    saved = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["model"]
    for name, p in single.model.state_dict().items():
        assert torch.equal(saved[name], params[name]), name
        assert torch.allclose(params[name], p, rtol=1e-4, atol=1e-5), f"DDP and single process differ at {name}"
    assert [r["step"] for r in history] == [r["step"] for r in single.history]
    for ddp_rec, one_rec in zip(history, single.history):
        for key in ("loss", "acc", "eval_loss", "eval_acc"):
            if key in one_rec:
                assert abs(ddp_rec[key] - one_rec[key]) < 1e-4, (key, ddp_rec, one_rec)


def test_torchrun_gradient_accumulation_with_dropout_keeps_ranks_identical(tmp_path):
    """no_sync on all but the last micro-batch: gradients are still averaged once per step."""
    params, history = _torchrun(tmp_path, tmp_path / "accum", "--grad-accum", "2", "--dropout", "0.1")
    initial = run(TrainConfig.from_args([*ARGS, "--steps", "1", "--lr", "0", "--out", str(tmp_path / "init")]))
    moved = [name for name, p in initial.model.state_dict().items() if not torch.equal(p, params[name])]
    assert len(moved) == len(params)  # every parameter got (synchronised) updates
    assert all(math.isfinite(r.get("loss", 0.0)) for r in history)
