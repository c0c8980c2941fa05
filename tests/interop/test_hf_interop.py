"""Hugging Face Nemotron-H interop: logits against transformers both ways, configs, files, errors."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridlm.config import HybridConfig, preset
from hybridlm.interop.checkpoint import load_model, save_model
from hybridlm.interop.convert import convert, detect_format, load
from hybridlm.interop.hf_config import _HF_DEFAULTS, hf_config_to_hybrid, hybrid_to_hf_config, read_hf_config
from hybridlm.interop.hf_weights import INDEX_NAME, load_hf_dir, save_hf_dir
from hybridlm.model import HybridLM

TOL = 1e-4
VOCAB = 101
SEQ = 13  # not a multiple of CHUNK
CHUNK = 5


def transformers_nemotron_h():
    tf = pytest.importorskip("transformers")
    if not hasattr(tf, "NemotronHForCausalLM"):
        pytest.skip("this transformers has no nemotron_h")
    return tf


def tiny_config(**overrides) -> HybridConfig:
    base = dict(vocab_size=VOCAB, d_model=32, pattern="M*-M-*M-", n_heads=4, n_kv_heads=2, head_dim=8,
                ffn_dim=48, ssm_state=8, mamba_head_dim=8, mamba_heads=8, n_groups=2, chunk_size=CHUNK,
                init_std=0.1, max_seq_len=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return HybridConfig(**{**base, **overrides})


@torch.no_grad()
def randomize_ssm_and_norms(model: torch.nn.Module, seed: int = 1) -> None:
    """Move dt_bias / A_log / D / norm weights / biases away from their (structured) init."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("dt_bias", "A_log", "D", "norm.weight", "norm_f.weight", "bias")):
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def tiny_model(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(tiny_config(**overrides))
    randomize_ssm_and_norms(model, seed + 1)
    return model.eval()


def batch(seed: int = 2, length: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- logits against transformers ------------------------------------------------------------
@pytest.mark.parametrize("attn,dt_clamp", [("eager", 0.0), ("sdpa", 0.05)])
def test_export_matches_transformers(tmp_path, attn, dt_clamp):
    tf = transformers_nemotron_h()
    ours = tiny_model(tie_embeddings=True, mamba_proj_bias=True, mlp_bias=True,
                      time_step_limit=(dt_clamp, math.inf))
    save_hf_dir(ours, tmp_path / "hf")
    theirs = tf.NemotronHForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation=attn).eval()
    assert theirs.model.layers[0].mixer.time_step_limit == (dt_clamp, math.inf)
    assert torch.equal(theirs.lm_head.weight, ours.backbone.embeddings.weight)  # tied -> copy written
    ids = batch()
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.abs().max() > 1.0  # logits large enough for the tolerance to mean something
    assert max_diff(a, b) < TOL
    if dt_clamp > 0:  # the clamp is active here: without it the logits move
        free = HybridLM(ours.cfg.replace(time_step_limit=(0.0, math.inf))).eval()
        free.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert max_diff(free(ids), a) > 1e-3


def test_incremental_decoding_matches_transformers_cache(tmp_path):
    tf = transformers_nemotron_h()
    ours = tiny_model(seed=3)
    save_hf_dir(ours, tmp_path / "hf")
    theirs = tf.NemotronHForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = batch(length=SEQ + 4)
    with torch.no_grad():
        out = theirs(ids[:, :SEQ], use_cache=True)
        past, hf_steps = out.past_key_values, [out.logits]
        cache = ours.new_cache(2, 32)
        our_steps = [ours(ids[:, :SEQ], cache=cache)]
        for t in range(SEQ, ids.shape[1]):
            o = theirs(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = o.past_key_values
            hf_steps.append(o.logits)
            our_steps.append(ours(ids[:, t:t + 1], cache=cache))
    for a, b in zip(our_steps, hf_steps):
        assert max_diff(a, b) < TOL


def random_transformers_model(tf, **overrides):
    torch.manual_seed(5)
    kw = dict(vocab_size=VOCAB, hidden_size=32, hybrid_override_pattern="M*-M-*M-", num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, intermediate_size=48, ssm_state_size=8, mamba_num_heads=8,
              mamba_head_dim=8, n_groups=2, chunk_size=CHUNK, use_bias=True, mlp_bias=True,
              tie_word_embeddings=True, initializer_range=0.1, time_step_min=0.01, layer_norm_epsilon=1e-6)
    model = tf.NemotronHForCausalLM(tf.NemotronHConfig(**{**kw, **overrides})).eval()
    randomize_ssm_and_norms(model, 6)
    return model


def test_import_matches_transformers(tmp_path):
    tf = transformers_nemotron_h()
    theirs = random_transformers_model(tf)
    theirs.save_pretrained(tmp_path / "hf", max_shard_size="20KB")  # sharded, with an index
    assert (tmp_path / "hf" / INDEX_NAME).is_file()
    ours = load_hf_dir(tmp_path / "hf")
    cfg = ours.cfg
    assert (cfg.pattern, cfg.n_groups, cfg.chunk_size, cfg.norm_eps) == ("M*-M-*M-", 2, CHUNK, 1e-6)
    assert cfg.time_step_limit == (0.01, math.inf) and cfg.mamba_proj_bias and cfg.mlp_bias
    # transformers 5 does not tie Nemotron-H's lm_head even with tie_word_embeddings=True
    assert not cfg.tie_embeddings
    ids = batch()
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    assert a.abs().max() > 1.0
    assert max_diff(a, b) < TOL


def test_import_ties_when_lm_head_absent_or_equal(tmp_path):
    tf = transformers_nemotron_h()
    theirs = random_transformers_model(tf)
    with torch.no_grad():
        theirs.lm_head.weight.copy_(theirs.model.embeddings.weight)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load_hf_dir(tmp_path / "hf")
    assert ours.cfg.tie_embeddings and ours.lm_head.weight is ours.backbone.embeddings.weight
    f = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(f)
    del tensors["lm_head.weight"]
    save_file(tensors, f, metadata={"format": "pt"})
    again = load_hf_dir(tmp_path / "hf")
    ids = batch()
    with torch.no_grad():
        assert again.cfg.tie_embeddings and max_diff(again(ids), theirs(ids).logits) < TOL


# ---- configs --------------------------------------------------------------------------------
def test_both_layout_forms_and_aliases_parse_the_same():
    cfg = tiny_config()
    hf = hybrid_to_hf_config(cfg)
    as_pattern = {k: v for k, v in hf.items() if k != "layers_block_type"}
    as_list = {k: v for k, v in hf.items() if k != "hybrid_override_pattern"}
    legacy = {**as_list, "layers_block_type": None,
              "layer_types": ["mamba" if t == "linear_attention" else "attention" if t == "full_attention" else t
                              for t in hf["layers_block_type"]]}
    aliased = dict(as_pattern)
    for field, alias in [("n_groups", "mamba_n_groups"), ("conv_kernel", "mamba_d_conv"),
                         ("expand", "mamba_expand"), ("chunk_size", "mamba_chunk_size"),
                         ("use_conv_bias", "mamba_conv_bias"), ("time_step_min", "mamba_dt_min"),
                         ("time_step_max", "mamba_dt_max"), ("time_step_floor", "mamba_dt_init_floor"),
                         ("head_dim", "attention_head_dim"), ("layer_norm_epsilon", "rms_norm_eps")]:
        aliased[alias] = aliased.pop(field)
    parsed = [hf_config_to_hybrid(d) for d in (hf, as_pattern, as_list, legacy, aliased)]
    assert all(p == cfg for p in parsed)


def test_round_trips():
    cfg = tiny_config(tie_embeddings=True, mamba_proj_bias=True, conv_bias=False, time_step_min=0.002,
                      time_step_limit=(0.0, math.inf), bos_token_id=None, norm_eps=1e-6,
                      extra={"rope_theta": 1.0, "notes": "x"})
    hf = hybrid_to_hf_config(cfg, torch.bfloat16)
    assert hf["architectures"] == ["NemotronHForCausalLM"] and hf["model_type"] == "nemotron_h"
    assert hf["hybrid_override_pattern"] == cfg.pattern and hf["torch_dtype"] == "bfloat16"
    assert hf["layers_block_type"][:3] == ["linear_attention", "full_attention", "mlp"]
    assert hf["time_step_min"] == 0.0 and hf["use_bias"] is True and hf["rope_theta"] == 1.0
    assert hf_config_to_hybrid(json.loads(json.dumps(hf))) == cfg
    plain = tiny_config()
    assert hf_config_to_hybrid(hybrid_to_hf_config(plain)) == plain


def test_transformers_config_round_trip_and_defaults(tmp_path):
    tf = transformers_nemotron_h()
    # our table of NemotronHConfig defaults is the real one
    defaults = tf.NemotronHConfig.__dataclass_fields__
    for key, value in _HF_DEFAULTS.items():
        if key == "mtp_layers_block_type":
            continue  # None in the dataclass, filled in __post_init__
        assert list(value) == list(defaults[key].default) if isinstance(value, tuple) \
            else value == defaults[key].default, key
    assert tf.NemotronHConfig().mtp_layers_block_type == _HF_DEFAULTS["mtp_layers_block_type"]
    # hf -> hybrid -> hf gives transformers the same config
    original = tf.NemotronHConfig(vocab_size=VOCAB, hidden_size=32, layers_block_type=["linear_attention", "mlp"],
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, mamba_num_heads=8,
                                  mamba_head_dim=8, ssm_state_size=8, n_groups=2, mamba_ssm_cache_dtype="bfloat16",
                                  eos_token_id=[2, 3])
    original.save_pretrained(tmp_path)
    cfg = read_hf_config(tmp_path)
    assert cfg.eos_token_id == 2 and cfg.extra == {"mamba_ssm_cache_dtype": "bfloat16"}
    back = tf.NemotronHConfig(**hybrid_to_hf_config(cfg))
    # eos: only the first id is kept; time_step_limit: unused by transformers' modeling, we write
    # the effective clamp (time_step_min, inf); attention_head_dim / rms_norm_eps: legacy spellings
    skip = {"eos_token_id", "dtype", "transformers_version", "architectures", "time_step_limit",
            "attention_head_dim", "rms_norm_eps"}
    a, b = original.to_dict(), back.to_dict()
    assert {k: v for k, v in a.items() if k not in skip} == {k: v for k, v in b.items() if k not in skip}


def test_published_8b_config_parses_to_the_preset():
    # nvidia/Nemotron-H-8B-Base-8K config.json (remote-code era: attention_head_dim, rms_norm_eps, num_hidden_layers)
    d = {"architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
         "attention_head_dim": 128, "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2,
         "expand": 2, "hidden_act": "relu2", "hidden_dropout": 0.0, "hidden_size": 4096,
         "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
         "initializer_range": 0.02, "intermediate_size": 21504, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
         "mamba_hidden_act": "silu", "mamba_num_heads": 128, "mamba_proj_bias": False,
         "max_position_embeddings": 8192, "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h",
         "n_groups": 8, "num_attention_heads": 32, "num_hidden_layers": 52, "num_key_value_heads": 8,
         "num_logits_to_keep": 1, "pad_token_id": 0, "rescale_prenorm_residual": True, "residual_in_fp32": False,
         "rms_norm_eps": 1e-05, "ssm_state_size": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
         "use_bias": False, "use_cache": True, "use_conv_bias": True, "use_mamba_kernels": True,
         "vocab_size": 131072, "time_step_min": 0.001, "time_step_limit": [0.0, float("inf")]}
    cfg = hf_config_to_hybrid(d)
    ref = preset("nemotron-h-8b")
    for name in ("vocab_size", "d_model", "pattern", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "ssm_state",
                 "mamba_head_dim", "mamba_heads", "n_groups", "chunk_size", "max_seq_len", "bos_token_id",
                 "eos_token_id", "pad_token_id", "tie_embeddings"):
        assert getattr(cfg, name) == getattr(ref, name), name
    assert cfg.time_step_limit == (0.001, math.inf) and cfg.extra == {}
    with pytest.warns(UserWarning, match="num_hidden_layers=50 but the layer layout has 52"):
        hf_config_to_hybrid({**d, "num_hidden_layers": 50})


@pytest.mark.parametrize("change,message", [
    ({"hybrid_override_pattern": "M-E*"}, "MoE layers are not supported yet"),
    ({"layers_block_type": ["linear_attention", "moe"]}, "MoE layers are not supported yet"),
    ({"layers_block_type": ["linear_attention", "cross_attention"]}, "unknown layer type"),
    ({"hybrid_override_pattern": "M-X"}, "unknown layer letter"),
    ({"layers_block_type": ["mlp"], "hybrid_override_pattern": "M"}, "layouts disagree"),
    ({"mlp_hidden_act": "gelu"}, "mlp_hidden_act='gelu' is not supported"),
    ({"mamba_hidden_act": "relu"}, "mamba_hidden_act='relu' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"model_type": "llama"}, "model_type 'llama'"),
    ({"mamba_n_groups": 4}, "conflicting values.*n_groups=2, mamba_n_groups=4"),
    ({"num_key_value_heads": 3}, "n_heads \\(4\\) must be divisible by n_kv_heads \\(3\\)"),
])
def test_config_errors(change, message):
    d = {**hybrid_to_hf_config(tiny_config()), **change}
    if "hybrid_override_pattern" in change or "layers_block_type" in change:
        d = {k: v for k, v in d.items() if k in change or k not in ("hybrid_override_pattern", "layers_block_type")}
    with pytest.raises(ValueError, match=message):
        hf_config_to_hybrid(d)


def test_export_rejects_what_transformers_cannot_express():
    with pytest.raises(ValueError, match="attention_bias=True cannot be exported"):
        hybrid_to_hf_config(tiny_config(attention_bias=True))
    with pytest.raises(ValueError, match="no upper bound"):
        hybrid_to_hf_config(tiny_config(time_step_limit=(0.0, 10.0)))


# ---- files ----------------------------------------------------------------------------------
def test_sharded_round_trip_and_stale_files(tmp_path):
    model = tiny_model(tie_embeddings=True)
    out = save_hf_dir(model, tmp_path / "hf", max_shard_bytes=8_000)
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    assert "lm_head.weight" in index["weight_map"] and not (out / "model.safetensors").exists()
    back = load_hf_dir(out)
    ids = batch()
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert back.cfg == model.cfg and back.lm_head.weight is back.backbone.embeddings.weight
    assert not list(out.glob("*.tmp"))
    save_hf_dir(model, out)  # unsharded over the sharded save: the shards and index go away
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_hf_dir(out).lm_head.weight, model.lm_head.weight)


def test_accepts_model_prefix_ignores_mtp_and_keeps_dtype(tmp_path):
    model = tiny_model().to(torch.bfloat16)
    save_hf_dir(model, tmp_path)
    f = tmp_path / "model.safetensors"
    tensors = {k.replace("backbone.", "model.", 1): v for k, v in load_file(f).items()}
    tensors["mtp.layers.0.norm.weight"] = torch.ones(3)
    save_file(tensors, f, metadata={"format": "pt"})
    back = load_hf_dir(tmp_path)
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    assert load_hf_dir(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_hf_dir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_dir(tmp_path / "empty")
    d = save_hf_dir(tiny_model(), tmp_path / "hf")
    f = d / "model.safetensors"
    good = f.read_bytes()

    f.unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf_dir(d)
    f.write_bytes(good[:1000])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        load_hf_dir(d)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_hf_dir(d)

    f.write_bytes(good)
    tensors = load_file(f)
    wrong = dict(tensors, **{"backbone.layers.0.mixer.A_log": torch.zeros(5)})
    save_file(wrong, f)
    with pytest.raises(ValueError, match=r"wrong tensor shape.*layers\.0\.mixer\.A_log: file \(5,\) vs model \(8,\)"):
        load_hf_dir(d)
    missing = {k: v for k, v in tensors.items() if k != "backbone.layers.1.mixer.q_proj.weight"}
    save_file(missing, f)
    with pytest.raises(ValueError, match=r"missing \['backbone.layers.1.mixer.q_proj.weight'\]"):
        load_hf_dir(d)
    twice = dict(tensors, **{"model.norm_f.weight": tensors["backbone.norm_f.weight"].clone()})
    save_file(twice, f)
    with pytest.raises(ValueError, match="'backbone.norm_f.weight' is stored twice"):
        load_hf_dir(d)

    save_file(tensors, f)
    cfg = json.loads((d / "config.json").read_text())
    moe = {**cfg, "layers_block_type": cfg["layers_block_type"][:2] + ["moe"] + cfg["layers_block_type"][2:]}
    del moe["hybrid_override_pattern"]
    (d / "config.json").write_text(json.dumps(moe))
    with pytest.raises(ValueError, match="config.json: .*MoE layers are not supported yet"):
        load_hf_dir(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_hf_dir(d)


def test_shard_index_errors(tmp_path):
    d = save_hf_dir(tiny_model(), tmp_path / "hf", max_shard_bytes=8_000)
    index = json.loads((d / INDEX_NAME).read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard file\\(s\\) missing .*{victim}"):
        load_hf_dir(d)
    (d / INDEX_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"has shard files .* but no {INDEX_NAME}"):
        load_hf_dir(d)


def test_convert_both_ways(tmp_path):
    model = tiny_model(tie_embeddings=True)
    save_model(model, tmp_path / "ours")
    (tmp_path / "ours" / "tokenizer.json").write_text("{}")
    assert detect_format(tmp_path / "ours") == "hybridlm"
    with pytest.warns(UserWarning, match="not writing .*tokenizer_config.json: .* is not a valid tokenizer.json"):
        convert(tmp_path / "ours", tmp_path / "hf")
    assert detect_format(tmp_path / "hf") == "hf" and (tmp_path / "hf" / "tokenizer.json").is_file()
    with pytest.warns(UserWarning, match="not writing"):  # still no valid tokenizer.json to describe
        convert(tmp_path / "hf", tmp_path / "back", to="hybridlm")
    back = load_model(tmp_path / "back")
    ids = batch()
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    assert back.cfg == model.cfg
    with pytest.raises(ValueError, match="is the source directory"):
        convert(tmp_path / "hf", tmp_path / "hf", to="hf")
    with pytest.raises(ValueError, match="unknown target format"):
        convert(tmp_path / "hf", tmp_path / "x", to="onnx")
    save_model(model.to(torch.bfloat16), tmp_path / "bf16")
    convert(tmp_path / "bf16", tmp_path / "hf16")  # the stored dtype is kept
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_hf_dir(tmp_path / "hf16").lm_head.weight.dtype == torch.bfloat16
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        convert(tmp_path / "llama", tmp_path / "y")


def test_load_opens_either_format(tmp_path):
    import hybridlm

    model = tiny_model(seed=4)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    save_model(model, tmp_path / "ours")
    with torch.no_grad():
        want = model(ids)
    save_hf_dir(model.to(torch.bfloat16), tmp_path / "hf")  # (in place: `model` is bf16 from here on)
    ours, hf = load(tmp_path / "ours"), hybridlm.load(tmp_path / "hf")
    assert ours.lm_head.weight.dtype == torch.float32 and hf.lm_head.weight.dtype == torch.bfloat16
    assert not ours.training and not hf.training
    with torch.no_grad():
        assert torch.equal(ours(ids), want) and torch.equal(hf(ids), model(ids))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither a hybridlm config"):
        load(tmp_path / "other")
