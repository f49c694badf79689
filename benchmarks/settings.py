"""What each sub-benchmark runs in ``--quick`` and in full mode (command-line flags override).

``--quick`` is sized to finish in about 3 minutes on a 2-core CPU and still show where LSH
attention overtakes naive full attention and SDPA: N from 256 (where naive attention still
wins) to 8192 (the longest length at which naive attention runs in seconds), n_hashes=4, no
peers. Full mode follows the LSH issue (B=1, H=8,
D=64, bucket_size=64, float32, N up to 65536) and the building-blocks issue (training step at
N=4096 versus depth; feed-forward at N=16384, d_ff=4096, chunks 1 vs 8).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AttentionSettings:
    lengths: tuple[int, ...]
    n_hashes: tuple[int, ...]
    peer_hashes: tuple[int, ...]
    batch: int = 1
    heads: int = 8
    head_dim: int = 64
    bucket_size: int = 64
    causal: bool = False


@dataclass(frozen=True)
class ModelSettings:
    """depths at ``depth_len``; ``lengths`` at ``length_depth``; the feed-forward step at
    ``ffn_len`` x ``ffn_d_model`` with hidden ``ffn_d_ff``, 1 vs ``ff_chunks`` chunks (which
    the ReformerLM cases also use). ``dims``: the models' shared sizes. ``sweeps``: which of
    the three to run."""

    depths: tuple[int, ...]
    depth_len: int
    lengths: tuple[int, ...]
    length_depth: int
    ffn_len: int
    ffn_d_model: int
    ffn_d_ff: int
    ff_chunks: int
    dims: dict = field(default_factory=dict)
    sweeps: tuple[str, ...] = ("depth", "length", "ffn")


@dataclass(frozen=True)
class QualitySettings:
    seq_len: int
    heads: int
    bucket_sizes: tuple[int, ...]
    n_hashes: tuple[int, ...]
    seeds: int
    batch: int = 1
    head_dim: int = 64
    top_k: int = 8


@dataclass(frozen=True)
class Settings:
    """repeats, budget_s, max_call_s, timeout_s: see ``runner.RunOptions``."""

    attention: AttentionSettings
    model: ModelSettings
    quality: QualitySettings
    repeats: int
    budget_s: float
    max_call_s: float
    timeout_s: float


QUICK = Settings(
    attention=AttentionSettings(lengths=(256, 512, 1024, 2048, 4096, 8192), n_hashes=(4,), peer_hashes=()),
    model=ModelSettings(depths=(2, 8), depth_len=1024, lengths=(), length_depth=2, ffn_len=4096,
                        ffn_d_model=256, ffn_d_ff=2048, ff_chunks=8,
                        dims=dict(vocab_size=256, d_model=128, n_heads=2, d_ff=512, bucket_size=64, n_hashes=2)),
    quality=QualitySettings(seq_len=1024, heads=2, bucket_sizes=(64,), n_hashes=(1, 2, 4, 8), seeds=2),
    repeats=3, budget_s=2.0, max_call_s=15.0, timeout_s=300.0,
)

FULL = Settings(
    attention=AttentionSettings(lengths=(256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536),
                                n_hashes=(1, 2, 4, 8),
                                peer_hashes=(4, 8)),
    model=ModelSettings(depths=(2, 4, 8, 12), depth_len=4096, lengths=(1024, 2048, 4096, 8192, 16384),
                        length_depth=4, ffn_len=16384, ffn_d_model=512, ffn_d_ff=4096, ff_chunks=8,
                        dims=dict(vocab_size=256, d_model=256, n_heads=4, d_ff=1024, bucket_size=64, n_hashes=4)),
    quality=QualitySettings(seq_len=2048, heads=4, bucket_sizes=(32, 64, 128), n_hashes=(1, 2, 4, 8), seeds=3),
    repeats=5, budget_s=10.0, max_call_s=600.0, timeout_s=1800.0,
)
