# Two entry points (see README.md): `make bench-quick` (the main job) and `make test`.
# Both create .venv on first use. torch is pinned to the CPU build that this machine
# provides; installing it first stops pip from resolving a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench-quick bench bench-long clean

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

# The plots the README shows are copied to docs/ (bench_out/ is not committed).
bench-quick: setup
	$(PY) -m benchmarks all --quick --out bench_out
	cp bench_out/attention.png docs/bench_quick_attention.png

bench: setup
	$(PY) -m benchmarks all --out bench_out/full
	for p in attention model quality; do cp bench_out/full/$$p.png docs/bench_$$p.png; done

# LSH attention at 32K, 128K and 1M tokens, and a ReformerLM training step at 1M tokens
bench-long: setup
	$(PY) -m benchmarks attention --long --out bench_out/long_attention
	$(PY) -m benchmarks model --long --out bench_out/long_model

clean:
	rm -rf $(VENV) bench_out .pytest_cache
