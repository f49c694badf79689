"""Record the LSH attention of a small ReformerLM on one text and plot it (``attention_map.png``).

    python -m benchmarks attention-map                       # a tiny random model, seconds
    python -m benchmarks attention-map --model tiny-model --layer 1 --head 2 --text "Hello, world"

Runs the model once in eval mode inside ``reformer.record_attention`` and writes
``reformer.plot_attention`` of the chosen layer and head: the combined attention weights as a
heat map and each hash round's buckets along the sequence (docs/generation.md, "Inspecting LSH
attention"). Without ``--model`` the model is a byte-level ``ReformerLM`` with random weights
(d_model 64, 4 heads, 2 layers, bucket 8, 2 hashes, causal, eval seed ``--seed``): its map shows
the mechanism (which keys each query can see) rather than learned structure. ``--model`` takes
a directory written by ``ReformerLM.save_pretrained`` (for example by ``reformer-train``). The
text is encoded as bytes (models with a vocabulary under 256 get byte values modulo their
vocabulary size) and cut to the model's ``max_seq_len``. Needs matplotlib (the ``bench`` extra).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import torch

from reformer import ReformerConfig, ReformerLM, plot_attention, record_attention

DEFAULT_TEXT = ("Locality-sensitive hashing puts similar vectors in the same bucket, so each query "
                "attends only to the keys of its own bucket.")
TINY = dict(vocab_size=256, d_model=64, n_heads=4, depth=2, d_ff=128, max_seq_len=128, bucket_size=8, n_hashes=2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, metavar="DIR",
                        help="a ReformerLM saved with save_pretrained (default: a tiny random byte-level model)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the input, encoded as bytes (default: a sentence)")
    parser.add_argument("--layer", default="0", help="layer index (0 = first LSH layer called) or qualified name")
    parser.add_argument("--head", type=int, default=0, help="attention head (default: 0)")
    parser.add_argument("--seed", type=int, default=0,
                        help="RNG seed of the random model's weights and its eval LSH rotations (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("bench_out"), metavar="DIR",
                        help="output directory (default: bench_out)")


def tiny_model(seed: int = 0) -> ReformerLM:
    """The random byte-level model used without ``--model``, in eval mode."""
    torch.manual_seed(seed)
    return ReformerLM(ReformerConfig(**TINY, seed=seed)).eval()


def encode(text: str, vocab_size: int, max_len: int) -> torch.Tensor:
    """``text`` as ``(1, N)`` token ids: its UTF-8 bytes modulo ``vocab_size``, at most ``max_len``."""
    data = list(text.encode("utf-8"))[:max_len]
    if not data:
        raise ValueError("--text must not be empty")
    return torch.tensor([data], dtype=torch.long) % vocab_size


def run(args: argparse.Namespace) -> int:
    """Record, plot, print the PNG's path; returns 0."""
    model = ReformerLM.from_pretrained(args.model) if args.model is not None else tiny_model(args.seed)
    tokens = encode(args.text, model.config.vocab_size, model.config.max_seq_len)
    with torch.no_grad(), record_attention(model) as recorded:
        model(tokens)
    if not recorded.records:
        raise SystemExit("attention-map: the model has no LSH attention layer to record (attention='full')")
    layer = int(args.layer) if args.layer.lstrip("-").isdigit() else args.layer
    args.out.mkdir(parents=True, exist_ok=True)
    path = plot_attention(recorded, args.out / "attention_map.png", layer=layer, head=args.head)
    print(f"attention-map: {len(recorded.records)} LSH layer calls recorded over N={tokens.shape[1]} tokens; "
          f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention_map", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
