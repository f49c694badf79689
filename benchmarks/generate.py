"""Generation speed of ``ReformerLM``: cached incremental decoding against uncached decoding.

    python -m benchmarks.generate            # 1,024 new tokens after a 4,096-token prompt
    python -m benchmarks.generate --quick    # small sizes, seconds

Model: byte-level ``ReformerLM``, 6 reversible layers, d_model 256, 4 heads, d_ff 1024, LSH
attention with 4 hashes and bucket 64 (``causal_mode="bucket"``), max_seq_len = prompt + new.
Greedy decoding, batch 1, ``torch.no_grad``.

* cached: one forward over the prompt (the prefill, timed separately), then one cached step
  per new token (``generate(use_cache=True)``); ms/token = (total - prefill) / new tokens.
* uncached: ``generate(use_cache=False)``, a forward over the whole context per new token,
  timed over ``--uncached-tokens`` tokens and extrapolated to all new tokens (its true cost
  grows slightly as the context grows, so the extrapolation is a lower bound).

Results are printed as a table and as JSON (and written to ``--json PATH`` when given).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from reformer import ReformerConfig, ReformerLM

FULL = dict(prompt_len=4096, new_tokens=1024, depth=6, d_model=256, heads=4, bucket_size=64, n_hashes=4,
            uncached_tokens=3)
QUICK = dict(prompt_len=256, new_tokens=32, depth=2, d_model=64, heads=2, bucket_size=16, n_hashes=2,
             uncached_tokens=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation benchmark's options (defaults: the full sizes above; ``--quick``: small)."""
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run of a few seconds)")
    for name, help_text in (("prompt-len", "prompt tokens"), ("new-tokens", "tokens to generate"),
                            ("depth", "layers"), ("d-model", "model width"), ("heads", "attention heads"),
                            ("bucket-size", "LSH bucket size"), ("n-hashes", "LSH hash rounds"),
                            ("uncached-tokens", "tokens timed without the cache (extrapolated)")):
        parser.add_argument(f"--{name}", type=int, default=None, help=f"{help_text} (default: {FULL[name.replace('-', '_')]})")
    parser.add_argument("--attention", choices=("lsh", "full"), default="lsh")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results here")


def _sizes(args: argparse.Namespace) -> dict[str, int]:
    sizes = dict(QUICK if args.quick else FULL)
    for name in sizes:
        value = getattr(args, name, None)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
            sizes[name] = value
    sizes["uncached_tokens"] = min(sizes["uncached_tokens"], sizes["new_tokens"])
    return sizes


def _timed(fn) -> tuple[Any, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the model, time cached and uncached generation, print the table and the JSON;
    returns the results as a dict. ``args`` holds the options of :func:`add_arguments`
    (missing ones take their defaults, so a caller's own parser may define a subset)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    args = argparse.Namespace(**{**vars(defaults.parse_args([])), **vars(args)})
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    s = _sizes(args)
    config = ReformerConfig(vocab_size=256, d_model=s["d_model"], n_heads=s["heads"], depth=s["depth"],
                            d_ff=4 * s["d_model"], max_seq_len=s["prompt_len"] + s["new_tokens"],
                            attention=args.attention, bucket_size=s["bucket_size"], n_hashes=s["n_hashes"], seed=0,
                            causal_mode="bucket")
    torch.manual_seed(0)
    model = ReformerLM(config).to(args.device).eval()
    prompt = torch.randint(0, 256, (1, s["prompt_len"]), device=args.device)
    with torch.no_grad():
        model.generate(prompt[:, :8], 2, do_sample=False)  # warm-up
        _, prefill = _timed(lambda: model(prompt, cache=model.new_cache(config.max_seq_len))[:, -1])
    _, total = _timed(lambda: model.generate(prompt, s["new_tokens"], do_sample=False))
    _, uncached = _timed(lambda: model.generate(prompt, s["uncached_tokens"], do_sample=False, use_cache=False))
    cached_ms = 1e3 * max(total - prefill, 0.0) / s["new_tokens"]
    uncached_ms = 1e3 * uncached / s["uncached_tokens"]
    result = {
        "benchmark": "generate", "quick": bool(args.quick), "device": args.device, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "attention": args.attention, **s, "n_buckets": config.n_buckets,
        "prefill_s": round(prefill, 4), "cached_total_s": round(total, 4),
        "cached_ms_per_token": round(cached_ms, 3), "uncached_ms_per_token": round(uncached_ms, 3),
        "uncached_extrapolated_s": round(uncached_ms * s["new_tokens"] / 1e3, 2),
        "speedup": round(uncached_ms / cached_ms, 1) if cached_ms > 0 else None,
    }
    print(table(result))
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(r: dict[str, Any]) -> str:
    """A small text table of one result."""
    head = (f"ReformerLM generate | {r['attention']} | depth {r['depth']}, d_model {r['d_model']}, {r['heads']} heads, "
            f"{r['n_hashes']} hashes x bucket {r['bucket_size']} | prompt {r['prompt_len']} + {r['new_tokens']} new "
            f"| {r['device']}, {r['threads']} threads")
    rows = [("mode", "ms / token", "total s"),
            ("cached", f"{r['cached_ms_per_token']:.2f}", f"{r['cached_total_s']:.2f} (prefill {r['prefill_s']:.2f})"),
            ("uncached", f"{r['uncached_ms_per_token']:.2f}",
             f"{r['uncached_extrapolated_s']:.2f} (extrapolated from {r['uncached_tokens']} tokens)")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [head] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.append(f"speedup (uncached / cached per token): {r['speedup']}x")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
