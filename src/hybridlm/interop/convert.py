"""Either format in, either format out: `load` any checkpoint directory, `convert` between them.

The format is detected from ``config.json``: a hybridlm one has a ``"hybridlm"`` section,
a Hugging Face one ``model_type: "nemotron_h"`` (or the ``NemotronHForCausalLM``
architecture).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..model.lm import HybridLM
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, save_model
from .files import read_header, read_json_file, require_dir, uniform_dtype
from .hf_config import HF_ARCHITECTURE, HF_MODEL_TYPE
from .hf_weights import DEFAULT_MAX_SHARD_BYTES, load_hf_dir, save_hf_dir

# Files next to the weights that a conversion carries over unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")


def detect_format(path: str | Path) -> str:
    """``"hybridlm"`` or ``"hf"`` for a checkpoint directory, from its config.json."""
    d = Path(path)
    require_dir(d)
    payload = read_json_file(d / CONFIG_NAME, "model config")
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


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> HybridLM:
    """The model in a checkpoint directory: ours (`save_model`) or a Hugging Face Nemotron-H one.

    ``dtype=None``: float32 for ours, the stored dtype for Hugging Face directories (as
    `load_model` / `load_hf_dir`). The model is in eval mode.
    """
    if detect_format(path) == "hf":
        return load_hf_dir(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype)


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
    if fmt == "hybridlm" and dtype is None and (src / WEIGHTS_NAME).is_file():
        dtype = uniform_dtype({dt for _, dt in read_header(src / WEIGHTS_NAME).values()})  # keep the stored dtype
    model = load_hf_dir(src, dtype=dtype) if fmt == "hf" else load_model(src, dtype=dtype)  # fmt is known
    if to == "hf":
        save_hf_dir(model, dst, max_shard_bytes=max_shard_bytes)
    else:
        save_model(model, dst)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return dst
