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


# ------------------------------------------------------------------ published Nemotron-H shapes

# Parameter totals as transformers counts them (embeddings and lm_head separately, every norm).
PUBLISHED_COUNTS = {"nemotron-h-4b": 4_489_223_040, "nemotron-h-47b": 46_791_554_816}
PUBLISHED = [name for name in sorted(PRESETS) if name != "tiny"]


def attention_layers(pattern: str) -> list[int]:
    return [i for i, c in enumerate(pattern) if c == "*"]


@pytest.mark.parametrize("name", sorted(PUBLISHED_COUNTS))
def test_published_parameter_counts(name):
    from hybridlm.compress.pruning import param_count
    from hybridlm.model.lm import count_params
    cfg = preset(name)
    assert count_params(cfg) == PUBLISHED_COUNTS[name]    # the model built on the meta device
    assert param_count(cfg) == PUBLISHED_COUNTS[name]     # the per-layer analytic count


def test_56b_attention_layers_are_where_nvidia_put_them():
    p = preset("nemotron-h-56b").pattern
    assert len(p) == 118 and [p.count(c) for c in "M-*"] == [54, 54, 10]
    assert attention_layers(p) == [7 + 11 * k for k in range(10)] == [7, 18, 29, 40, 51, 62, 73, 84, 95, 106]
    assert all(p[i - 1:i + 2] == "M*-" for i in attention_layers(p))
    # everything else alternates Mamba / MLP, starting and ending the same way as the 8B
    assert p.replace("*", "") == "M-" * 54 and p.startswith("M-M-M-M*-") and p.endswith("M-M-M-M-M-")


def test_47b_is_the_pruned_56b():
    p47, p56 = preset("nemotron-h-47b").pattern, preset("nemotron-h-56b").pattern
    assert len(p47) == 98 and [p47.count(c) for c in "M-*"] == [45, 48, 5]
    assert attention_layers(p47) == [17, 38, 49, 60, 86] and "M---MM---M" in p47
    same = ("d_model", "n_heads", "n_kv_heads", "head_dim", "ssm_state", "mamba_heads", "mamba_head_dim", "n_groups")
    a, b = preset("nemotron-h-47b"), preset("nemotron-h-56b")
    assert all(getattr(a, f) == getattr(b, f) for f in same) and (a.ffn_dim, b.ffn_dim) == (30720, 32768)
    assert len(p56) - len(p47) == 20


def test_4b_is_the_8b_narrowed():
    a, b = preset("nemotron-h-4b"), preset("nemotron-h-8b")
    assert a.pattern == b.pattern and attention_layers(a.pattern) == [7, 18, 29, 40]
    assert (a.d_model, a.ffn_dim, a.mamba_heads) == (3072, 12288, 112)
    assert (b.d_model, b.ffn_dim, b.mamba_heads) == (4096, 21504, 128)


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_presets_clamp_dt_like_an_imported_checkpoint(name):
    cfg = preset(name)
    assert cfg.time_step_limit == (cfg.time_step_min, math.inf) and cfg.time_step_min == 0.001


def test_published_special_tokens():
    for name in PUBLISHED:
        cfg = preset(name)
        assert (cfg.bos_token_id, cfg.eos_token_id) == (1, 2), name
    assert preset("nemotron-nano-9b-v2").pad_token_id == 12
    assert {preset(n).pad_token_id for n in PUBLISHED if n != "nemotron-nano-9b-v2"} == {0}
