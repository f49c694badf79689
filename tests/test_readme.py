"""Every ```python block of README.md and of docs/*.md runs as written.

Each block runs in a fresh interpreter (its own namespace, nothing imported for it) with the
checkout on ``PYTHONPATH`` and a temporary working directory, so a block that forgets an import
or uses a name it never defined fails here. Blocks are kept small enough to run in seconds;
large sizes belong in the prose around them.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of each ```python block of a markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def _documents() -> list[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


BLOCKS = [(path, line, code) for path in _documents() for line, code in python_blocks(path)]


def test_the_readme_has_python_blocks():
    assert sum(1 for path, _, _ in BLOCKS if path.name == "README.md") >= 4


def test_block_extraction():
    sample = "text\n```python\nx = 1\n```\n\n```bash\nls\n```\n```python\ny = 2\n```\n"
    path = ROOT / ".pytest_readme_sample.md"
    try:
        path.write_text(sample)
        assert python_blocks(path) == [(2, "x = 1\n"), (9, "y = 2\n")]
    finally:
        path.unlink()


@pytest.mark.parametrize("path, line, code", BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{line}" for p, line, _ in BLOCKS])
def test_block_runs(path, line, code, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (f"{path.relative_to(ROOT)}:{line} failed:\n{code}\n--- stderr ---\n"
                                  f"{proc.stderr[-4000:]}")
