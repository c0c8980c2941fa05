"""Model checkpoints: a directory with `config.json` (HybridConfig) and `model.safetensors`.

Writes are atomic (temp file + rename), so a crash never leaves a half-written file
under the final name. Loads check everything and fail with a message that names the
problem: missing directory/file, corrupt safetensors, missing or unexpected tensors,
wrong shapes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import HybridConfig, read_json
from .model import HybridLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp_path) on a temp file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written atomically; tensors are made contiguous and de-aliased."""
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; FileNotFoundError / ValueError (corrupt) with the path in the message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from None


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


def load_weights_into(model: HybridLM, tensors: dict[str, torch.Tensor], source: str) -> HybridLM:
    check_state_dict(model, tensors, source)
    model.load_state_dict(tensors, strict=not model.cfg.tie_embeddings)
    return model


def save_model(model: HybridLM, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write config.json and model.safetensors into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(model_state(model), out / WEIGHTS_NAME, metadata={"format": "pt", "producer": "hybridlm"})
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
