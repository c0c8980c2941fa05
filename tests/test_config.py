"""HybridConfig validation, serialisation and presets."""

import math

import pytest

from hybridlm.config import PRESETS, HybridConfig, preset


@pytest.mark.parametrize("changes,match", [
    (dict(pattern="M-X*"), "unknown layer letter"),
    (dict(pattern=""), "pattern is empty"),
    (dict(n_heads=6, n_kv_heads=4), "divisible by n_kv_heads"),
    (dict(mamba_heads=6, n_groups=4), "divisible by n_groups"),
    (dict(d_model=0), "d_model must be a positive integer"),
    (dict(ffn_dim=-3), "ffn_dim must be a positive integer"),
    (dict(chunk_size=2.5), "chunk_size must be a positive integer"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(time_step_min=0.5, time_step_max=0.1), "time_step_min"),
    (dict(eos_token_id=5000), "outside the vocabulary"),
])
def test_validation_errors(changes, match):
    with pytest.raises(ValueError, match=match):
        preset("tiny", **changes)


def test_mamba_heads_default_from_expand():
    cfg = HybridConfig(d_model=128, expand=2, mamba_head_dim=32, n_groups=2)
    assert cfg.mamba_heads == 8 and cfg.d_inner == 256


def test_save_load_round_trip(tmp_path):
    cfg = preset("nemotron-h-8b")
    cfg.save(tmp_path / "c.json")
    back = HybridConfig.load(tmp_path / "c.json")
    assert back == cfg and math.isinf(back.time_step_limit[1])


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        HybridConfig.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HybridConfig.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown HybridConfig field"):
        HybridConfig.from_dict({"d_model": 64, "dmodel": 3})


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt-5")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid(name):
    cfg = preset(name)
    assert cfg.n_layers == len(cfg.pattern) and cfg.conv_dim == cfg.d_inner + 2 * cfg.n_groups * cfg.ssm_state
