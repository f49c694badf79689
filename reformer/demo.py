"""A short demo: build the baseline Transformer, run forward + backward, print shapes and size.

Run with ``python -m reformer.demo``.
"""
from __future__ import annotations

import time

import torch

from .transformer import Transformer


def main() -> None:
    model = Transformer(src_vocab=1000, tgt_vocab=1000, d_model=256, n_heads=8, n_encoder_layers=3,
                        n_decoder_layers=3, d_ff=1024, dropout=0.1, max_len=512)
    src = torch.randint(0, 1000, (4, 128))
    tgt = torch.randint(0, 1000, (4, 96))
    src_kpm = torch.zeros(4, 128, dtype=torch.bool)
    src_kpm[1, 100:] = True  # the second source sequence is padded after 100 tokens
    start = time.perf_counter()
    logits = model(src, tgt[:, :-1], src_key_padding_mask=src_kpm)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 1000), tgt[:, 1:].reshape(-1))
    loss.backward()
    elapsed = time.perf_counter() - start
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Transformer: {n_params / 1e6:.2f} M parameters")
    print(f"src {tuple(src.shape)}  tgt {tuple(tgt.shape)}  ->  logits {tuple(logits.shape)}")
    print(f"loss {loss.item():.3f} (ln(vocab) = {torch.log(torch.tensor(1000.0)).item():.3f}); "
          f"forward + backward {elapsed * 1000:.0f} ms on {torch.get_num_threads()} CPU threads")
    out = model.eval().generate(src[:1], 8, bos_id=1)
    print(f"greedy generate: {out.tolist()[0]}")


if __name__ == "__main__":
    main()
