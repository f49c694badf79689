"""Terminal tables, ``results.json`` and ``summary.md``.

``results.json`` schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "metadata": {"command", "date", "git_commit", "device", "device_name", "cpu", "threads",
                   "ram_gib", "python", "torch", "triton", "peers", "quick", "preset" ("quick" |
                   "full" | "long"), "allocator" ("default" | "tuned": glibc's mode while
                   timing), "dtype", "memory_method", "settings": {...every option of the run...}},
      "records": [
        {"benchmark": "attention" | "model" | "quality",
         "provider": str,             # implementation, e.g. "sdpa", "lsh-torch", "reformer_lm"
         "series": str,               # line in tables/plots, e.g. "lsh-torch h=4"
         "params": {...},             # shapes and settings: seq_len, batch, heads, head_dim,
                                      #   dtype, causal, bucket_size, n_hashes, depth, sweep, ...
         "status": "ok" | "skipped" | "unavailable" | "timeout" | "error",
         "note": str,                 # why, for any status but "ok"
         "time_fwd_ms": float | null,     # median forward time
         "time_fwdbwd_ms": float | null,  # median forward+backward time
         "peak_mem_mib": float | null,    # peak extra memory of forward+backward, MiB
         "repeats": int,              # timed calls per median        (measured cases)
         "warmup_ms": float,          # the warm-up call              (measured cases)
         "allocator": str,            # glibc mode the time was taken in (measured cases)
         "ratio_to_first": float,     # time_fwdbwd / that of the series' first measured case
         "first_seq_len": int,        #   ... which ran at this N       (measured cases)
         "est_mem_mib": float,        # the estimate used for skipping (attention, model)
         "flops_fwd": float,          # forward FLOPs by the documented formula (attention, model)
         "gflops_fwdbwd": float,      # 3.5 * flops_fwd / time_fwdbwd  (measured attention, model)
         "model_bytes": float | null, # modelled bytes moved by fwd+bwd (attention; see attention.model_bytes)
         "gbs_fwdbwd": float,         # model_bytes / time_fwdbwd, GB/s (measured attention)
         "rel_err", "recall_at_k", "mass_recall": float}   # quality records only; their params
                                      #   also hold sweep ("n_hashes" | "hashing"), n_buckets
                                      #   (null = default rule, int = plain, [n1, n2] = factorised)
                                      #   and hashing (a label: "default", "plain 64", "factorised 8x8")
      ]
    }
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

SCHEMA_VERSION = 1


def write_json(path: Path, metadata: dict[str, Any], records: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "metadata": metadata, "records": records},
                               indent=1))


def render(headers: Sequence[str], rows: Iterable[Sequence[Any]], markdown: bool = False) -> str:
    """A left-aligned text table (or a GitHub markdown table)."""
    cells = [[str(c) for c in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    if markdown:
        lines = [f"| {line} |" for line in lines]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    else:
        lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1 else f"{value:,.1f}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _cell(record: dict[str, Any], key: str) -> str:
    """A measured value, or a short reason when the case did not run."""
    if record["status"] == "ok":
        return _fmt(record.get(key))
    note = record["note"]
    if record["status"] == "skipped":
        short = note.split(" >")[0] if note.startswith("est. ") else note if note == "needs CUDA" else ""
        return f"skip ({short})" if short else "skip"
    return {"unavailable": "n/a"}.get(record["status"], record["status"])


def attention_tables(records: list[dict[str, Any]], markdown: bool = False) -> str:
    """Three pivot tables (series x N): forward+backward ms, forward ms, peak MiB."""
    records = [r for r in records if r["benchmark"] == "attention"]
    if not records:
        return ""
    lengths = sorted({r["params"]["seq_len"] for r in records})
    series = list(dict.fromkeys(r["series"] for r in records))
    by_key = {(r["series"], r["params"]["seq_len"]): r for r in records}
    blocks = []
    allocators = sorted({r["allocator"] for r in records if r.get("allocator")})
    timed = f" [allocator: {', '.join(allocators)}]" if allocators else ""
    tables = [("time_fwdbwd_ms", f"forward+backward time (ms){timed}"), ("time_fwd_ms", f"forward time (ms){timed}"),
              ("peak_mem_mib", "peak extra memory, forward+backward (MiB)"),
              ("ratio_to_first", "forward+backward time / time at the series' first measured N")]
    for key, title in tables:
        if not any(r.get(key) is not None for r in records):
            continue
        rows = [[s] + [_cell(by_key[(s, n)], key) if (s, n) in by_key else "" for n in lengths] for s in series]
        blocks.append(f"{title}\n" + render(["provider"] + [f"N={n}" for n in lengths], rows, markdown))
    return "\n\n".join(blocks) + "\n\n" + _notes(records)


def model_table(records: list[dict[str, Any]], markdown: bool = False) -> str:
    records = [r for r in records if r["benchmark"] == "model"]
    if not records:
        return ""
    rows = [[r["params"]["sweep"], r["series"], r["params"].get("depth", "-"), r["params"]["seq_len"],
             _cell(r, "time_fwdbwd_ms"), _cell(r, "peak_mem_mib")] for r in records]
    headers = ["sweep", "model", "depth", "N", "train step (ms)", "peak extra (MiB)"]
    return "training step (forward+backward)\n" + render(headers, rows, markdown) + "\n\n" + _notes(records)


def quality_table(records: list[dict[str, Any]], markdown: bool = False) -> str:
    records = [r for r in records if r["benchmark"] == "quality"]
    if not records:
        return ""
    rows = [[r["params"]["input"], r["params"]["bucket_size"], r["params"]["n_hashes"],
             r["params"].get("hashing", "default"), _cell(r, "rel_err"), _cell(r, "recall_at_k"),
             _cell(r, "mass_recall")] for r in records]
    k = records[0]["params"]["top_k"]
    headers = ["input", "bucket_size", "n_hashes", "hashing (buckets)", "rel. error", f"recall@{k}", "mass recall"]
    return "LSH vs full shared-QK attention\n" + render(headers, rows, markdown) + "\n\n" + _notes(records)


def _notes(records: list[dict[str, Any]]) -> str:
    notes = dict.fromkeys(f"- {r['series']}: {r['status']} ({r['note']})" for r in records
                          if r["status"] != "ok" and not r["note"].startswith("est. ") and r["note"] != "needs CUDA")
    return "\n".join(notes)


def all_tables(records: list[dict[str, Any]], markdown: bool = False) -> str:
    parts = (attention_tables(records, markdown), model_table(records, markdown), quality_table(records, markdown))
    return "\n\n".join(p.strip() for p in parts if p)
