"""The reformer benchmark suite: speed and memory of LSH attention, full attention, SDPA and
peer implementations; training-step memory of ReformerLM versus a plain Transformer; and how
close LSH attention is to full attention.

Run ``python -m benchmarks all --quick --out bench_out`` (see ``cli.py`` for the options).
Modules: ``harness`` (timing protocol), ``memory`` (peak-memory method), ``worker`` (one
fresh process per case), ``runner`` (skip rules, progress), ``attention``/``model``/``quality``
(providers and sweeps), ``report``/``summary``/``plots`` (tables, JSON, markdown, PNG).
"""
