"""Sample text from a saved ``ReformerLM``: ``python -m reformer.sample --model DIR --prompt TEXT``.

Byte-level models (``vocab_size == 256``) take the prompt as UTF-8 bytes and print the
continuation decoded with ``errors="replace"``; other models take the prompt as
whitespace-separated token ids and print ids. The whole sequence (prompt + continuation) is
printed. Options: ``--max-new-tokens N``, ``--temperature T``, ``--top-k K``, ``--top-p P``,
``--seed S`` (a seeded ``torch.Generator``; LSH rotations come from the model's seed, or from
seed S + layer when the model has none), ``--greedy``, ``--eos-token-id``.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from .lsh_attention import LSHSelfAttention
from .model import ReformerLM


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reformer.sample", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="directory written by ReformerLM.save_pretrained")
    parser.add_argument("--prompt", required=True, help="text (byte-level models) or space-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None, help="seed of the sampling generator")
    parser.add_argument("--greedy", action="store_true", help="always pick the most likely token")
    parser.add_argument("--eos-token-id", type=int, default=None, help="stop a sequence at this id")
    parser.add_argument("--device", default="cpu")
    return parser


def encode(prompt: str, vocab_size: int) -> list[int]:
    """Token ids of ``prompt``: its UTF-8 bytes for byte-level models, else the integers it lists."""
    if vocab_size == 256:
        return list(prompt.encode("utf-8"))
    try:
        return [int(piece) for piece in prompt.split()]
    except ValueError:
        raise ValueError(f"the model has vocab_size={vocab_size} (not byte-level): --prompt must be "
                         f"space-separated token ids, got {prompt!r}") from None


def decode(ids: Sequence[int], vocab_size: int) -> str:
    """Text for byte-level models (``errors="replace"``), space-separated ids otherwise."""
    if vocab_size == 256:
        return bytes(ids).decode("utf-8", errors="replace")
    return " ".join(str(i) for i in ids)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    model = ReformerLM.from_pretrained(args.model, device=args.device)
    vocab = model.config.vocab_size
    try:
        ids = encode(args.prompt, vocab)
    except ValueError as error:
        parser.error(str(error))
    if not ids:
        parser.error("--prompt must hold at least one token")
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=args.device).manual_seed(args.seed)
        if model.config.seed is None:  # fix the LSH rotations as config.seed would: layer i gets seed + i
            for layer, block in enumerate(model.layers.blocks):
                if isinstance(block.f.fn, LSHSelfAttention):
                    block.f.fn.seed = args.seed + layer
    prompt = torch.tensor([ids], dtype=torch.long, device=args.device)
    out = model.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, do_sample=not args.greedy, eos_token_id=args.eos_token_id,
                         generator=generator)
    print(decode(out[0].tolist(), vocab))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
