# Two entry points (see README.md): `make bench-quick` (the main job) and `make test`.
# Both create .venv on first use. torch is pinned to the CPU build that this machine
# provides; installing it first stops pip from resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench-quick bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip setuptools wheel
	$(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,triton]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

demo: setup
	$(PY) -m reformer.demo

bench-quick: setup
	$(PY) -m benchmarks all --quick --out bench_out

bench: setup
	$(PY) -m benchmarks all --out bench_out

clean:
	rm -rf $(VENV) bench_out .pytest_cache
