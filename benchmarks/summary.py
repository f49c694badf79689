"""The headline numbers of a run, as sentences: where LSH attention becomes faster than naive
full attention and than SDPA, how it compares at the longest length, and what reversible
layers and the chunked feed-forward save. Written to ``summary.md`` with the tables."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from .report import all_tables

LSH_HASHES = 4


def _ok(records: list[dict], series: str, key: str = "time_fwdbwd_ms") -> dict[int, float]:
    return {r["params"]["seq_len"]: r[key] for r in records
            if r["benchmark"] == "attention" and r["series"] == series and r["status"] == "ok" and r[key]}


def lsh_series(records: list[dict]) -> Optional[str]:
    """The LSH line the headline uses: the Triton backend when it ran, else the torch one."""
    for name in (f"lsh-triton h={LSH_HASHES}", f"lsh-torch h={LSH_HASHES}"):
        if _ok(records, name):
            return name
    return None


def crossover(records: list[dict], fast: str, base: str) -> str:
    """Where ``fast`` becomes faster (forward+backward) than ``base`` and stays faster at every
    longer length where both ran; interpolated linearly in log(time ratio) versus log(N)."""
    t_fast, t_base = _ok(records, fast), _ok(records, base)
    points = [(n, t_fast[n] / t_base[n]) for n in sorted(set(t_fast) & set(t_base))]
    if not points:
        return f"{fast} vs {base}: no length where both ran"
    losses = [i for i, (_, ratio) in enumerate(points) if ratio >= 1]
    if not losses:
        return f"{fast} is faster than {base} at every measured length (N >= {points[0][0]})"
    if losses[-1] == len(points) - 1:
        n, ratio = points[-1]
        return f"{fast} is not faster than {base} up to N = {n} (time ratio {ratio:.2f})"
    (n1, r1), (n2, r2) = points[losses[-1]], points[losses[-1] + 1]
    nx = math.exp(math.log(n1) - math.log(r1) * (math.log(n2) - math.log(n1)) / (math.log(r2) - math.log(r1)))
    return (f"{fast} becomes faster than {base} between N = {n1} (time ratio {r1:.2f}) and N = {n2} "
            f"({r2:.2f}); log-log interpolated crossover N ~ {nx:,.0f}")


def at_longest(records: list[dict], fast: str, base: str) -> str:
    """``fast`` versus ``base`` at the longest length where both ran, and why ``base`` did not
    run at the longest length where ``fast`` ran (when it did not)."""
    t_fast, m_fast = _ok(records, fast), _ok(records, fast, "peak_mem_mib")
    t_base, m_base = _ok(records, base), _ok(records, base, "peak_mem_mib")
    if not t_fast:
        return f"{fast} did not run"
    both = sorted(set(t_fast) & set(t_base))
    parts = []
    if both:
        n = both[-1]
        parts.append(f"N = {n}: {fast} {t_fast[n]:,.0f} ms vs {base} {t_base[n]:,.0f} ms "
                     f"({_times(t_base[n], t_fast[n], 'faster', 'slower')}); peak {m_fast[n]:,.0f} MiB vs "
                     f"{m_base[n]:,.0f} MiB ({_times(m_base[n], m_fast[n], 'less', 'more')})")
    n = max(t_fast)
    if not both or n > both[-1]:
        rec = next((r for r in records if r["series"] == base and r["params"].get("seq_len") == n), None)
        why = "not run" if rec is None else f"{rec['status']} ({rec['note']})"
        parts.append(f"N = {n}: {fast} {t_fast[n]:,.0f} ms, {m_fast[n]:,.0f} MiB; {base} {why}")
    return "; ".join(parts)


def _times(base: float, fast: float, better: str, worse: str) -> str:
    """``"3.2x faster"`` / ``"1.5x slower"`` for ``fast`` relative to ``base``."""
    fast = max(fast, 1e-9)
    return f"{base / fast:.1f}x {better}" if base >= fast else f"{fast / max(base, 1e-9):.1f}x {worse}"


def _model_growth(records: list[dict]) -> list[str]:
    """Peak memory at the largest over the smallest depth (depth sweep), and chunked vs
    unchunked feed-forward."""
    lines = []
    depth = [r for r in records if r["benchmark"] == "model" and r["params"].get("sweep") == "depth"
             and r["status"] == "ok"]
    for series in dict.fromkeys(r["series"] for r in depth):
        rows = sorted((r["params"]["depth"], r["peak_mem_mib"]) for r in depth if r["series"] == series)
        if len(rows) > 1:
            (d0, m0), (d1, m1) = rows[0], rows[-1]
            lines.append(f"{series}: peak {m0:,.0f} MiB at depth {d0}, {m1:,.0f} MiB at depth {d1} "
                         f"({m1 / max(m0, 1e-9):.2f}x)")
    ffn = {r["params"]["ff_chunks"]: r["peak_mem_mib"] for r in records
           if r["benchmark"] == "model" and r["params"].get("sweep") == "ffn" and r["status"] == "ok"}
    if len(ffn) == 2:
        (c0, m0), (c1, m1) = sorted(ffn.items())
        lines.append(f"feed-forward step: ff_chunks={c0} {m0:,.0f} MiB, ff_chunks={c1} {m1:,.0f} MiB "
                     f"({m0 / max(m1, 1e-9):.1f}x less)")
    return lines


def headline(records: list[dict]) -> list[str]:
    """The summary sentences of a run."""
    lines = []
    lsh = lsh_series(records)
    if lsh is not None:
        for base in ("naive", "sdpa"):
            lines += [crossover(records, lsh, base), at_longest(records, lsh, base)]
    return lines + _model_growth(records)


def write_summary(path: Path, metadata: dict[str, Any], records: list[dict], plots: list[str]) -> None:
    banner = "\n".join(f"- {k}: {v}" for k, v in metadata.items() if k != "settings")
    text = ["# Benchmark summary", "", banner, "", "## Headline", ""]
    text += [f"- {line}" for line in headline(records)] + ["", "## Plots", ""]
    text += [f"![{name}]({name})" for name in plots] + ["", "## Tables", "", all_tables(records, markdown=True), ""]
    path.write_text("\n".join(text))
