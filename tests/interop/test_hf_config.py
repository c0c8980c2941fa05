"""HF config mapping of the presets and of configs written for NVIDIA's remote code (``auto_map``)."""

import json

import pytest
import torch

from hybridlm.config import PRESETS, preset
from hybridlm.interop.hf_config import config_json, hf_config_to_hybrid, hybrid_to_hf_config, read_hf_config
from hybridlm.model.lm import count_params

# nvidia/Nemotron-H-8B-Base-8K config.json, as written for NVIDIA's remote code (auto_map); the same
# values as Megatron-Bridge's NemotronHBridge test fixture, plus the dt keys of the checkpoint.
PUBLISHED_8B = {
    "architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attention_head_dim": 128,
    "auto_map": {"AutoConfig": "configuration_nemotron_h.NemotronHConfig",
                 "AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"},
    "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2, "hidden_act": "relu2",
    "hidden_dropout": 0.0, "hidden_size": 4096,
    "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
    "initializer_range": 0.02, "intermediate_size": 21504, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
    "mamba_hidden_act": "silu", "mamba_num_heads": 128, "mamba_proj_bias": False, "max_position_embeddings": 8192,
    "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h", "n_groups": 8,
    "num_attention_heads": 32, "num_hidden_layers": 52, "num_key_value_heads": 8, "num_logits_to_keep": 1,
    "pad_token_id": 0, "rescale_prenorm_residual": True, "residual_in_fp32": False, "rms_norm_eps": 1e-05,
    "ssm_state_size": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.48.0.dev0", "use_bias": False, "use_cache": True, "use_conv_bias": True,
    "use_mamba_kernels": True, "vocab_size": 131072, "time_step_floor": 0.0001, "time_step_max": 0.1,
    "time_step_min": 0.001, "time_step_limit": [0.0, {"__float__": "Infinity"}],
}
# What export writes differently on purpose: the version of the writer, and the dt clamp that
# transformers' modeling applies (time_step_min, inf) in place of the unused stored time_step_limit.
REWRITTEN = {"transformers_version", "time_step_limit"}


def through_json(d: dict) -> dict:
    return json.loads(config_json(d))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_survive_export_and_import(name):
    cfg = preset(name)
    hf = through_json(hybrid_to_hf_config(cfg, torch.bfloat16))
    back = hf_config_to_hybrid(hf)
    assert back == cfg and back.time_step_limit == cfg.time_step_limit
    if name != "tiny":  # a published checkpoint: one dt number, no hybridlm-only key
        assert hf["time_step_min"] == 0.001 and hf["time_step_limit"] == [0.001, {"__float__": "Infinity"}]
        assert not any(k.startswith("hybridlm") for k in hf)


def test_published_8b_config_imports_to_the_preset():
    plain = {k: v for k, v in PUBLISHED_8B.items() if k != "auto_map"}
    assert hf_config_to_hybrid(plain) == preset("nemotron-h-8b")          # every field, extra == {}
    remote = hf_config_to_hybrid(PUBLISHED_8B)
    assert remote.replace(extra={}) == preset("nemotron-h-8b")


def test_remote_code_config_keeps_its_keys(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_8B))
    cfg = read_hf_config(tmp_path)
    # kept even where they equal transformers' defaults: NVIDIA's code has its own
    assert cfg.extra["auto_map"] == PUBLISHED_8B["auto_map"]
    assert {"use_cache", "num_logits_to_keep", "rescale_prenorm_residual", "residual_in_fp32",
            "use_mamba_kernels", "hidden_act", "hidden_dropout"} <= set(cfg.extra)
    out = through_json(hybrid_to_hf_config(cfg, torch.bfloat16))
    missing = {k for k in PUBLISHED_8B if k not in out and k not in REWRITTEN}
    assert not missing, f"export dropped {sorted(missing)}"
    changed = {k for k in PUBLISHED_8B if k in out and k not in REWRITTEN and out[k] != PUBLISHED_8B[k]}
    assert not changed, f"export changed {sorted(changed)}"
    assert out["time_step_limit"] == [0.001, {"__float__": "Infinity"}]
    assert hf_config_to_hybrid(out) == cfg                                 # and again: a fixed point


def test_without_auto_map_defaults_are_not_repeated():
    plain = {k: v for k, v in PUBLISHED_8B.items() if k != "auto_map"}
    out = hybrid_to_hf_config(hf_config_to_hybrid(plain))
    assert "auto_map" not in out and "use_cache" not in out and "hidden_act" not in out
    # an unknown key is kept with or without remote code
    cfg = hf_config_to_hybrid({**plain, "rope_theta": 10000})
    assert cfg.extra == {"rope_theta": 10000} and hybrid_to_hf_config(cfg)["rope_theta"] == 10000


def test_4b_count_matches_transformers():
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "NemotronHForCausalLM"):
        pytest.skip("this transformers has no nemotron_h")
    cfg = preset("nemotron-h-4b")
    hf = {k: v for k, v in hybrid_to_hf_config(cfg).items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        theirs = tf.NemotronHForCausalLM(tf.NemotronHConfig(**hf))
    assert sum(p.numel() for p in theirs.parameters()) == count_params(cfg) == 4_489_223_040
