"""The package installed as README.md tells users to install it, in a fresh virtual environment.

Steps (the README's "Install" section): ``pip install torch==2.13.0`` (the CPU build, first, so
that pip never resolves a CUDA build), then ``pip install .`` from the checkout (no extras), then
``pip install ".[triton]"``. After the plain install: ``import reformer, reformer.kernels``
prints nothing (no missing-dependency warning), every console script the distribution declares
answers ``--help``, and ``reformer-train`` runs 3 training steps. After the ``triton`` extra, the
Triton LSH kernel runs (under the interpreter: no GPU here) and matches the torch backend.

Everything runs outside the checkout (working directory and ``PYTHONPATH``), so the installed
copy is what gets imported. pip uses its ordinary configuration and cache. This takes a few
minutes (mostly installing torch); it is part of ``make test`` and therefore of CI.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
TORCH_SPEC = "torch==2.13.0"
DIST = "reformer-attention"

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    """The environment of a user's shell: no checkout on the path, no test-suite settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHONHOME")}
    env.pop("VIRTUAL_ENV", None)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _declared_scripts() -> list[str]:
    text = (ROOT / "pyproject.toml").read_text()
    if tomllib is not None:
        return sorted(tomllib.loads(text)["project"]["scripts"])
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return sorted(line.split("=")[0].strip() for line in section.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv with torch (CPU) and then the package without extras, as the README says."""
    where = tmp_path_factory.mktemp("install")
    _run([sys.executable, "-m", "venv", str(where / "venv")], cwd=where)
    pip = [str(where / "venv" / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    _run(pip + [TORCH_SPEC], cwd=where)
    _run(pip + [str(ROOT)], cwd=where)
    return where / "venv"


def test_install_declares_the_runtime_dependencies(venv):
    """pip's own check: the installed distribution's requirements are all satisfied."""
    _run([str(venv / "bin" / "python"), "-m", "pip", "check"], cwd=venv.parent)
    show = _run([str(venv / "bin" / "python"), "-m", "pip", "show", DIST], cwd=venv.parent).stdout
    for dep in ("torch", "einops", "tqdm", "safetensors", "numpy"):
        assert dep in show.split("Requires:")[1].split("\n")[0], show


def test_import_prints_nothing(venv):
    proc = _run([str(venv / "bin" / "python"), "-W", "default", "-c",
                 "import reformer, reformer.kernels; print(reformer.__file__)"], cwd=venv.parent)
    # the installed copy is imported (not the checkout), and nothing else is printed
    assert proc.stdout.strip().startswith(str(venv)), proc.stdout
    assert proc.stderr == "", proc.stderr


@pytest.mark.parametrize("script", _declared_scripts())
def test_console_script_help(venv, script):
    exe = venv / "bin" / script
    assert exe.exists(), f"console script {script} was not installed"
    proc = _run([str(exe), "--help"], cwd=venv.parent, timeout=120)
    assert proc.stdout.lstrip().startswith("usage:"), proc.stdout[:500]
    assert "Traceback" not in proc.stderr


def test_installed_reformer_train_runs_three_steps(venv):
    out = venv.parent / "run"
    _run([str(venv / "bin" / "reformer-train"), "--task", "duplication", "--seq-len", "32", "--vocab-size", "16",
          "--depth", "1", "--d-model", "32", "--n-heads", "2", "--d-ff", "64", "--bucket-size", "8",
          "--n-hashes", "2", "--steps", "3", "--batch-size", "2", "--eval-every", "0", "--log-every", "1",
          "--threads", "1", "--out", str(out)], cwd=venv.parent, timeout=300)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
    assert max(r.get("step", 0) for r in log) == 3, log


def test_installed_benchmark_cli_runs_a_case(venv):
    """reformer-bench's worker processes import the installed reformer_bench package."""
    out = venv.parent / "bench"
    proc = _run([str(venv / "bin" / "reformer-bench"), "attention", "--lengths", "64", "--heads", "1",
                 "--n-hashes", "1", "--bucket-size", "16", "--repeats", "1", "--providers", "lsh-torch",
                 "--device", "cpu", "--no-plots", "--out", str(out)], cwd=venv.parent, timeout=300)
    records = json.loads((out / "results.json").read_text())["records"]
    assert [r["status"] for r in records] == ["ok"], records
    assert "plan: estimated duration" in proc.stdout


def test_triton_extra_installs_and_its_kernel_runs(venv):
    """``pip install ".[triton]"`` brings a Triton that the kernels work with (interpreted on CPU)."""
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", f"{ROOT}[triton]"], cwd=venv.parent)
    code = ("import torch; from reformer.kernels import lsh_attention\n"
            "g = torch.Generator().manual_seed(0)\n"
            "qk, v = (torch.randn(1, 2, 37, 16, generator=g) for _ in range(2))\n"
            "kw = dict(bucket_size=8, n_hashes=2, seed=0, causal=True)\n"
            "a = lsh_attention(qk, v, backend='triton', **kw); b = lsh_attention(qk, v, backend='torch', **kw)\n"
            "torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4); print('triton ok')\n")
    proc = _run([python, "-c", code], cwd=venv.parent, env=dict(_env(), TRITON_INTERPRET="1"), timeout=300)
    assert "triton ok" in proc.stdout
