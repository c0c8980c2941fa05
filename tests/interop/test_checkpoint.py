"""Checkpoint save/load round trip and clear errors on bad files."""

import json

import pytest
import torch
from safetensors.torch import save_file

from hybridlm.interop.checkpoint import load_model, save_model

from helpers import small_model


def test_round_trip_exact(tmp_path):
    model = small_model()
    save_model(model, tmp_path / "ck")
    back = load_model(tmp_path / "ck")
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")
    save_model(small_model(), tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        load_model(tmp_path / "ck")


def test_corrupt_weights(tmp_path):
    save_model(small_model(), tmp_path / "ck")
    f = tmp_path / "ck" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_model(tmp_path / "ck")


def test_corrupt_or_foreign_config(tmp_path):
    save_model(small_model(), tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_model(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text(json.dumps({"model_type": "nemotron_h"}))
    with pytest.raises(ValueError, match="pass --hf DIR"):
        load_model(tmp_path / "ck")


def test_wrong_shape_and_missing_tensor(tmp_path):
    model = small_model()
    save_model(model, tmp_path / "ck")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["backbone.layers.0.mixer.in_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"wrong tensor shape.*layers\.0\.mixer\.in_proj\.weight"):
        load_model(tmp_path / "ck")
    del sd["backbone.layers.0.mixer.in_proj.weight"]
    save_file(sd, str(tmp_path / "ck" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \['backbone\.layers\.0\.mixer\.in_proj\.weight'\]"):
        load_model(tmp_path / "ck")
