"""Hugging Face interop: read and write `NemotronHForCausalLM` checkpoint directories.

A Hugging Face Nemotron-H directory holds ``config.json`` (``model_type: "nemotron_h"``)
and ``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` listed in
``model.safetensors.index.json``. Our parameter names already mirror
`NemotronHForCausalLM`, so converting weights is a prefix rename at most:

* import accepts ``backbone.*`` (hub checkpoints) and ``model.*`` (the in-memory names of
  transformers 5), ignores ``mtp.*`` (multi-token-prediction heads, as transformers does);
* export writes ``backbone.*`` and ``lm_head.weight`` (what transformers 5 itself saves; it
  renames ``backbone.`` to ``model.`` when loading).

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
  from those defaults are kept in `HybridConfig.extra` and written back on export;
* ``tie_word_embeddings``: transformers 5 never ties Nemotron-H's ``lm_head``, it loads it
  from the file. Export therefore always writes ``lm_head.weight`` (and the flag as is); import
  ties only when the flag is set and ``lm_head.weight`` is absent or equal to the embeddings.

`convert(src, dst)` detects the source format (a hybridlm ``config.json`` has a
``"hybridlm"`` section, an HF one ``model_type: "nemotron_h"``) and writes the other one.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint import (CONFIG_NAME, WEIGHTS_NAME, atomic_write_text, check_state_dict, load_model,
                         load_tensors, save_model, save_tensors)
from .config import HybridConfig, read_json
from .model import HybridLM

HF_MODEL_TYPE = "nemotron_h"
HF_ARCHITECTURE = "NemotronHForCausalLM"
INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"
# Files next to the weights that a conversion carries over unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")

# Layer type names (transformers 5, plus the legacy names it still remaps) -> pattern letters.
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
_BOOKKEEPING = {"architectures", "model_type", "transformers_version", "_name_or_path", "auto_map",
                "dtype", "torch_dtype", "num_hidden_layers", "_commit_hash", "hidden_act"}
_LAYOUT_KEYS = ("layers_block_type", "layer_types", "hybrid_override_pattern")


# ---- config ---------------------------------------------------------------------------------
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
    used: set[str] = set(_BOOKKEEPING) | set(_LAYOUT_KEYS)

    def get(key: str) -> Any:
        names = [n for n in (key, *_ALIASES.get(key, ())) if n in d]
        used.update((key, *_ALIASES.get(key, ())))
        if not names:
            return _HF_DEFAULTS[key]
        values = [d[n] for n in names]
        if any(v != values[0] for v in values[1:]):
            raise ValueError("HF config has conflicting values for the same field: "
                             + ", ".join(f"{n}={d[n]!r}" for n in names))
        return values[0]

    pattern = _layer_pattern(d)
    n_layers = d.get("num_hidden_layers")
    if n_layers is not None and n_layers != len(pattern):
        warnings.warn(f"HF config num_hidden_layers={n_layers} but the layer layout has {len(pattern)} "
                      "layers; using the layout (as transformers does)", stacklevel=2)
    for key, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if get(key) != want:
            raise ValueError(f"HF config {key}={d[key]!r} is not supported (only {want!r})")
    if get("attention_bias"):
        raise ValueError("HF config attention_bias=True is not supported: transformers' NemotronHAttention "
                         "builds q/k/v/o projections without biases, so the checkpoint is ambiguous")
    eos = get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None

    dt_clamp = _decode_float(get("time_step_min"), "time_step_min")
    get("time_step_limit")      # unused by transformers' modeling: the clamp is time_step_min
    get("mamba_proj_bias")      # unused by transformers' modeling: the bias follows use_bias
    used.add(_INIT_MIN_KEY)
    init_min = _decode_float(d[_INIT_MIN_KEY], _INIT_MIN_KEY) if _INIT_MIN_KEY in d else dt_clamp
    fields = dict(
        vocab_size=get("vocab_size"), d_model=get("hidden_size"), pattern=pattern,
        n_heads=get("num_attention_heads"), n_kv_heads=get("num_key_value_heads"), head_dim=get("head_dim"),
        attention_bias=False, ffn_dim=get("intermediate_size"), mlp_bias=bool(get("mlp_bias")),
        ssm_state=get("ssm_state_size"), mamba_head_dim=get("mamba_head_dim"),
        mamba_heads=get("mamba_num_heads"), n_groups=get("n_groups"), expand=get("expand"),
        conv_kernel=get("conv_kernel"), conv_bias=bool(get("use_conv_bias")),
        mamba_proj_bias=bool(get("use_bias")), chunk_size=get("chunk_size"),
        time_step_min=init_min, time_step_max=_decode_float(get("time_step_max"), "time_step_max"),
        time_step_floor=_decode_float(get("time_step_floor"), "time_step_floor"),
        time_step_limit=(dt_clamp, math.inf),
        norm_eps=_decode_float(get("layer_norm_epsilon"), "layer_norm_epsilon"),
        tie_embeddings=bool(get("tie_word_embeddings")),
        init_std=_decode_float(get("initializer_range"), "initializer_range"),
        max_seq_len=get("max_position_embeddings"),
        bos_token_id=get("bos_token_id"), eos_token_id=eos, pad_token_id=get("pad_token_id"),
    )
    extra = {k: v for k, v in d.items()
             if k not in used and not (k in _HF_DEFAULTS and _same(v, _HF_DEFAULTS[k]))}
    try:
        return HybridConfig(**fields, extra=extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"HF config does not give a valid model: {e}") from None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _dtype_name(dtype: torch.dtype | str) -> str:
    return str(dtype).removeprefix("torch.")


def hybrid_to_hf_config(cfg: HybridConfig, dtype: torch.dtype | str = torch.float32) -> dict[str, Any]:
    """The ``config.json`` dict transformers' `NemotronHConfig` loads into the same model.

    Raises ValueError for what transformers' Nemotron-H cannot express: attention biases,
    an upper dt clamp and the training-stability options (extra norms, logit capping).
    """
    if cfg.attention_bias:
        raise ValueError("attention_bias=True cannot be exported: transformers' NemotronHAttention "
                         "has no q/k/v/o biases")
    if stability := cfg.stability_options():
        raise ValueError(f"training-stability options {stability} cannot be exported: "
                         "transformers' Nemotron-H has no QK/QKV/post-projection norms or logit capping")
    lo, hi = cfg.time_step_limit
    if not math.isinf(hi):
        raise ValueError(f"time_step_limit={cfg.time_step_limit} cannot be exported: transformers' "
                         "Nemotron-H clamps dt to (time_step_min, inf), with no upper bound")
    layer_types = [_CHAR_TO_LAYER_TYPE[c] for c in cfg.pattern]
    owned: dict[str, Any] = {
        "architectures": [HF_ARCHITECTURE],
        "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "hybrid_override_pattern": cfg.pattern,
        "layers_block_type": layer_types,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "attention_head_dim": cfg.head_dim,  # older NVIDIA remote code reads this spelling
        "attention_bias": False,
        "intermediate_size": cfg.ffn_dim,
        "mlp_hidden_act": "relu2",
        "mlp_bias": cfg.mlp_bias,
        "ssm_state_size": cfg.ssm_state,
        "mamba_num_heads": cfg.mamba_heads,
        "mamba_head_dim": cfg.mamba_head_dim,
        "mamba_hidden_act": "silu",
        "n_groups": cfg.n_groups,
        "expand": cfg.expand,
        "conv_kernel": cfg.conv_kernel,
        "use_conv_bias": cfg.conv_bias,
        "use_bias": cfg.mamba_proj_bias,
        "mamba_proj_bias": cfg.mamba_proj_bias,
        "chunk_size": cfg.chunk_size,
        "time_step_min": lo,
        "time_step_max": cfg.time_step_max,
        "time_step_floor": cfg.time_step_floor,
        "time_step_limit": [lo, hi],
        "layer_norm_epsilon": cfg.norm_eps,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "dtype": _dtype_name(dtype),
        "torch_dtype": _dtype_name(dtype),
    }
    if cfg.time_step_min != lo:
        owned[_INIT_MIN_KEY] = cfg.time_step_min
    reserved = set(owned) | set(_LAYOUT_KEYS) | {a for al in _ALIASES.values() for a in al} | {_INIT_MIN_KEY}
    return {**{k: v for k, v in cfg.extra.items() if k not in reserved}, **owned}


def _config_json(d: dict[str, Any]) -> str:
    def enc(x: Any) -> Any:
        if isinstance(x, float):
            return _encode_float(x)
        if isinstance(x, dict):
            return {k: enc(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [enc(v) for v in x]
        return x
    return json.dumps(enc(d), indent=2, sort_keys=True) + "\n"


# ---- files ----------------------------------------------------------------------------------
def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent} ({what})")
    return read_json(path)


def read_hf_config(path: str | Path) -> HybridConfig:
    """`HybridConfig` of a Hugging Face Nemotron-H directory (or its config.json)."""
    path = Path(path)
    if path.suffix != ".json":
        _require_dir(path)
        path = path / CONFIG_NAME
    d = _read_json(path, "Hugging Face model config")
    try:
        return hf_config_to_hybrid(d)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _require_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"not a directory: {path}")


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF directory: the index's shards, else model.safetensors."""
    d = Path(model_dir)
    index = d / INDEX_NAME
    if index.is_file():
        payload = _read_json(index, "shard index")
        wmap = payload.get("weight_map") if isinstance(payload, dict) else None
        if not isinstance(wmap, dict) or not wmap:
            raise ValueError(f"{index} has no 'weight_map' of tensor name -> shard file")
        files = sorted(set(wmap.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shard file(s) missing from {d}: {missing}")
        return [d / f for f in files]
    single = d / WEIGHTS_NAME
    if single.is_file():
        return [single]
    shards = sorted(p.name for p in d.glob("model-*-of-*.safetensors"))
    if shards:
        raise FileNotFoundError(f"{d} has shard files {shards[:3]} but no {INDEX_NAME}")
    others = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
    hint = f" (found {others[:3]}: only safetensors weights are supported)" if others else ""
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {INDEX_NAME} in {d}{hint}")


def _read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a safetensors header, without reading the data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
            return out
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def hf_to_hybrid_name(name: str) -> str | None:
    """Our parameter name for an HF tensor name; None for tensors we ignore (``mtp.*``)."""
    if name.startswith("mtp."):
        return None
    if name.startswith("model."):
        return "backbone." + name[len("model."):]
    return name


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16}


def load_hf_dir(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> HybridLM:
    """`HybridLM` from a Hugging Face Nemotron-H directory (single file or sharded safetensors).

    Every tensor is checked against the config before any data is read (headers only);
    shards are then loaded one at a time. ``dtype=None`` keeps the checkpoint's dtype (the
    stored floating dtype when uniform, else the config's ``dtype``/``torch_dtype``, else
    float32).
    """
    d = Path(path)
    _require_dir(d)
    raw = _read_json(d / CONFIG_NAME, "Hugging Face model config")
    try:
        cfg = hf_config_to_hybrid(raw)
    except ValueError as e:
        raise ValueError(f"{d / CONFIG_NAME}: {e}") from None
    files = weight_files(d)

    # 1. names, shapes and dtypes from the headers
    where: dict[str, tuple[Path, str]] = {}   # our name -> (file, HF name)
    shapes: dict[str, torch.Tensor] = {}
    stored_dtypes: set[str] = set()
    for f in files:
        for hf_name, (shape, st_dtype) in _read_header(f).items():
            name = hf_to_hybrid_name(hf_name)
            if name is None:
                continue
            if name in where:
                raise ValueError(f"{d}: tensor {name!r} is stored twice ({where[name][1]!r} in "
                                 f"{where[name][0].name}, {hf_name!r} in {f.name})")
            where[name] = (f, hf_name)
            shapes[name] = torch.empty(shape, device="meta")
            stored_dtypes.add(st_dtype)

    # 2. tied embeddings: transformers uses a stored lm_head even when the flag is set
    if cfg.tie_embeddings and "lm_head.weight" in where:
        emb = _get_tensor(*where.get("backbone.embeddings.weight", where["lm_head.weight"]))
        head = _get_tensor(*where["lm_head.weight"])
        if emb.shape == head.shape and torch.equal(emb, head):
            del where["lm_head.weight"], shapes["lm_head.weight"]
        else:
            cfg = cfg.replace(tie_embeddings=False)

    with torch.device("meta"):
        model = HybridLM(cfg)
    check_state_dict(model, shapes, str(d))

    if dtype is None:
        dtype = _uniform_dtype(stored_dtypes) or _named_dtype(raw.get("dtype") or raw.get("torch_dtype"))

    # 3. data, one file at a time
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    targets = model.state_dict()
    by_file: dict[Path, dict[str, str]] = {}
    for name, (f, hf_name) in where.items():
        by_file.setdefault(f, {})[hf_name] = name
    with torch.no_grad():
        for f, names in by_file.items():
            tensors = load_tensors(f)
            for hf_name, name in names.items():
                targets[name].copy_(tensors.pop(hf_name))
            del tensors
    return model.eval()


def _uniform_dtype(stored: set[str]) -> torch.dtype | None:
    """The torch dtype when every stored tensor has the same floating dtype, else None."""
    dtypes = {_SAFETENSORS_DTYPES.get(s) for s in stored}
    return dtypes.pop() if len(dtypes) == 1 and None not in dtypes else None


def _named_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def _get_tensor(path: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def save_hf_dir(model: HybridLM, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a directory `NemotronHForCausalLM.from_pretrained` loads: config.json + safetensors.

    Weights larger than ``max_shard_bytes`` are split into ``model-0000i-of-0000n.safetensors``
    with ``model.safetensors.index.json``. Every file is written atomically; weight files of an
    earlier save that the new one does not use are removed afterwards.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = model.lm_head.weight.dtype
    hf_cfg = hybrid_to_hf_config(model.cfg, dtype)
    tensors = dict(model.state_dict())  # lm_head.weight is included (a copy is written) when tied
    shards = _shard(tensors, max_shard_bytes)
    meta = {"format": "pt", "producer": "hybridlm"}
    written: set[str] = set()
    if len(shards) == 1:
        save_tensors(shards[0], out / WEIGHTS_NAME, metadata=meta)
        written.add(WEIGHTS_NAME)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_tensors(shard, out / fname, metadata=meta)
            written.add(fname)
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
        written.add(INDEX_NAME)
    atomic_write_text(out / CONFIG_NAME, _config_json(hf_cfg))
    for stale in [out / WEIGHTS_NAME, out / INDEX_NAME, *out.glob("model-*-of-*.safetensors")]:
        if stale.name not in written and stale.is_file() and (stale.name in (WEIGHTS_NAME, INDEX_NAME)
                                                              or SHARD_RE.match(stale.name)):
            stale.unlink()
    return out


# ---- conversion -----------------------------------------------------------------------------
def detect_format(path: str | Path) -> str:
    """``"hybridlm"`` or ``"hf"`` for a checkpoint directory, from its config.json."""
    d = Path(path)
    _require_dir(d)
    payload = _read_json(d / CONFIG_NAME, "model config")
    if isinstance(payload, dict):
        if "hybridlm" in payload:
            return "hybridlm"
        archs = payload.get("architectures") or []
        if payload.get("model_type") == HF_MODEL_TYPE or HF_ARCHITECTURE in archs:
            return "hf"
        if "model_type" in payload:
            raise ValueError(f"{d / CONFIG_NAME}: model_type {payload['model_type']!r} is not supported; "
                             f"only Hugging Face {HF_MODEL_TYPE!r} ({HF_ARCHITECTURE}) and hybridlm checkpoints")
    raise ValueError(f"{d / CONFIG_NAME} is neither a hybridlm config (no 'hybridlm' section) "
                     f"nor a Hugging Face {HF_MODEL_TYPE!r} config")


def convert(src: str | Path, dst: str | Path, to: str | None = None, dtype: torch.dtype | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert a checkpoint directory between hybridlm and Hugging Face Nemotron-H formats.

    ``to`` is ``"hf"`` or ``"hybridlm"``; None means the other format than the source's.
    ``dtype`` casts the weights (default: keep). Tokenizer files next to the weights are
    copied. Returns the output directory.
    """
    src, dst = Path(src), Path(dst)
    fmt = detect_format(src)
    if to is None:
        to = "hf" if fmt == "hybridlm" else "hybridlm"
    if to not in ("hf", "hybridlm"):
        raise ValueError(f"unknown target format {to!r}; use 'hf' or 'hybridlm'")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"destination {dst} is the source directory; choose another one")
    if fmt == "hf":
        model = load_hf_dir(src, dtype=dtype)
    else:
        if dtype is None and (src / WEIGHTS_NAME).is_file():  # load_model gives float32; keep the stored dtype
            dtype = _uniform_dtype({dt for _, dt in _read_header(src / WEIGHTS_NAME).values()})
        model = load_model(src, dtype=dtype)
    if to == "hf":
        save_hf_dir(model, dst, max_shard_bytes=max_shard_bytes)
    else:
        save_model(model, dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst
