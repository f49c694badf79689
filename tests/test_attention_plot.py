"""reformer.plot_attention: a PNG of recorded LSH attention whose pixels follow the weights and
buckets, layer/head selection and its errors, the missing-matplotlib message."""
from __future__ import annotations

import sys

import pytest
import torch

from reformer import ReformerConfig, ReformerLM, plot_attention, record_attention
from reformer.recorder import AttentionRecord

pytest.importorskip("matplotlib")


def read_png(path):
    import matplotlib.image

    return matplotlib.image.imread(str(path))[..., :3]


def record(weights, buckets):
    return AttentionRecord("layers.blocks.0.f.fn", buckets, weights)


def plot(tmp_path, name, weights, buckets, **kw):
    path = plot_attention(record(weights, buckets), tmp_path / name, title="t", **kw)
    assert path == tmp_path / name and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return read_png(path)


def test_pixels_follow_the_weights_and_the_buckets(tmp_path):
    n = 12
    buckets = torch.randint(0, 4, (1, 1, 3, n), generator=torch.Generator().manual_seed(0)).expand(1, 2, 3, n)
    diagonal = torch.eye(n).expand(1, 2, n, n)
    uniform = torch.full((1, 2, n, n), 1.0 / n)
    a = plot(tmp_path, "a.png", diagonal, buckets)
    b = plot(tmp_path, "b.png", uniform, buckets)
    assert a.shape == b.shape and a.std() > 0.05  # not a blank figure
    differ = (abs(a - b).sum(-1) > 0.1)  # (rows, cols) where the two images differ
    assert differ.mean() > 0.1  # the heat map covers a good share of the figure
    rows = differ.any(1).nonzero()[0]  # image rows with a difference
    assert rows.max() < 0.85 * a.shape[0]  # ... above the bucket strip, which is the same in both
    other_buckets = plot(tmp_path, "c.png", diagonal, (buckets + 1) % 4)
    moved = (abs(a - other_buckets).sum(-1) > 0.1).any(1).nonzero()[0]
    assert moved.min() > 0.7 * a.shape[0]  # only the bucket strip changed
    head1 = plot(tmp_path, "d.png", torch.stack([diagonal[0, 0], uniform[0, 0]])[None], buckets, head=1)
    assert abs(head1 - b).max() < 0.1 < abs(head1 - a).max()  # head 1 is the uniform one


def test_a_recorded_model_layer_by_index_and_name(tmp_path):
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(vocab_size=32, d_model=32, n_heads=2, depth=2, d_ff=32, max_seq_len=32,
                                      bucket_size=4, n_hashes=2, seed=1)).eval()
    with torch.no_grad(), record_attention(model) as rec:
        model(torch.randint(0, 32, (1, 20)))
    first = read_png(plot_attention(rec, tmp_path / "first.png", layer=0, head=1))
    by_name = read_png(plot_attention(rec, tmp_path / "name.png", layer="layers.blocks.0.f.fn", head=1))
    last = read_png(plot_attention(rec, tmp_path / "last.png", layer=-1, head=1))
    assert (first == by_name).all() and first.shape == last.shape and not (first == last).all()
    with pytest.raises(ValueError, match="layer 'nope' was not recorded"):
        plot_attention(rec, tmp_path / "x.png", layer="nope")
    with pytest.raises(ValueError, match="head=2 is out of range"):
        plot_attention(rec, tmp_path / "x.png", head=2)
    with pytest.raises(ValueError, match="layer=2 is out of range"):
        plot_attention(rec, tmp_path / "x.png", layer=2)
    with pytest.raises(TypeError, match="head must be an int"):
        plot_attention(rec, tmp_path / "x.png", head=0.5)
    with pytest.raises(TypeError, match="AttentionRecorder"):
        plot_attention(rec.records[0].weights, tmp_path / "x.png")
    with record_attention(model, weights=False) as buckets_only:
        with torch.no_grad():
            model(torch.randint(0, 32, (1, 20)))
    assert plot_attention(buckets_only, tmp_path / "strip.png").stat().st_size > 0


def test_missing_matplotlib_names_the_bench_extra(tmp_path, monkeypatch):
    weights = torch.eye(4).expand(1, 1, 4, 4)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"'bench' extra.*reformer-attention\[bench\]"):
        plot_attention(record(weights, torch.zeros(1, 1, 1, 4, dtype=torch.long)), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
