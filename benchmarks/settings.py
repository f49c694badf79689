"""What each sub-benchmark runs in each preset (command-line flags override).

- ``--quick`` (about 5 minutes on a 2-core CPU): attention from N=256 (where naive attention
  still wins) to N=8192 (the longest length at which naive attention runs in seconds), n_hashes=4,
  no peers; a small depth sweep and feed-forward step; a small quality sweep.
- full (the default, ``make bench``; sized to finish within 20 minutes on a 2-core CPU):
  attention B=1, H=8, D=64, bucket_size=64, float32 from N=1024 to 16384 with n_hashes 2 and 4
  and the peers at n_hashes=4 (32K and beyond: ``--long``); training-step memory versus depth
  (1-8) at N=1024, versus length (1K-16K) at depth 2, and the chunked feed-forward step at
  N=8192 (d_ff 4096, chunks 1 vs 8); quality versus n_hashes at N=2048, bucket size 64.
  Larger sweeps: ``--lengths``, ``--depths``, ``--n-hashes``.
- ``--long``: LSH attention (torch backend, n_hashes=4) at 32K, 128K and 1M tokens, one call per
  case with the time ratio to the first length (``attention --long``), and one training step of
  a reversible ReformerLM at N=1M (``model --long``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


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
    providers: tuple[str, ...] = ()  # default provider patterns of the preset (empty: all)


@dataclass(frozen=True)
class ModelSettings:
    """depths at ``depth_len``; ``lengths`` at ``length_depth``; the feed-forward step at
    ``ffn_len`` x ``ffn_d_model`` with hidden ``ffn_d_ff``, 1 vs ``ff_chunks`` chunks (which
    the ReformerLM cases also use). ``dims``: the models' shared sizes. ``sweeps``: which of
    ``depth``, ``length``, ``ffn`` and ``long`` (one reversible ReformerLM step at ``long_len``
    with axial positions ``long_axial``) to run."""

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
    long_len: int = 2**20
    long_axial: tuple[int, ...] = (1024, 1024)
    long_dims: dict = field(default_factory=lambda: dict(vocab_size=256, d_model=64, n_heads=2, d_ff=256,
                                                         bucket_size=64, n_hashes=2, depth=2, ff_chunks=16))


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
    hashing: Optional[tuple] = None  # the hashing sweep's entries (None: quality.HASHING_PAIRS)
    hashing_n_hashes: Optional[int] = None  # its rounds (None: quality.HASHING_N_HASHES)
    sweeps: tuple[str, ...] = ("n_hashes", "hashing")


@dataclass(frozen=True)
class Settings:
    """repeats, budget_s, max_call_s, timeout_s: see ``runner.RunOptions``. ``single_call``: one
    forward+backward call per case measures both time and memory (the ``--long`` preset, where
    one call takes minutes)."""

    attention: AttentionSettings
    model: ModelSettings
    quality: QualitySettings
    repeats: int
    budget_s: float
    max_call_s: float
    timeout_s: float
    single_call: bool = False
    max_call_s_by_provider: dict = field(default_factory=dict)


_MODEL_DIMS = dict(vocab_size=256, d_model=256, n_heads=4, d_ff=1024, bucket_size=64, n_hashes=4)

QUICK = Settings(
    attention=AttentionSettings(lengths=(256, 512, 1024, 2048, 4096, 8192), n_hashes=(4,), peer_hashes=()),
    model=ModelSettings(depths=(2, 8), depth_len=1024, lengths=(), length_depth=2, ffn_len=4096,
                        ffn_d_model=256, ffn_d_ff=2048, ff_chunks=8,
                        dims=dict(vocab_size=256, d_model=128, n_heads=2, d_ff=512, bucket_size=64, n_hashes=2)),
    quality=QualitySettings(seq_len=1024, heads=2, bucket_sizes=(64,), n_hashes=(1, 2, 4, 8), seeds=2),
    repeats=3, budget_s=2.0, max_call_s=15.0, timeout_s=300.0,
)

FULL = Settings(
    attention=AttentionSettings(lengths=(1024, 2048, 4096, 8192, 16384), n_hashes=(2, 4),
                                peer_hashes=(4,)),
    model=ModelSettings(depths=(1, 2, 4, 8), depth_len=1024, lengths=(1024, 4096, 16384), length_depth=2,
                        ffn_len=8192, ffn_d_model=512, ffn_d_ff=4096, ff_chunks=8, dims=_MODEL_DIMS),
    quality=QualitySettings(seq_len=2048, heads=2, bucket_sizes=(64,), n_hashes=(1, 2, 4, 8), seeds=2),
    repeats=3, budget_s=4.0, max_call_s=20.0, timeout_s=900.0,
)

LONG = Settings(
    attention=AttentionSettings(lengths=(32768, 131072, 1048576), n_hashes=(4,), peer_hashes=(),
                                providers=("naive", "sdpa", "lsh-torch")),
    model=ModelSettings(depths=(), depth_len=0, lengths=(), length_depth=2, ffn_len=0, ffn_d_model=0, ffn_d_ff=0,
                        ff_chunks=16, dims={}, sweeps=("long",)),
    quality=QUICK.quality,
    repeats=1, budget_s=0.0, max_call_s=4 * 3600.0, timeout_s=4 * 3600.0, single_call=True,
    max_call_s_by_provider={"naive": 120.0, "sdpa": 120.0},
)
