"""ReformerLM.save_pretrained / from_pretrained: config.json + model.safetensors round trip."""
import json

import pytest
import torch
from safetensors.torch import load_file

from reformer import ReformerConfig, ReformerLM

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(vocab_size=32, d_model=32, n_heads=4, depth=2, d_ff=64, max_seq_len=48, bucket_size=4, n_hashes=2,
            ff_chunks=3)


@pytest.mark.parametrize("overrides", [
    dict(attention="lsh", axial_shape=(6, 8), seed=3, n_buckets=(2, 4)),
    dict(attention="lsh", seed=4, n_buckets=(2, 4, 2)),
    dict(attention="lsh", seed=5, causal_mode="chunk", reversible=False),
    dict(attention="full"),
])
def test_round_trip_gives_identical_outputs(tmp_path, overrides):
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(**TINY, **overrides)).eval()
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["model_type"] == "ReformerLM" and saved["n_buckets"] == model.config.to_dict()["n_buckets"]
    assert set(load_file(tmp_path / "m" / "model.safetensors")) == set(model.state_dict())
    loaded = ReformerLM.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    tokens = torch.randint(0, 32, (2, 20))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_config_to_dict_round_trips_tuples():
    config = ReformerConfig(**TINY, axial_shape=(6, 8), n_buckets=(2, 4))
    data = json.loads(json.dumps(config.to_dict()))
    assert data["axial_shape"] == [6, 8] and data["n_buckets"] == [2, 4]
    assert ReformerConfig(**data) == config


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ReformerLM.from_pretrained(tmp_path)
    model = ReformerLM(ReformerConfig(**TINY, attention="full"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "colour": "red"}))
    with pytest.raises(ValueError, match=r"unknown ReformerConfig fields \['colour'\]"):
        ReformerLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "ReformerEncDec"}))
    with pytest.raises(ValueError, match="holds a ReformerEncDec, not a ReformerLM"):
        ReformerLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_model": 64}))
    with pytest.raises(RuntimeError):  # the weights do not fit the config
        ReformerLM.from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        ReformerLM.from_pretrained(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        model.save_pretrained(tmp_path / "file")
