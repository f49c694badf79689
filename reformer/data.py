"""Training tasks: the Reformer paper's duplication task and byte-level text.

Every batch is a pure function of ``(seed, split, index)``: batch ``index`` of the *global*
batch is drawn from a private ``torch.Generator`` seeded from those three values, and a rank of a
data-parallel job keeps its own slice of rows. So resuming at step ``s`` needs only ``s`` (no
generator state to carry), every rank draws distinct rows, and a run on ``W`` ranks sees
exactly the batches of a single-process run with the same global batch size.

A batch is ``(tokens, loss_mask)``: ``tokens`` ``(B, N)`` int64 and ``loss_mask`` ``(B, N - 1)``
bool, True where the prediction of ``tokens[:, t + 1]`` from position ``t`` is scored.
"""
from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import Tensor

from ._validation import check_positive

SPLITS = ("train", "val")
TASKS = ("duplication", "text")


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``world_size`` keeps rows ``[rank * B / W, (rank + 1) * B / W)``."""

    rank: int = 0
    world_size: int = 1

    def rows(self, global_batch: int) -> slice:
        if global_batch % self.world_size:
            raise ValueError(f"global batch size {global_batch} must be divisible by world size {self.world_size}")
        per_rank = global_batch // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)


def batch_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A CPU generator seeded from ``(seed, split, index)`` (stable across processes and runs)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    digest = hashlib.blake2b(f"{seed}/{split}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


class DuplicationTask:
    """Sequences ``0 w 0 w`` of length ``seq_len`` with ``w`` ``seq_len / 2 - 1`` symbols drawn
    uniformly from ``1..vocab_size-1`` (Kitaev et al. 2020, section 5). Only the predictions of
    the second copy of ``w`` are scored; chance accuracy is ``1 / (vocab_size - 1)``.
    """

    def __init__(self, seq_len: int, vocab_size: int = 128, seed: int = 0):
        check_positive("seq_len", seq_len)
        if seq_len < 4 or seq_len % 2:
            raise ValueError(f"seq_len must be even and >= 4 for the duplication task, got {seq_len}")
        if vocab_size < 3:
            raise ValueError(f"vocab_size must be >= 3 (0 is the separator), got {vocab_size}")
        self.seq_len, self.vocab_size, self.seed = seq_len, vocab_size, seed

    def batch(self, index: int, global_batch: int, *, split: str = "train", shard: Shard = Shard()
              ) -> tuple[Tensor, Tensor]:
        """Rows of global batch ``index`` kept by ``shard``: ``tokens (b, N)``, ``loss_mask (b, N - 1)``."""
        half = self.seq_len // 2
        g = batch_generator(self.seed, split, index)
        w = torch.randint(1, self.vocab_size, (global_batch, half - 1), generator=g)[shard.rows(global_batch)]
        sep = torch.zeros(w.shape[0], 1, dtype=torch.long)
        tokens = torch.cat([sep, w, sep, w], dim=1)  # (b, N)
        loss_mask = torch.zeros(w.shape[0], self.seq_len - 1, dtype=torch.bool)
        loss_mask[:, half:] = True  # positions half .. N-2 predict the second copy, tokens half+1 .. N-1
        return tokens, loss_mask


def stdlib_sources() -> list[Path]:
    """The Python standard library's ``.py`` files (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages"}
    return sorted(p for p in root.rglob("*.py") if skip.isdisjoint(p.relative_to(root).parts))


def text_files(path: Optional[Path], pattern: str = "*") -> list[Path]:
    """``path`` itself if a file, the files under it matching ``pattern`` if a folder, or the
    standard library's sources when ``path`` is None. Sorted, so the corpus is reproducible."""
    if path is None:
        return stdlib_sources()
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"text corpus {path} is neither a file nor a folder")
    files = sorted(p for p in path.rglob(pattern) if p.is_file())
    if not files:
        raise ValueError(f"no files matching {pattern!r} under {path}")
    return files


def read_corpus(files: Iterable[Path], max_bytes: int) -> Tensor:
    """The files' bytes, joined by newlines, up to ``max_bytes``: a uint8 tensor."""
    check_positive("max_bytes", max_bytes)
    buf = bytearray()
    for f in files:
        buf += f.read_bytes() + b"\n"
        if len(buf) >= max_bytes:
            break
    del buf[max_bytes:]
    return torch.frombuffer(buf, dtype=torch.uint8).clone() if buf else torch.empty(0, dtype=torch.uint8)


class TextTask:
    """Byte-level language modelling (vocabulary 256) on windows of a local corpus. The last
    ``val_fraction`` of the bytes is the validation split; every prediction is scored."""

    vocab_size = 256

    def __init__(self, corpus: Tensor, seq_len: int, seed: int = 0, val_fraction: float = 0.05):
        check_positive("seq_len", seq_len)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n_val = int(len(corpus) * val_fraction)
        self.splits = {"train": corpus[: len(corpus) - n_val], "val": corpus[len(corpus) - n_val:]}
        for name, data in self.splits.items():
            if len(data) < seq_len:
                raise ValueError(
                    f"the {name} split has {len(data)} bytes, fewer than seq_len={seq_len}: use a larger corpus"
                )
        self.seq_len, self.seed = seq_len, seed

    @classmethod
    def from_path(cls, path: Optional[Path], seq_len: int, *, seed: int = 0, pattern: str = "*",
                  max_bytes: int = 32 * 2**20, val_fraction: float = 0.05) -> "TextTask":
        """A corpus file or folder (None: the standard library's sources), up to ``max_bytes``."""
        return cls(read_corpus(text_files(path, pattern), max_bytes), seq_len, seed, val_fraction)

    def batch(self, index: int, global_batch: int, *, split: str = "train", shard: Shard = Shard()
              ) -> tuple[Tensor, Tensor]:
        """Rows of global batch ``index`` kept by ``shard``: ``tokens (b, N)``, ``loss_mask (b, N - 1)``."""
        g = batch_generator(self.seed, split, index)
        data = self.splits[split]
        starts = torch.randint(0, len(data) - self.seq_len + 1, (global_batch,), generator=g)[shard.rows(global_batch)]
        tokens = data[starts[:, None] + torch.arange(self.seq_len)].long()  # (b, N)
        return tokens, torch.ones(tokens.shape[0], self.seq_len - 1, dtype=torch.bool)


def make_task(name: str, seq_len: int, *, seed: int = 0, vocab_size: int = 128,
              text_path: Optional[Path] = None, text_pattern: str = "*", max_bytes: int = 32 * 2**20
              ) -> "DuplicationTask | TextTask":
    """``"duplication"`` or ``"text"``, as chosen on the training command line."""
    if name == "duplication":
        return DuplicationTask(seq_len, vocab_size, seed)
    if name == "text":
        return TextTask.from_path(text_path, seq_len, seed=seed, pattern=text_pattern, max_bytes=max_bytes)
    raise ValueError(f"task must be one of {TASKS}, got {name!r}")
