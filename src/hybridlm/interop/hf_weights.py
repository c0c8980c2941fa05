"""Hugging Face Nemotron-H checkpoint directories: read and write `NemotronHForCausalLM` weights.

A directory holds ``config.json`` (``model_type: "nemotron_h"``, see `hf_config`) and
``model.safetensors`` or shards ``model-0000i-of-0000n.safetensors`` listed in
``model.safetensors.index.json``. Our parameter names already mirror
`NemotronHForCausalLM`, so converting weights is a prefix rename at most:

* import accepts ``backbone.*`` (hub checkpoints) and ``model.*`` (the in-memory names of
  transformers 5), ignores ``mtp.*`` (multi-token-prediction heads, as transformers does);
* export writes ``backbone.*`` and ``lm_head.weight`` (what transformers 5 itself saves; it
  renames ``backbone.`` to ``model.`` when loading).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..config import HybridConfig
from ..model.lm import HybridLM
from .checkpoint import CONFIG_NAME, SAFETENSORS_METADATA, WEIGHTS_NAME, check_state_dict
from .files import (atomic_write_text, load_tensors, read_header, read_json_file, read_tensor, require_dir,
                    save_tensors, uniform_dtype)
from .hf_config import config_json, hf_config_to_hybrid, hybrid_to_hf_config

INDEX_NAME = "model.safetensors.index.json"
SHARD_RE = re.compile(r"^model-(\d+)-of-(\d+)\.safetensors$")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' "5GB"

TensorIndex = dict[str, tuple[Path, str]]  # our tensor name -> (file, HF tensor name)


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of an HF directory: the index's shards, else model.safetensors."""
    d = Path(model_dir)
    index = d / INDEX_NAME
    if index.is_file():
        payload = read_json_file(index, "shard index")
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


def hf_to_hybrid_name(name: str) -> str | None:
    """Our parameter name for an HF tensor name; None for tensors we ignore (``mtp.*``)."""
    if name.startswith("mtp."):
        return None
    if name.startswith("model."):
        return "backbone." + name[len("model."):]
    return name


# ---- import -------------------------------------------------------------------------------
def load_hf_dir(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> HybridLM:
    """`HybridLM` from a Hugging Face Nemotron-H directory (single file or sharded safetensors).

    Every tensor is checked against the config before any data is read (headers only);
    shards are then loaded one at a time. ``dtype=None`` keeps the checkpoint's dtype (the
    stored floating dtype when uniform, else the config's ``dtype``/``torch_dtype``, else
    float32).
    """
    d = Path(path)
    require_dir(d)
    raw = read_json_file(d / CONFIG_NAME, "Hugging Face model config")
    try:
        cfg = hf_config_to_hybrid(raw)
    except ValueError as e:
        raise ValueError(f"{d / CONFIG_NAME}: {e}") from None
    where, shapes, stored_dtypes = _index_tensors(d, weight_files(d))
    cfg = _resolve_tied_head(cfg, where, shapes)
    with torch.device("meta"):
        model = HybridLM(cfg)
    check_state_dict(model, shapes, str(d))
    if dtype is None:
        dtype = uniform_dtype(stored_dtypes) or _named_dtype(raw.get("dtype") or raw.get("torch_dtype"))
    model = model.to(dtype).to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    _copy_tensors(model, where)
    return model.eval()


def _index_tensors(d: Path, files: list[Path]) -> tuple[TensorIndex, dict[str, torch.Tensor], set[str]]:
    """From the headers alone: where each of our tensors is stored, meta tensors of their shapes,
    and the stored dtypes. ValueError for a tensor stored twice."""
    where: TensorIndex = {}
    shapes: dict[str, torch.Tensor] = {}
    stored_dtypes: set[str] = set()
    for f in files:
        for hf_name, (shape, st_dtype) in read_header(f).items():
            name = hf_to_hybrid_name(hf_name)
            if name is None:
                continue
            if name in where:
                raise ValueError(f"{d}: tensor {name!r} is stored twice ({where[name][1]!r} in "
                                 f"{where[name][0].name}, {hf_name!r} in {f.name})")
            where[name] = (f, hf_name)
            shapes[name] = torch.empty(shape, device="meta")
            stored_dtypes.add(st_dtype)
    return where, shapes, stored_dtypes


def _resolve_tied_head(cfg: HybridConfig, where: TensorIndex, shapes: dict[str, torch.Tensor]) -> HybridConfig:
    """transformers uses a stored lm_head even when tie_word_embeddings is set: keep the tie only
    when the stored head equals the embeddings (then it is dropped from `where` / `shapes`)."""
    if not (cfg.tie_embeddings and "lm_head.weight" in where):
        return cfg
    emb = read_tensor(*where.get("backbone.embeddings.weight", where["lm_head.weight"]))
    head = read_tensor(*where["lm_head.weight"])
    if emb.shape == head.shape and torch.equal(emb, head):
        del where["lm_head.weight"], shapes["lm_head.weight"]
        return cfg
    return cfg.replace(tie_embeddings=False)


def _copy_tensors(model: HybridLM, where: TensorIndex) -> None:
    """Fill the model's parameters from the files, one file in memory at a time."""
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


def _named_dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None) if name else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


# ---- export -------------------------------------------------------------------------------
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
    hf_cfg = hybrid_to_hf_config(model.cfg, model.lm_head.weight.dtype)
    tensors = dict(model.state_dict())  # lm_head.weight is included (a copy is written) when tied
    return write_hf_dir(Path(out_dir), hf_cfg, tensors, max_shard_bytes)


def write_hf_dir(out: Path, hf_cfg: dict[str, Any], tensors: dict[str, torch.Tensor],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """config.json + the tensors, one file or shards + index, atomically; stale weight files of an
    earlier save are removed afterwards (`save_hf_dir`, and the compressed-tensors export)."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out.mkdir(parents=True, exist_ok=True)
    written = _write_weights(out, tensors, _shard(tensors, max_shard_bytes))
    atomic_write_text(out / CONFIG_NAME, config_json(hf_cfg))
    for stale in [out / WEIGHTS_NAME, out / INDEX_NAME, *out.glob("model-*-of-*.safetensors")]:
        if stale.name not in written and stale.is_file() and (stale.name in (WEIGHTS_NAME, INDEX_NAME)
                                                              or SHARD_RE.match(stale.name)):
            stale.unlink()
    return out


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], shards: list[dict[str, torch.Tensor]]) -> set[str]:
    """model.safetensors, or the shards plus their index; returns the names of the files written."""
    if len(shards) == 1:
        save_tensors(shards[0], out / WEIGHTS_NAME, metadata=SAFETENSORS_METADATA)
        return {WEIGHTS_NAME}
    written, weight_map = set(), {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_tensors(shard, out / fname, metadata=SAFETENSORS_METADATA)
        written.add(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2) + "\n")
    return written | {INDEX_NAME}
