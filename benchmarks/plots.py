"""PNG plots (matplotlib, Agg backend): one line per series, only cases that ran.

- ``attention.png``: forward+backward time and peak extra memory versus N, log-log.
- ``model.png``: training-step peak memory and time versus depth and versus N.
- ``quality.png``: relative error and top-k recall versus n_hashes, and versus the bucket count
  for plain and factorised hashing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

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


def _shapes(records: list[dict], keys: tuple[str, ...]) -> str:
    """The parameters shared by every record, e.g. ``B=1 H=8 D=64``."""
    shared = {k: records[0]["params"].get(k) for k in keys}
    shared = {k: v for k, v in shared.items() if v is not None and all(r["params"].get(k) == v for r in records)}
    return " ".join(f"{k}={v}" for k, v in shared.items())


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
    shapes = _shapes(records, ("batch", "heads", "head_dim", "bucket_size", "dtype", "causal"))
    fig.suptitle(f"attention forward+backward | {shapes}\n{title}", fontsize=9)
    _save(fig, path)


def _ffn_bars(ax, records: list[dict], key: str, label: str) -> None:
    ran = [r for r in records if r["status"] == "ok"]
    ax.bar([f"ff_chunks={r['params']['ff_chunks']}" for r in ran], [r[key] for r in ran])
    p = records[0]["params"]
    ax.set(ylabel=label, title=f"feed-forward step, N={p['seq_len']} d_model={p['d_model']} d_ff={p['d_ff']}")


def model_plot(records: list[dict], path: Path, title: str) -> Optional[bool]:
    """Columns: the depth sweep, the length sweep, the feed-forward step (those present); False
    (nothing written) when none is."""
    records = [r for r in records if r["benchmark"] == "model"]
    sweeps = [s for s in ("depth", "length", "ffn") if any(r["params"]["sweep"] == s for r in records)]
    if not sweeps:  # e.g. only the single 1M-token step of ``model --long``: nothing to plot against
        return False
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5.5 * len(sweeps), 8), squeeze=False)
    rows = ((0, "peak_mem_mib", "peak extra memory (MiB)"), (1, "time_fwdbwd_ms", "train step (ms)"))
    for col, sweep in enumerate(sweeps):
        sub = [r for r in records if r["params"]["sweep"] == sweep]
        for row, key, label in rows:
            ax = axes[row][col]
            if sweep == "ffn":
                _ffn_bars(ax, sub, key, label)
                continue
            xname = "depth" if sweep == "depth" else "seq_len"
            _lines(ax, sub, lambda r: r["params"][xname], key)
            ax.set(xlabel="depth" if sweep == "depth" else "sequence length N", ylabel=label, title=f"{sweep} sweep")
            if sweep == "length":
                ax.set(xscale="log")
            ticks = sorted({r["params"][xname] for r in sub})
            ax.set(yscale="log")
            ax.set_xticks(ticks, [str(t) for t in ticks])
    lm = [r for r in records if r["params"]["sweep"] != "ffn"] or records
    shapes = _shapes(lm, ("vocab_size", "d_model", "n_heads", "d_ff", "bucket_size", "n_hashes", "dtype"))
    fig.suptitle(f"training step, batch 1 | {shapes}\n{title}", fontsize=9)
    _save(fig, path)


def quality_plot(records: list[dict], path: Path, title: str) -> None:
    """Top row: relative error and top-k recall versus n_hashes (the ``n_hashes`` sweep); bottom
    row, when the run has the ``hashing`` sweep: the same versus the bucket count, one line per
    input and scheme (plain versus factorised at equal bucket counts)."""
    records = [r for r in records if r["benchmark"] == "quality"]
    by_hashes = [r for r in records if r["params"].get("sweep", "n_hashes") == "n_hashes"]
    by_scheme = [r for r in records if r["params"].get("sweep") == "hashing"]
    rows = [(by_hashes, "n_hashes", lambda r: r["params"]["n_hashes"])] if by_hashes else []
    if by_scheme:
        rows.append((by_scheme, "buckets (plain n vs factorised n1 x n2 [x n3] = n)",
                     lambda r: r["params"]["total_buckets"]))
    fig, axes = plt.subplots(len(rows), 2, figsize=(12, 4.8 * len(rows)), squeeze=False)
    for (sub, xlabel, x), row in zip(rows, axes):
        for ax, key, label in zip(row, ("rel_err", "recall_at_k"), ("relative error", "top-k recall")):
            _lines(ax, sub, x, key)
            ax.set(xlabel=xlabel, ylabel=label)
            ax.set_xscale("log", base=2)
            if sub is by_scheme:
                p = sub[0]["params"]
                ax.set_title(f"hashing schemes, bucket_size={p['bucket_size']} n_hashes={p['n_hashes']}", fontsize=9)
    shapes = _shapes(records, ("batch", "heads", "seq_len", "head_dim", "seeds", "top_k"))
    fig.suptitle(f"LSH vs full shared-QK attention | {shapes}\n{title}", fontsize=9)
    _save(fig, path)


PLOTS = {"attention": attention_plot, "model": model_plot, "quality": quality_plot}


def write_plots(records: list[dict], out: Path, title: str) -> list[str]:
    """Writes one PNG per benchmark present in ``records``; returns the file names."""
    names = []
    for benchmark, plot in PLOTS.items():
        if any(r["benchmark"] == benchmark for r in records):
            if plot(records, out / f"{benchmark}.png", title) is not False:
                names.append(f"{benchmark}.png")
    return names
