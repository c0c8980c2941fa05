"""GGUF export for llama.cpp: `save_gguf` writes a `HybridLM` as llama.cpp's ``nemotron_h`` architecture (F32/F16/BF16).

The layout is the one llama.cpp's ``convert_hf_to_gguf.py`` gives a Hugging Face Nemotron-H
checkpoint, written here directly from the model (no Hugging Face export, no llama.cpp code):

* metadata ``nemotron_h.*``: ``context_length`` (``max_seq_len``), ``embedding_length``,
  ``block_count``, ``vocab_size``; per layer ``feed_forward_length`` (``ffn_dim`` on MLP layers,
  else 0) and ``attention.head_count_kv`` (``n_kv_heads`` on attention layers, else 0): llama.cpp
  takes a layer with both 0 for a Mamba layer. ``attention.head_count`` is one number (llama.cpp
  derives the head size from layer 0's count, which a per-layer list would make 0),
  ``attention.key_length`` = ``value_length`` = ``head_dim``; ``ssm.conv_kernel``, ``ssm.inner_size``
  (heads x head dim), ``ssm.state_size``, ``ssm.time_step_rank`` (the number of Mamba heads),
  ``ssm.group_count``; ``attention.layer_norm_rms_epsilon`` and ``attention.layer_norm_epsilon``
  (llama.cpp requires the latter); the tokenizer (`gguf_vocab`);
* tensors ``token_embd``, ``output_norm``, ``output`` (left out when tied: llama.cpp then uses
  ``token_embd``), and per layer ``blk.<i>.attn_norm`` plus ``ssm_in``, ``ssm_conv1d`` (weight
  ``(C, 1, K)`` -> ``(C, K)``; a zero bias when the model has none: llama.cpp always adds one),
  ``ssm_dt.bias`` (``dt_bias``), ``ssm_a`` = ``-exp(A_log)`` and ``ssm_d`` = ``D`` as ``(H, 1)``,
  ``ssm_norm.weight`` as ``(n_groups, d_inner / n_groups)``, ``ssm_out``; or ``attn_q/k/v/output``
  (biases too); or ``ffn_up`` / ``ffn_down`` (biases too). llama.cpp's converter also permutes the
  rows of Q and K for RoPE; Nemotron-H has no RoPE and the same permutation of both leaves every
  attention score unchanged, so rows are kept in order here;
* F16/BF16 files keep what llama.cpp's converter keeps in F32: 1-D tensors, norms, ``ssm_conv1d``,
  ``ssm_a`` / ``ssm_d``; the other matrices are rounded to nearest even.

Refused (ValueError): Mamba in/out projection biases and the training-stability options (llama.cpp
has no such tensors), an upper dt clamp (llama.cpp clamps nothing; a lower clamp, which
transformers' decode step ignores as well, is dropped as llama.cpp's converter drops it).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..config import HybridConfig
from ..model.lm import HybridLM
from .hf_config import check_plain_nemotron_h
from .chat_template import ChatTemplate
from .gguf_file import GGML_BF16, GGML_F16, GGML_F32, TensorEntry, f32, i32s, u32, write_gguf
from .gguf_vocab import vocab_metadata
from .tokenizer_files import read_tokenizer_dir

GGUF_ARCH = "nemotron_h"
GGUF_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_GGML_TYPES = {"f32": GGML_F32, "f16": GGML_F16, "bf16": GGML_BF16}
_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # llama.cpp's LLAMA_FTYPE_ALL_F32 / MOSTLY_F16 / MOSTLY_BF16
_DTYPE_ALIASES = {"float32": "f32", "fp32": "f32", "float16": "f16", "fp16": "f16", "half": "f16",
                  "bfloat16": "bf16"}

Transform = Callable[[Tensor, HybridConfig], Tensor]
# our mixer parameter (after "backbone.layers.<i>.mixer.") -> (GGUF name after "blk.<i>.", transform)
_MIXER: dict[str, tuple[str, Transform | None]] = {
    "in_proj.weight": ("ssm_in.weight", None),
    "conv1d.weight": ("ssm_conv1d.weight", lambda t, c: t.reshape(c.conv_dim, c.conv_kernel)),
    "conv1d.bias": ("ssm_conv1d.bias", None),
    "dt_bias": ("ssm_dt.bias", None),
    "A_log": ("ssm_a", lambda t, c: -torch.exp(t.float()).reshape(-1, 1)),
    "D": ("ssm_d", lambda t, c: t.reshape(-1, 1)),
    "norm.weight": ("ssm_norm.weight", lambda t, c: t.reshape(c.n_groups, c.d_inner // c.n_groups)),
    "out_proj.weight": ("ssm_out.weight", None),
    **{f"{ours}_proj.{kind}": (f"attn_{theirs}.{kind}", None) for kind in ("weight", "bias")
       for ours, theirs in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))},
    **{f"{ours}_proj.{kind}": (f"ffn_{ours}.{kind}", None) for kind in ("weight", "bias") for ours in ("up", "down")},
}
_TOP = {"backbone.embeddings.weight": "token_embd.weight", "backbone.norm_f.weight": "output_norm.weight",
        "lm_head.weight": "output.weight"}


def gguf_dtype_name(dtype: str | torch.dtype) -> str:
    """``"f32"``, ``"f16"`` or ``"bf16"`` for a name (also ``float16``, ``bfloat16``, ...) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        name = next((k for k, v in GGUF_DTYPES.items() if v == dtype), None)
    else:
        key = str(dtype).lower()
        name = _DTYPE_ALIASES.get(key, key) if key in _DTYPE_ALIASES or key in GGUF_DTYPES else None
    if name is None:
        raise ValueError(f"unknown GGUF dtype {dtype!r}; use one of {sorted(GGUF_DTYPES)}")
    return name


def check_gguf_exportable(cfg: HybridConfig) -> None:
    """ValueError for what llama.cpp's ``nemotron_h`` cannot express."""
    if cfg.mamba_proj_bias:
        raise ValueError("mamba_proj_bias=True cannot be exported to GGUF: llama.cpp's nemotron_h has no "
                         "ssm_in / ssm_out biases")
    check_plain_nemotron_h(cfg, "GGUF (llama.cpp's nemotron_h)")


def arch_metadata(cfg: HybridConfig, dtype: str = "f32", name: str | None = None) -> dict[str, Any]:
    """The ``general.*`` and ``nemotron_h.*`` metadata of a model of config ``cfg`` (see the module docstring)."""
    a = GGUF_ARCH
    return {
        "general.architecture": a, "general.type": "model", "general.name": name or "hybridlm",
        "general.file_type": u32(_FILE_TYPES[gguf_dtype_name(dtype)]), "general.quantization_version": u32(2),
        f"{a}.vocab_size": u32(cfg.vocab_size), f"{a}.context_length": u32(cfg.max_seq_len),
        f"{a}.embedding_length": u32(cfg.d_model), f"{a}.block_count": u32(cfg.n_layers),
        f"{a}.feed_forward_length": i32s(cfg.ffn_dim if c == "-" else 0 for c in cfg.pattern),
        f"{a}.attention.head_count": u32(cfg.n_heads),
        f"{a}.attention.head_count_kv": i32s(cfg.n_kv_heads if c == "*" else 0 for c in cfg.pattern),
        f"{a}.attention.key_length": u32(cfg.head_dim), f"{a}.attention.value_length": u32(cfg.head_dim),
        f"{a}.attention.layer_norm_rms_epsilon": f32(cfg.norm_eps),
        f"{a}.attention.layer_norm_epsilon": f32(cfg.norm_eps),
        f"{a}.ssm.conv_kernel": u32(cfg.conv_kernel), f"{a}.ssm.inner_size": u32(cfg.d_inner),
        f"{a}.ssm.state_size": u32(cfg.ssm_state), f"{a}.ssm.time_step_rank": u32(cfg.mamba_heads),
        f"{a}.ssm.group_count": u32(cfg.n_groups),
    }


def gguf_name(name: str, cfg: HybridConfig) -> tuple[str, Transform | None]:
    """The GGUF name of one of our parameters and the transform to llama.cpp's layout (None: as is);
    ValueError for a parameter llama.cpp's nemotron_h has no place for."""
    if name in _TOP:
        return _TOP[name], None
    parts = name.split(".", 3)  # backbone, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["backbone", "layers"]:
        rest = parts[3]
        if rest == "norm.weight":
            return f"blk.{parts[2]}.attn_norm.weight", None
        if rest.startswith("mixer.") and rest[len("mixer."):] in _MIXER:
            theirs, transform = _MIXER[rest[len("mixer."):]]
            return f"blk.{parts[2]}.{theirs}", transform
    raise ValueError(f"parameter {name!r} has no GGUF counterpart in llama.cpp's {GGUF_ARCH}")


def gguf_tensors(model: HybridLM) -> list[tuple[str, Callable[[], Tensor]]]:
    """(GGUF name, callable giving the tensor in llama.cpp's layout) for every tensor of the file, in model order."""
    cfg = model.cfg
    tied = model.lm_head.weight is model.backbone.embeddings.weight
    out: list[tuple[str, Callable[[], Tensor]]] = []
    for name, param in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        theirs, transform = gguf_name(name, cfg)
        out.append((theirs, (lambda p=param, f=transform: p.detach() if f is None else f(p.detach(), cfg))))
        if name.endswith("mixer.conv1d.weight") and not cfg.conv_bias:  # llama.cpp adds the bias unconditionally
            out.append((theirs.replace(".weight", ".bias"), lambda: torch.zeros(cfg.conv_dim)))
    return out


def keeps_f32(name: str, ndim: int) -> bool:
    """Whether llama.cpp's converter stores this GGUF tensor in F32 whatever the file type."""
    return ndim <= 1 or name.endswith("_norm.weight") or ".ssm_conv1d." in name or not name.endswith(".weight")


def _entry(name: str, get: Callable[[], Tensor], dtype: str) -> TensorEntry:
    shape = tuple(get().shape)
    kind = "f32" if keeps_f32(name, len(shape)) else dtype
    target = GGUF_DTYPES[kind]

    def data() -> np.ndarray:
        t = get().to("cpu", target).contiguous()
        return (t.view(torch.int16) if target == torch.bfloat16 else t).numpy()

    return TensorEntry(name, shape, _GGML_TYPES[kind], data)


def save_gguf(model: HybridLM, tokenizer: Any, path: str | Path, dtype: str | torch.dtype = "f32", *,
              chat_template: str | ChatTemplate | None = None, tokenizer_pre: str | None = None,
              name: str | None = None) -> Path:
    """Write ``model`` + ``tokenizer`` as one GGUF file llama.cpp loads as ``nemotron_h``; returns ``path``.

    ``dtype``: ``"f32"``, ``"f16"`` or ``"bf16"`` (or the torch dtype) for the matrices (see the
    module docstring for what stays F32). ``tokenizer``: a hybridlm ``Tokenizer``, an
    `ExportTokenizer` or a ``tokenizers.Tokenizer`` (byte-level BPE; `gguf_vocab`).
    ``chat_template`` overrides the tokenizer's own; ``tokenizer_pre`` names llama.cpp's
    pre-tokenizer for a tokenizer that is not GPT-2's; ``name`` is ``general.name``.
    TypeError for a model that is not a `HybridLM`; ValueError for what llama.cpp cannot express.
    """
    if not isinstance(model, HybridLM):
        raise TypeError(f"save_gguf exports a hybridlm HybridLM, not {type(model).__name__}")
    dtype = gguf_dtype_name(dtype)
    check_gguf_exportable(model.cfg)
    metadata = {**arch_metadata(model.cfg, dtype, name),
                **vocab_metadata(tokenizer, model.cfg, chat_template, tokenizer_pre)}
    with torch.no_grad():
        entries = [_entry(n, get, dtype) for n, get in gguf_tensors(model)]
        return write_gguf(path, metadata, entries)


def gguf_output_path(dst: str | Path, dtype: str) -> Path:
    """Where `convert` writes a GGUF: ``dst`` itself when it ends in ``.gguf``, else ``dst/model-<dtype>.gguf``."""
    dst = Path(dst)
    return dst if dst.suffix.lower() == ".gguf" else dst / f"model-{gguf_dtype_name(dtype)}.gguf"


def convert_to_gguf(model: HybridLM, src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None) -> Path:
    """`convert`'s GGUF target: ``model`` (loaded from ``src``) with ``src``'s tokenizer (its tokenizer.json,
    EOS token and chat template; the bundled tokenizer when it has none), to `gguf_output_path`.

    ``dtype=None`` keeps the model's dtype when it is F32/F16/BF16 (else F32). Returns the file written.
    """
    if dtype is None:
        stored = model.lm_head.weight.dtype
        dtype = stored if stored in GGUF_DTYPES.values() else "f32"
    name = gguf_dtype_name(dtype)
    return save_gguf(model, read_tokenizer_dir(src), gguf_output_path(dst, name), name, name=Path(src).resolve().name)
