"""Hugging Face `NemotronHConfig` <-> `HybridConfig`.

Config mapping (`hf_config_to_hybrid` / `hybrid_to_hf_config`) follows what transformers'
modeling code *does*, which is not always what a field's name suggests:

* the layer layout comes from ``layers_block_type`` / ``layer_types`` (also the legacy
  ``"mamba"`` / ``"attention"`` names) or the ``hybrid_override_pattern`` string; MoE layers
  (``"moe"`` / ``E``) are rejected;
* the ``mamba_*`` spellings (``mamba_n_groups``, ``mamba_d_conv``, ``mamba_expand``,
  ``mamba_chunk_size``, ``mamba_conv_bias``, ``mamba_dt_min``, ...), ``attention_head_dim``
  and ``rms_norm_eps`` are accepted as aliases; an alias that contradicts its field is an error;
* the Mamba in/out projections get a bias from ``use_bias`` (``mamba_proj_bias`` is unused by
  transformers); attention never has biases there, so ``attention_bias=True`` is rejected;
* transformers clamps dt to ``(time_step_min, inf)`` and ignores ``time_step_limit``, so import
  sets ``time_step_limit = (time_step_min, inf)`` and export writes
  ``time_step_min = time_step_limit[0]`` (0.0 by default: `from_pretrained` handles that, but a
  fresh ``NemotronHForCausalLM(config)`` fails in its dt init with ``log(0)``). Our separate dt
  init lower bound travels as ``hybridlm_time_step_min`` when it differs;
* missing keys take `NemotronHConfig`'s defaults; keys that matter for nothing here but differ
  from those defaults are kept in `HybridConfig.extra` and written back on export. A config
  written for NVIDIA's remote code (it has ``auto_map``) keeps every such key, default or not,
  and ``auto_map`` itself: that code has defaults of its own, so a key left out would change
  the model it builds (the ``*.py`` files ``auto_map`` names must travel with the export);
* ``tie_word_embeddings``: transformers 5 never ties Nemotron-H's ``lm_head``, it loads it
  from the file. Export therefore always writes ``lm_head.weight`` (and the flag as is); import
  ties only when the flag is set and ``lm_head.weight`` is absent or equal to the embeddings
  (`hf_weights`).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch

from ..config import HybridConfig
from .checkpoint import CONFIG_NAME
from .files import read_json_file, require_dir

HF_MODEL_TYPE = "nemotron_h"
HF_ARCHITECTURE = "NemotronHForCausalLM"

_LAYER_TYPE_TO_CHAR = {"linear_attention": "M", "mamba": "M", "full_attention": "*",
                       "attention": "*", "mlp": "-", "moe": "E"}
_CHAR_TO_LAYER_TYPE = {"M": "linear_attention", "*": "full_attention", "-": "mlp"}

# `NemotronHConfig` defaults (transformers 5.23) for the keys read here or compared against.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 4096, "tie_word_embeddings": False, "use_cache": True,
    "num_logits_to_keep": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 4096, "attention_bias": False, "attention_dropout": 0.0,
    "sliding_window": None, "intermediate_size": 21504, "mlp_hidden_act": "relu2", "mlp_bias": False,
    "use_mamba_kernels": True, "ssm_state_size": 128, "mamba_num_heads": 128, "mamba_head_dim": 64,
    "mamba_hidden_act": "silu", "n_groups": 8, "conv_kernel": 4, "expand": 2, "time_step_min": 0.001,
    "time_step_max": 0.1, "time_step_limit": (0.0, math.inf), "time_step_floor": 1e-4,
    "use_conv_bias": True, "chunk_size": 128, "mamba_proj_bias": False, "mamba_ssm_cache_dtype": "float32",
    "n_routed_experts": 8, "output_router_logits": False, "n_shared_experts": 1,
    "moe_intermediate_size": 7688, "moe_shared_expert_intermediate_size": 7688, "moe_latent_size": None,
    "moe_shared_expert_overlap": True, "num_experts_per_tok": 2, "routed_scaling_factor": 1.0,
    "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "num_nextn_predict_layers": 0,
    "mtp_layers_block_type": ["full_attention", "moe"], "use_bias": False, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-5, "residual_in_fp32": False, "hidden_dropout": 0.0,
    "rescale_prenorm_residual": True,
}
# field -> other spellings transformers (or older NVIDIA configs) use for it.
_ALIASES = {
    "n_groups": ("mamba_n_groups",), "conv_kernel": ("mamba_d_conv",), "expand": ("mamba_expand",),
    "time_step_min": ("mamba_dt_min",), "time_step_max": ("mamba_dt_max",),
    "time_step_limit": ("mamba_dt_limit",), "time_step_floor": ("mamba_dt_init_floor",),
    "use_conv_bias": ("mamba_conv_bias",), "chunk_size": ("mamba_chunk_size",),
    "head_dim": ("attention_head_dim",), "layer_norm_epsilon": ("rms_norm_eps",),
}
_INIT_MIN_KEY = "hybridlm_time_step_min"
# Keys that describe the file rather than the model, never kept in `extra`.
_BOOKKEEPING = {"architectures", "model_type", "transformers_version", "_name_or_path",
                "dtype", "torch_dtype", "num_hidden_layers", "_commit_hash", "hidden_act"}
# Present in configs for NVIDIA's remote code (``trust_remote_code``); it names that code's classes.
_REMOTE_CODE_KEY = "auto_map"
# Bookkeeping that NVIDIA's remote code still reads: kept when the config is for that code.
_REMOTE_CODE_KEEPS = {"hidden_act"}
_LAYOUT_KEYS = ("layers_block_type", "layer_types", "hybrid_override_pattern")


def _decode_float(value: Any, key: str) -> float:
    """A float from JSON: numbers, transformers' ``{"__float__": "Infinity"}`` tag, "inf" strings."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    if isinstance(value, str):
        try:
            return float(value)  # accepts "inf", "Infinity", "-inf", "nan"
        except ValueError:
            raise ValueError(f"HF config field {key!r}: expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"HF config field {key!r}: expected a number, got {value!r}")
    return float(value)


def _encode_float(x: float) -> float | dict[str, str]:
    """transformers' JSON spelling of non-finite floats."""
    if math.isinf(x):
        return {"__float__": "Infinity" if x > 0 else "-Infinity"}
    return x


def _layer_pattern(d: dict[str, Any]) -> str:
    """Pattern string from ``layers_block_type`` / ``layer_types`` or ``hybrid_override_pattern``."""
    layouts = {}
    for key in ("layers_block_type", "layer_types"):
        types = d.get(key)
        if types is None:
            continue
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ValueError(f"HF config field {key!r} must be a list of strings, got {types!r}")
        bad = sorted({t for t in types if t not in _LAYER_TYPE_TO_CHAR})
        if bad:
            raise ValueError(f"HF config field {key!r} has unknown layer type(s) {bad}; "
                             f"known: {sorted(_LAYER_TYPE_TO_CHAR)}")
        layouts[key] = "".join(_LAYER_TYPE_TO_CHAR[t] for t in types)
    pattern = d.get("hybrid_override_pattern")
    if pattern is not None:
        if not isinstance(pattern, str):
            raise ValueError(f"HF config field 'hybrid_override_pattern' must be a string, got {pattern!r}")
        bad = sorted(set(pattern) - {"M", "*", "-", "E"})
        if bad:
            raise ValueError(f"hybrid_override_pattern {pattern!r} has unknown layer letter(s) {bad}; "
                             "known: M (Mamba-2), * (attention), - (MLP), E (MoE)")
        layouts["hybrid_override_pattern"] = pattern
    if not layouts:
        raise ValueError("HF config has no layer layout: give 'hybrid_override_pattern' or 'layers_block_type'")
    if len(set(layouts.values())) > 1:
        raise ValueError("HF config layer layouts disagree: "
                         + ", ".join(f"{k} -> {v!r}" for k, v in layouts.items()))
    pattern = next(iter(layouts.values()))
    if "E" in pattern:
        raise ValueError(f"MoE layers are not supported yet: layer {pattern.index('E')} of {pattern!r} "
                         "is a mixture-of-experts ('moe' / 'E') layer")
    if not pattern:
        raise ValueError("HF config layer layout is empty")
    return pattern




class _Keys:
    """Reads fields of an HF config dict by name or alias (defaults for missing ones), remembering
    every key read, so what is left over can be kept in `HybridConfig.extra`."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.d = d
        self.remote_code = _REMOTE_CODE_KEY in d
        bookkeeping = _BOOKKEEPING - _REMOTE_CODE_KEEPS if self.remote_code else _BOOKKEEPING
        self.used: set[str] = set(bookkeeping) | set(_LAYOUT_KEYS) | {_INIT_MIN_KEY}

    def get(self, key: str) -> Any:
        names = [n for n in (key, *_ALIASES.get(key, ())) if n in self.d]
        self.used.update((key, *_ALIASES.get(key, ())))
        if not names:
            return _HF_DEFAULTS[key]
        values = [self.d[n] for n in names]
        if any(v != values[0] for v in values[1:]):
            raise ValueError("HF config has conflicting values for the same field: "
                             + ", ".join(f"{n}={self.d[n]!r}" for n in names))
        return values[0]

    def float(self, key: str) -> float:
        return _decode_float(self.get(key), key)

    def extra(self) -> dict[str, Any]:
        """Keys not read that differ from `NemotronHConfig`'s defaults (all keys not read, for a
        remote-code config: its code's defaults are not transformers')."""
        return {k: v for k, v in self.d.items() if k not in self.used
                and (self.remote_code or not (k in _HF_DEFAULTS and _same(v, _HF_DEFAULTS[k])))}


def hf_config_to_hybrid(d: dict[str, Any]) -> HybridConfig:
    """`HybridConfig` for a Nemotron-H ``config.json`` dict (either layout form, any alias).

    Raises ValueError for configs whose math this package does not implement (MoE layers,
    activations other than relu2 / silu, attention biases) or inconsistent values.
    """
    if not isinstance(d, dict):
        raise ValueError(f"HF config must be a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type is not None and model_type != HF_MODEL_TYPE:
        raise ValueError(f"HF config has model_type {model_type!r}; only {HF_MODEL_TYPE!r} "
                         "(NemotronHForCausalLM) is supported")
    pattern = _layer_pattern(d)
    n_layers = d.get("num_hidden_layers")
    if n_layers is not None and n_layers != len(pattern):
        warnings.warn(f"HF config num_hidden_layers={n_layers} but the layer layout has {len(pattern)} "
                      "layers; using the layout (as transformers does)", stacklevel=2)
    keys = _Keys(d)
    _check_supported(keys)
    fields = _hybrid_fields(keys, pattern)
    try:
        return HybridConfig(**fields, extra=keys.extra())
    except (TypeError, ValueError) as e:
        raise ValueError(f"HF config does not give a valid model: {e}") from None


def _check_supported(keys: _Keys) -> None:
    """ValueError for activations and biases whose math is not implemented here."""
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if keys.get(key) != want:
            raise ValueError(f"HF config {key}={keys.d[key]!r} is not supported (only {want!r})")
    if keys.get("attention_bias"):
        raise ValueError("HF config attention_bias=True is not supported: transformers' NemotronHAttention "
                         "builds q/k/v/o projections without biases, so the checkpoint is ambiguous")


def _hybrid_fields(keys: _Keys, pattern: str) -> dict[str, Any]:
    """The HybridConfig fields of an HF config (see the module docstring for the dt clamp)."""
    eos = keys.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    dt_clamp = keys.float("time_step_min")
    keys.get("time_step_limit")      # unused by transformers' modeling: the clamp is time_step_min
    keys.get("mamba_proj_bias")      # unused by transformers' modeling: the bias follows use_bias
    init_min = _decode_float(keys.d[_INIT_MIN_KEY], _INIT_MIN_KEY) if _INIT_MIN_KEY in keys.d else dt_clamp
    return dict(
        vocab_size=keys.get("vocab_size"), d_model=keys.get("hidden_size"), pattern=pattern,
        n_heads=keys.get("num_attention_heads"), n_kv_heads=keys.get("num_key_value_heads"),
        head_dim=keys.get("head_dim"), attention_bias=False, ffn_dim=keys.get("intermediate_size"),
        mlp_bias=bool(keys.get("mlp_bias")), ssm_state=keys.get("ssm_state_size"),
        mamba_head_dim=keys.get("mamba_head_dim"), mamba_heads=keys.get("mamba_num_heads"),
        n_groups=keys.get("n_groups"), expand=keys.get("expand"), conv_kernel=keys.get("conv_kernel"),
        conv_bias=bool(keys.get("use_conv_bias")), mamba_proj_bias=bool(keys.get("use_bias")),
        chunk_size=keys.get("chunk_size"), time_step_min=init_min, time_step_max=keys.float("time_step_max"),
        time_step_floor=keys.float("time_step_floor"), time_step_limit=(dt_clamp, math.inf),
        norm_eps=keys.float("layer_norm_epsilon"), tie_embeddings=bool(keys.get("tie_word_embeddings")),
        init_std=keys.float("initializer_range"), max_seq_len=keys.get("max_position_embeddings"),
        bos_token_id=keys.get("bos_token_id"), eos_token_id=eos, pad_token_id=keys.get("pad_token_id"),
    )

def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")



def _check_exportable(cfg: HybridConfig) -> None:
    """ValueError for what transformers' Nemotron-H cannot express."""
    if cfg.attention_bias:
        raise ValueError("attention_bias=True cannot be exported: transformers' NemotronHAttention "
                         "has no q/k/v/o biases")
    check_plain_nemotron_h(cfg, "transformers' Nemotron-H")


def check_plain_nemotron_h(cfg: HybridConfig, target: str) -> None:
    """ValueError for the options no Nemotron-H implementation outside hybridlm has: the stability
    norms / logit capping, and an upper dt clamp (they clamp dt to (time_step_min, inf) at most)."""
    if stability := cfg.stability_options():
        raise ValueError(f"training-stability options {stability} cannot be exported: {target} has no "
                         "QK/QKV/post-projection norms or logit capping")
    if not math.isinf(cfg.time_step_limit[1]):
        raise ValueError(f"time_step_limit={cfg.time_step_limit} cannot be exported: {target} clamps dt "
                         "to (time_step_min, inf) at most, with no upper bound")


def hybrid_to_hf_config(cfg: HybridConfig, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
    """The ``config.json`` dict transformers' `NemotronHConfig` loads into the same model.

    Raises ValueError for what transformers' Nemotron-H cannot express: attention biases,
    an upper dt clamp and the training-stability options (extra norms, logit capping).
    """
    _check_exportable(cfg)
    lo, hi = cfg.time_step_limit
    owned: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "hybrid_override_pattern": cfg.pattern, "layers_block_type": [_CHAR_TO_LAYER_TYPE[c] for c in cfg.pattern],
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "attention_head_dim": cfg.head_dim,  # older NVIDIA remote code reads this spelling
        "attention_bias": False,
        "intermediate_size": cfg.ffn_dim, "mlp_hidden_act": "relu2", "mlp_bias": cfg.mlp_bias,
        "ssm_state_size": cfg.ssm_state, "mamba_num_heads": cfg.mamba_heads, "mamba_head_dim": cfg.mamba_head_dim,
        "mamba_hidden_act": "silu", "n_groups": cfg.n_groups, "expand": cfg.expand, "conv_kernel": cfg.conv_kernel,
        "use_conv_bias": cfg.conv_bias, "use_bias": cfg.mamba_proj_bias, "mamba_proj_bias": cfg.mamba_proj_bias,
        "chunk_size": cfg.chunk_size,
        "time_step_min": lo, "time_step_max": cfg.time_step_max, "time_step_floor": cfg.time_step_floor,
        "time_step_limit": [lo, hi],
        "layer_norm_epsilon": cfg.norm_eps, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
        "dtype": _dtype_name(dtype), "torch_dtype": _dtype_name(dtype),
    }
    if cfg.time_step_min != lo:
        owned[_INIT_MIN_KEY] = cfg.time_step_min
    reserved = set(owned) | set(_LAYOUT_KEYS) | {a for al in _ALIASES.values() for a in al} | {_INIT_MIN_KEY}
    return {**{k: v for k, v in cfg.extra.items() if k not in reserved}, **owned}

def config_json(d: dict[str, Any]) -> str:
    def enc(x: Any) -> Any:
        if isinstance(x, float):
            return _encode_float(x)
        if isinstance(x, dict):
            return {k: enc(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [enc(v) for v in x]
        return x
    return json.dumps(enc(d), indent=2, sort_keys=True) + "\n"



def read_hf_config(path: str | Path) -> HybridConfig:
    """`HybridConfig` of a Hugging Face Nemotron-H directory (or its config.json)."""
    path = Path(path)
    if path.suffix != ".json":
        require_dir(path)
        path = path / CONFIG_NAME
    d = read_json_file(path, "Hugging Face model config")
    try:
        return hf_config_to_hybrid(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
