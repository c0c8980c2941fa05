"""Either format in, either format out: `load` any checkpoint directory, `convert` between them.

The format is detected from ``config.json``: a hybridlm one has a ``"hybridlm"`` section,
a Hugging Face one ``model_type: "nemotron_h"`` (or the ``NemotronHForCausalLM``
architecture).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..model.lm import HybridLM
from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, save_model
from .compressed import has_quantization_config, load_compressed
from .files import read_header, read_json_file, require_dir, uniform_dtype
from .gguf import convert_to_gguf, gguf_dtype_name
from .hf_config import HF_ARCHITECTURE, HF_MODEL_TYPE
from .hf_weights import DEFAULT_MAX_SHARD_BYTES, load_hf_dir, save_hf_dir
from .tokenizer_files import TOKENIZER_FILES, copy_tokenizer_files, write_tokenizer_config


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
    """The model in a checkpoint directory: ours (`save_model`) or a Hugging Face Nemotron-H one
    (compressed-tensors NVFP4 / FP8 ones dequantized: `compressed.load_compressed`).

    ``dtype=None``: float32 for ours, the stored dtype for Hugging Face directories (as
    `load_model` / `load_hf_dir`). The model is in eval mode.
    """
    if detect_format(path) == "hf":
        if has_quantization_config(path):  # compressed-tensors NVFP4 / FP8: dequantized (float32 by default)
            return load_compressed(path, device=device, dtype=dtype)
        return load_hf_dir(path, device=device, dtype=dtype)
    return load_model(path, device=device, dtype=dtype)


def convert(src: str | Path, dst: str | Path, to: str | None = None, dtype: torch.dtype | str | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Convert a checkpoint directory between hybridlm and Hugging Face Nemotron-H formats, or to GGUF.

    ``to`` is ``"hf"``, ``"hybridlm"`` or ``"gguf"``; None means the other format than the source's.
    ``dtype`` casts the weights (default: keep). Tokenizer files next to the weights are
    copied, plus a ``tokenizer_config.json`` written for a bare ``tokenizer.json``
    (`tokenizer_files.write_tokenizer_config`). Returns the output directory.

    ``to="gguf"``: one llama.cpp file (`gguf.save_gguf`) at ``dst`` when it ends in ``.gguf``,
    else ``dst/model-<dtype>.gguf``; ``dtype`` is ``"f32"``, ``"f16"``, ``"bf16"`` or the torch
    dtype (default: the stored one, F32 when it is none of those); the tokenizer is the source's
    tokenizer.json (else the bundled one). Returns the file.
    """
    src, dst = Path(src), Path(dst)
    fmt = detect_format(src)
    if to is None:
        to = "hf" if fmt == "hybridlm" else "hybridlm"
    if to not in ("hf", "hybridlm", "gguf"):
        raise ValueError(f"unknown target format {to!r}; use 'hf', 'hybridlm' or 'gguf'")
    gguf_dtype = None
    if to == "gguf":  # checked before loading; the GGUF writer casts, so the weights load as stored
        gguf_dtype, dtype = (None if dtype is None else gguf_dtype_name(dtype)), None
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"destination {dst} is the source directory; choose another one")
    if fmt == "hybridlm" and dtype is None and (src / WEIGHTS_NAME).is_file():
        dtype = uniform_dtype({dt for _, dt in read_header(src / WEIGHTS_NAME).values()})  # keep the stored dtype
    model = load(src, dtype=dtype)  # a compressed-tensors source is converted dense (dequantized)
    if to == "gguf":
        return convert_to_gguf(model, src, dst, gguf_dtype)
    if to == "hf":
        save_hf_dir(model, dst, max_shard_bytes=max_shard_bytes)
    else:
        save_model(model, dst)
    copy_tokenizer_files(src, dst, TOKENIZER_FILES + remote_code_files(model.cfg.extra.get("auto_map")))
    write_tokenizer_config(src, dst, model.cfg)
    return dst


def remote_code_files(auto_map: object) -> tuple[str, ...]:
    """The ``*.py`` files a config's ``auto_map`` names (``"modeling_nemotron_h.NemotronHForCausalLM"``
    -> ``modeling_nemotron_h.py``), which must travel with it for ``trust_remote_code`` loading."""
    if not isinstance(auto_map, dict):
        return ()
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(r, str)]
    return tuple(sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs if "." in r}))
