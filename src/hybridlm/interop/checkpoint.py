"""Our checkpoint format: a directory with `config.json` (HybridConfig) and `model.safetensors`.

Writes are atomic (`interop.files`), so a crash never leaves a half-written file under
the final name. Loads check everything and fail with a message that names the problem:
missing directory/file, corrupt safetensors, missing or unexpected tensors, wrong shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import HybridConfig, read_json
from ..model.lm import HybridLM
from .files import atomic_write_text, load_tensors, save_tensors

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_METADATA = {"format": "pt", "producer": "hybridlm"}  # in the header of every weights file we write


def model_state(model: HybridLM) -> dict[str, torch.Tensor]:
    """State dict without the tied lm_head alias."""
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def check_state_dict(model: HybridLM, tensors: dict[str, torch.Tensor], source: str) -> None:
    """ValueError listing missing/unexpected names and the first shape mismatches."""
    expected = model_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: tensors do not match the config: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    wrong = [f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if tensors[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{source}: wrong tensor shape(s): " + "; ".join(wrong[:8]))


def model_from_state(cfg: HybridConfig, model_sd: dict[str, torch.Tensor]) -> HybridLM:
    """A HybridLM whose parameters are the tensors of `model_sd` themselves (no copy), e.g. for `save_model`."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    model.load_state_dict(model_sd, strict=not cfg.tie_embeddings, assign=True)
    return model


def load_weights_into(model: HybridLM, tensors: dict[str, torch.Tensor], source: str) -> HybridLM:
    check_state_dict(model, tensors, source)
    model.load_state_dict(tensors, strict=not model.cfg.tie_embeddings)
    return model


def save_model(model: HybridLM, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write config.json and model.safetensors into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(model_state(model), out / WEIGHTS_NAME, metadata=SAFETENSORS_METADATA)
    payload = {"hybridlm": model.cfg.to_dict(), **(extra or {})}
    atomic_write_text(out / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")
    return out


def read_config(ckpt_dir: str | Path) -> HybridConfig:
    """The HybridConfig of a hybridlm checkpoint directory."""
    d = Path(ckpt_dir)
    if not d.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {d}")
    path = d / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in checkpoint directory {d}")
    payload = read_json(path)
    if not isinstance(payload, dict) or "hybridlm" not in payload:
        raise ValueError(f"{path} is not a hybridlm config (no 'hybridlm' section); "
                         "for a Hugging Face Nemotron-H directory pass --hf DIR, or `hybridlm convert DIR OUT --to hybridlm`")
    return HybridConfig.from_dict(payload["hybridlm"])


def load_model(ckpt_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> HybridLM:
    """Build the model from config.json and load model.safetensors, checking every tensor."""
    cfg = read_config(ckpt_dir)
    tensors = load_tensors(Path(ckpt_dir) / WEIGHTS_NAME)
    with torch.device("meta"):
        model = HybridLM(cfg)
    check_state_dict(model, tensors, str(Path(ckpt_dir) / WEIGHTS_NAME))
    model = model.to_empty(device=device)
    model.load_state_dict(tensors, strict=not cfg.tie_embeddings)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
