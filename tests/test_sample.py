"""The sampling command ``python -m reformer.sample`` on tiny saved models."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.sample import decode, encode, main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def byte_model(tmp_path):
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(vocab_size=256, d_model=32, n_heads=2, depth=1, d_ff=32, max_seq_len=64,
                                      bucket_size=8, n_hashes=2, seed=1))
    model.save_pretrained(tmp_path / "bytes")
    return model, tmp_path / "bytes"


def test_byte_model_prints_text_and_seeds_reproduce(byte_model, capsys):
    model, path = byte_model
    assert main(["--model", str(path), "--prompt", "héllo", "--max-new-tokens", "5", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    main(["--model", str(path), "--prompt", "héllo", "--max-new-tokens", "5", "--seed", "3"])
    assert capsys.readouterr().out == first and first.startswith("héllo")
    main(["--model", str(path), "--prompt", "héllo", "--max-new-tokens", "4", "--greedy"])
    prompt = torch.tensor([list("héllo".encode())])
    expected = model.generate(prompt, 4, do_sample=False)[0].tolist()
    assert capsys.readouterr().out == bytes(expected).decode("utf-8", errors="replace") + "\n"


def test_id_model_prints_ids(tmp_path, capsys):
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(vocab_size=50, d_model=16, n_heads=2, depth=1, d_ff=16, max_seq_len=32,
                                      attention="full"))
    model.save_pretrained(tmp_path)
    main(["--model", str(tmp_path), "--prompt", "3 4 5", "--max-new-tokens", "3", "--top-k", "1"])
    expected = model.generate(torch.tensor([[3, 4, 5]]), 3, top_k=1)[0].tolist()
    assert capsys.readouterr().out.split() == [str(i) for i in expected]
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), "--prompt", "three"])


def test_encode_decode():
    assert encode("aé", 256) == [97, 195, 169] and decode([97, 195], 256) == "a\ufffd"
    assert encode(" 1 2\n3 ", 10) == [1, 2, 3] and decode([1, 2], 10) == "1 2"


def test_module_runs_as_a_command(byte_model):
    _, path = byte_model
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-m", "reformer.sample", "--model", str(path), "--prompt", "ab",
                          "--max-new-tokens", "2", "--top-p", "0.9", "--temperature", "0.7", "--seed", "0"],
                         capture_output=True, text=True, cwd=root, timeout=120,
                         env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("ab")
