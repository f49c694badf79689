"""PNG plots (matplotlib, Agg backend): one line per series, only cases that ran.

- ``attention.png``: forward+backward time and peak extra memory versus N, log-log.
- ``model.png``: training-step peak memory and time versus depth and versus N.
- ``quality.png``: relative error and top-k recall versus n_hashes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _lines(ax, records: list[dict], x: Callable[[dict], float], key: str) -> None:
    """One line per series: ``key`` versus ``x(record)`` over the records that ran."""
    for series in dict.fromkeys(r["series"] for r in records):
        points = sorted((x(r), r[key]) for r in records if r["series"] == series and r["status"] == "ok"
                        and r.get(key) is not None)
        if points:
            ax.plot(*zip(*points), marker="o", label=series)


def _save(fig, path: Path) -> None:
    for ax in fig.axes:
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_plot(records: list[dict], path: Path, title: str) -> None:
    records = [r for r in records if r["benchmark"] == "attention"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    seq_len = lambda r: r["params"]["seq_len"]  # noqa: E731
    for ax, key, label in zip(axes, ("time_fwdbwd_ms", "peak_mem_mib"),
                              ("forward+backward time (ms)", "peak extra memory (MiB)")):
        _lines(ax, records, seq_len, key)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=label)
        ax.set_xscale("log", base=2)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def model_plot(records: list[dict], path: Path, title: str) -> None:
    records = [r for r in records if r["benchmark"] == "model"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for col, sweep, xname in ((0, "depth", "depth"), (1, "length", "seq_len")):
        sub = [r for r in records if r["params"].get("sweep") == sweep]
        for row, key, label in ((0, "peak_mem_mib", "peak extra memory (MiB)"),
                                (1, "time_fwdbwd_ms", "train step (ms)")):
            ax = axes[row][col]
            _lines(ax, sub, lambda r: r["params"][xname], key)
            ax.set(xlabel="depth" if sweep == "depth" else "sequence length N", ylabel=label,
                   title=f"{sweep} sweep")
            if sweep == "length":
                ax.set(xscale="log", yscale="log")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def quality_plot(records: list[dict], path: Path, title: str) -> None:
    records = [r for r in records if r["benchmark"] == "quality"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, label in zip(axes, ("rel_err", "recall_at_k"), ("relative error", "top-k recall")):
        _lines(ax, records, lambda r: r["params"]["n_hashes"], key)
        ax.set(xscale="log", xlabel="n_hashes", ylabel=label)
        ax.set_xscale("log", base=2)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


PLOTS = {"attention": attention_plot, "model": model_plot, "quality": quality_plot}


def write_plots(records: list[dict], out: Path, title: str) -> list[str]:
    """Writes one PNG per benchmark present in ``records``; returns the file names."""
    names = []
    for benchmark, plot in PLOTS.items():
        if any(r["benchmark"] == benchmark for r in records):
            plot(records, out / f"{benchmark}.png", title)
            names.append(f"{benchmark}.png")
    return names
