"""compressed-tensors checkpoints (the format vLLM loads for Nemotron-H): write them, and read them back dequantized.

A checkpoint is a Hugging Face Nemotron-H directory (`hf_weights`: config.json, one or
sharded safetensors, ``backbone.*`` names) whose config.json has a
``quantization_config`` with ``quant_method: "compressed-tensors"``, and whose quantized
linears store, instead of ``<module>.weight``:

    NVFP4, format "nvfp4-pack-quantized"
        weight_packed        uint8 (out, in/2)            two E2M1 codes per byte, low nibble first
        weight_scale         float8_e4m3fn (out, in/16)   one per 16 consecutive inputs
        weight_global_scale  float32 (1,)
        input_global_scale   float32 (1,)                 W4A4 only (calibrated)
    FP8, format "float-quantized"
        weight               float8_e4m3fn (out, in)
        weight_scale         float32 (1,) per tensor, (out, 1) per channel
        input_scale          float32 (1,)                 static activations only (calibrated)

Global scales follow compressed-tensors: ``weight_global_scale`` / ``input_global_scale``
are *encode* scales ``6 * 448 / amax`` (our `nvfp4` s_enc; ModelOpt stores the
reciprocal), decoding is ``q * (weight_scale / weight_global_scale)``; FP8 scales are
decode scales (``amax / 448``, our `fp8` scale_inv). ``config_groups.group_0`` targets
``Linear``; ``ignore`` names the linears kept in high precision (``lm_head``, the
high-precision blocks), in both spellings (`ignore_names`). Mamba's conv, A_log, D,
dt_bias and the norms are no Linear and stay dense. vLLM fuses q/k/v into one GEMM with
one global scale (it takes the max of the three), so those three share theirs: `ptq`
quantizes them as one stacked matrix.

Schemes written: with calibration data NVFP4 (W4A4, static ``input_global_scale``) and
FP8 (static per-tensor ``input_scale``); without it NVFP4A16 (weight only) and
FP8_DYNAMIC-style activations (dynamic per token). `load_compressed` reads these and the
same schemes written by compressed-tensors itself; other schemes (int4 / AWQ / GPTQ
``pack-quantized``, FP8 blocks, MXFP4, sparsity, transforms, other ``quant_method``\\ s)
are refused with a ValueError naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..lowp import ptq
from ..lowp.linear import LowPrecisionLinear
from ..lowp.recipe import Recipe, as_recipe
from ..model.lm import HybridLM
from .checkpoint import CONFIG_NAME, check_state_dict
from .files import read_header, read_json_file, read_tensor, require_dir
from .hf_config import hf_config_to_hybrid, hybrid_to_hf_config
from .hf_weights import (DEFAULT_MAX_SHARD_BYTES, _copy_tensors, _index_tensors, _resolve_tied_head, weight_files,
                         write_hf_dir)

QUANT_KEY = "quantization_config"
QUANT_METHOD = "compressed-tensors"
CT_VERSION = "0.20.1"  # the compressed-tensors release whose layout and config this follows
FORMATS = {"nvfp4": "nvfp4-pack-quantized", "fp8": "float-quantized"}
_FP8_FORMATS = ("float-quantized", "naive-quantized")
_QPARAMS = ("weight_packed", "weight_scale", "weight_global_scale", "weight_zero_point", "input_scale",
            "input_global_scale", "input_zero_point")
_KV_SCALES = ("k_scale", "v_scale", "q_scale")
_FUSED = ("q_proj", "k_proj", "v_proj")  # vLLM's qkv_proj


# ---- the quantization_config ----------------------------------------------------------------
def _weight_args(fmt: str, granularity: str) -> dict[str, Any]:
    if fmt == "nvfp4":
        return {"dynamic": False, "group_size": 16, "num_bits": 4, "scale_dtype": "torch.float8_e4m3fn",
                "strategy": "tensor_group", "symmetric": True, "type": "float"}
    return {"dynamic": False, "group_size": None, "num_bits": 8, "strategy": granularity, "symmetric": True,
            "type": "float"}


def _input_args(fmt: str, static: bool) -> dict[str, Any] | None:
    if fmt == "nvfp4":
        return None if not static else {
            "dynamic": "local", "group_size": 16, "num_bits": 4, "observer": "static_minmax",
            "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group", "symmetric": True, "type": "float"}
    if static:
        return {"dynamic": False, "group_size": None, "num_bits": 8, "observer": "static_minmax",
                "strategy": "tensor", "symmetric": True, "type": "float"}
    return {"dynamic": True, "group_size": None, "num_bits": 8, "strategy": "token", "symmetric": True,
            "type": "float"}


def scheme_name(fmt: str, granularity: str, static: bool) -> str:
    """The compressed-tensors preset a scheme is (or is closest to)."""
    if fmt == "nvfp4":
        return "NVFP4" if static else "NVFP4A16"
    weights = "" if granularity == "tensor" else f" ({granularity} weights)"
    return ("FP8" if static else "FP8_DYNAMIC") + weights


def quantization_config(fmt: str, granularity: str = "tensor", static_inputs: bool = False,
                        ignore: Iterable[str] = ("lm_head",)) -> dict[str, Any]:
    """The ``quantization_config`` of config.json, key for key what compressed-tensors writes."""
    if fmt not in FORMATS:
        raise ValueError(f"quantization format must be one of {tuple(FORMATS)}, got {fmt!r}")
    group = {"format": FORMATS[fmt], "input_activations": _input_args(fmt, static_inputs),
             "output_activations": None, "targets": ["Linear"], "weights": _weight_args(fmt, granularity)}
    return {"config_groups": {"group_0": group}, "format": FORMATS[fmt], "global_compression_ratio": None,
            "ignore": list(ignore), "kv_cache_scheme": None, "moe_sparsity_config": None,
            "quant_method": QUANT_METHOD, "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


# ---- export ---------------------------------------------------------------------------------
@dataclass
class CompressedExport:
    out: Path
    scheme: str            # NVFP4 | NVFP4A16 | FP8 | FP8_DYNAMIC (+ weight granularity)
    quantized: list[str]   # linears written quantized
    ignored: list[str]     # linears kept in high precision (the config's ``ignore``)
    high_precision: list[int]
    calibrated: bool       # static activation scales from calibration data

    def summary(self) -> str:
        kept = ",".join(map(str, self.high_precision)) or "none"
        return (f"{self.scheme}: {len(self.quantized)} linears quantized, {len(self.ignored)} kept in high "
                f"precision (blocks {kept}, lm_head); activation scales "
                f"{'calibrated' if self.calibrated else 'dynamic' if 'FP8' in self.scheme else 'none (weight-only)'}"
                f" -> {self.out}")


def ignore_names(keep: list[str]) -> list[str]:
    """The config's ``ignore``: each kept linear by its checkpoint name (``backbone.*``, which vLLM maps) and
    by transformers' in-memory name (``model.*``, which compressed-tensors matches when transformers loads it)."""
    out = []
    for name in keep:
        out.append(name)
        if name.startswith("backbone."):
            out.append("model." + name[len("backbone."):])
    return out


def fused_groups(names: list[str]) -> list[list[str]]:
    """Linears that share scales: q/k/v of one attention layer (all three quantized), else one each."""
    groups, seen = [], set()
    for name in names:
        parent, _, leaf = name.rpartition(".")
        trio = [f"{parent}.{p}" for p in _FUSED]
        if leaf in _FUSED and all(t in names for t in trio):
            if parent not in seen:
                seen.add(parent)
                groups.append(trio)
        else:
            groups.append([name])
    return groups


def _trained_plan(model: HybridLM) -> tuple[Recipe, ptq.PtqPlan] | None:
    """The recipe and the quantized linears of a model that `apply_recipe` turned into LowPrecisionLinears."""
    lowp = {n: m.recipe for n, m in model.named_modules() if isinstance(m, LowPrecisionLinear)}
    if not lowp:
        return None
    recipes = set(lowp.values())
    if len(recipes) != 1:
        raise ValueError(f"the model's LowPrecisionLinears use several recipes: {sorted(r.name for r in recipes)}")
    recipe = recipes.pop()
    keep = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in lowp]
    kept_blocks = sorted({int(n.split(".")[2]) for n in keep if n.startswith("backbone.layers.")})
    return recipe, ptq.PtqPlan(list(lowp), keep, kept_blocks)


def _resolve(model: HybridLM, fmt: str | None, recipe: Recipe | str | None, high_precision_layers: Any
             ) -> tuple[str, tuple[int, int], ptq.PtqPlan]:
    """(format, NVFP4 weight block, plan): a training recipe's own block and layers, or PTQ's 1x16."""
    trained = _trained_plan(model) if recipe is None else None
    recipe = trained[0] if trained is not None else (as_recipe(recipe) if recipe is not None else None)
    if recipe is not None:
        if recipe.format == "bf16":
            raise ValueError("recipe 'bf16' quantizes nothing; give the precision the model was trained with")
        if fmt is not None and fmt != recipe.format:
            raise ValueError(f"format {fmt!r} does not match the training recipe {recipe.name!r}")
        fmt = recipe.format
    fmt = fmt or "nvfp4"
    plan = trained[1] if trained is not None else ptq.plan_linears(model, fmt, high_precision_layers)
    block = (16, 16) if fmt == "nvfp4" and recipe is not None and recipe.weight_2d else (1, 16)
    return fmt, block, plan


def _quantized_tensors(model: HybridLM, fmt: str, block: tuple[int, int], granularity: str,
                       groups: list[list[str]], amax: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``<module>.<param>`` -> tensor for every quantized linear (the weight replaced, bias kept)."""
    out: dict[str, torch.Tensor] = {}
    for group in groups:
        weights = [model.get_submodule(n).weight for n in group]
        if fmt == "nvfp4":
            parts = [{"weight_packed": q.packed, "weight_scale": q.scale, "weight_global_scale": q.global_scale}
                     for q in ptq.quantize_nvfp4_weights(weights, block)]
        else:
            parts = [{"weight": q.data, "weight_scale": q.scale}
                     for q in ptq.quantize_fp8_weights(weights, granularity)]
        if amax is not None:
            a = torch.stack([amax[n] for n in group]).amax()
            key, scale = (("input_global_scale", ptq.nvfp4_input_global_scale(a)) if fmt == "nvfp4"
                          else ("input_scale", ptq.fp8_input_scale(a)))
            for p in parts:
                p[key] = scale.clone()
        for name, p in zip(group, parts):
            out.update({f"{name}.{k}": v.contiguous() for k, v in p.items()})
    return out


def export_compressed(model: HybridLM, out_dir: str | Path, fmt: str | None = None, calib: Iterable | None = None,
                      high_precision_layers: str | Iterable[int] = "auto", fp8_granularity: str = "tensor",
                      recipe: Recipe | str | None = None, dtype: torch.dtype | None = None,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> CompressedExport:
    """Write `model` as a compressed-tensors Nemotron-H directory (`fmt` "nvfp4" or "fp8").

    PTQ: the block-stack linears except `high_precision_layers` (default 'auto': what the
    NVFP4 / Nemotron-H papers keep in BF16), NVFP4 weights in 1x16 groups. A model trained
    with ``--precision`` (`recipe`, or LowPrecisionLinears left by `apply_recipe`): its
    quantized linears, NVFP4 weights in its 16x16 tiles, so the stored weights are what the
    training forward computed with (q/k/v aside: they get one shared global scale).
    `calib` (token batches, see `ptq.calibration_amax`) gives static activation scales;
    without it NVFP4 is weight-only and FP8 activations are dynamic. `dtype` casts the
    dense tensors (default: keep).
    """
    fmt, block, plan = _resolve(model, fmt, recipe, high_precision_layers)
    if fp8_granularity not in ptq.FP8_GRANULARITIES:
        raise ValueError(f"fp8_granularity must be one of {ptq.FP8_GRANULARITIES}, got {fp8_granularity!r}")
    if not plan.quantize:
        raise ValueError("nothing to quantize: every linear is kept in high precision")
    hf = hybrid_to_hf_config(model.cfg, dtype or model.lm_head.weight.dtype)  # fails early for what HF cannot hold
    amax = ptq.calibration_amax(model, plan.quantize, calib) if calib is not None else None
    tensors = {k: (v if dtype is None else v.to(dtype)) for k, v in model.state_dict().items()}
    for name in plan.quantize:
        del tensors[f"{name}.weight"]
    tensors.update(_quantized_tensors(model, fmt, block, fp8_granularity, fused_groups(plan.quantize), amax))
    hf[QUANT_KEY] = quantization_config(fmt, fp8_granularity, amax is not None, ignore_names(plan.keep))
    out = write_hf_dir(Path(out_dir), hf, tensors, max_shard_bytes)
    return CompressedExport(out, scheme_name(fmt, fp8_granularity, amax is not None), plan.quantize, plan.keep,
                            plan.high_precision, amax is not None)


# ---- reading: which schemes --------------------------------------------------------------
def has_quantization_config(path: str | Path) -> bool:
    """True when the HF directory's config.json has a ``quantization_config`` (of any method)."""
    raw = read_json_file(Path(path) / CONFIG_NAME, "model config")
    return isinstance(raw, dict) and raw.get(QUANT_KEY) is not None


def _describe(args: dict[str, Any] | None) -> str:
    if not args:
        return "none"
    strategy = args.get("strategy")
    size = f"({args['group_size']})" if args.get("group_size") else ""
    block = f"({'x'.join(map(str, args['block_structure']))})" if args.get("block_structure") else ""
    return f"{args.get('type', 'int')}{args.get('num_bits', 8)} {strategy}{size}{block}"


def _scheme_kind(name: str, group: Any, default_format: str | None) -> str:
    """'nvfp4' or 'fp8' for a supported config group; ValueError naming the scheme otherwise."""
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise ValueError(f"compressed-tensors config group {name!r}: only weight-quantized schemes are "
                         f"supported (got {group!r})")
    w, fmt = group["weights"], group.get("format") or default_format
    kind = None
    if w.get("type") == "float" and w.get("symmetric", True) and not w.get("actorder"):
        if fmt == FORMATS["nvfp4"] and w.get("num_bits") == 4 and w.get("group_size") == 16:
            kind = "nvfp4"
        elif fmt in _FP8_FORMATS and w.get("num_bits") == 8 and w.get("strategy") in ptq.FP8_GRANULARITIES:
            kind = "fp8"
    if kind is None:
        raise ValueError(f"compressed-tensors scheme of group {name!r} is not supported: format {fmt!r}, weights "
                         f"{_describe(w)}, input activations {_describe(group.get('input_activations'))} "
                         "(supported: NVFP4 / NVFP4A16 'nvfp4-pack-quantized', FP8 per-tensor / per-channel "
                         "'float-quantized')")
    return kind


def parse_quantization_config(qc: Any, where: str) -> tuple[list[tuple[str, list[str], str]], list[str], bool]:
    """([(group, targets, kind)], ignore, has kv-cache scales) of a supported ``quantization_config``."""
    if not isinstance(qc, dict):
        raise ValueError(f"{where}: quantization_config must be a JSON object")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"{where}: quantization method {method!r} is not supported (only {QUANT_METHOD!r} "
                         "NVFP4 and FP8 checkpoints)")
    for key in ("sparsity_config", "transform_config", "moe_sparsity_config"):
        if qc.get(key):
            raise ValueError(f"{where}: compressed-tensors {key} is not supported")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"{where}: quantization_config has no config_groups")
    out = []
    for name, group in groups.items():
        kind = _scheme_kind(name, group, qc.get("format"))
        out.append((name, list(group.get("targets") or []), kind))
    return out, list(qc.get("ignore") or []), qc.get("kv_cache_scheme") is not None


def _matches(names: tuple[str, ...], module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return any(re.match(target[3:], n) for n in names)
    return target in names or target == type(module).__name__


# ---- reading: tensors ----------------------------------------------------------------------
def _quantized_modules(where: dict[str, tuple[Path, str]], dtypes: dict[str, str]) -> dict[str, str]:
    """module -> 'nvfp4' | 'fp8' from the stored tensor names and dtypes."""
    kinds = {}
    for name in where:
        module, _, param = name.rpartition(".")
        if param == "weight_packed":
            kinds[module] = "nvfp4"
        elif param == "weight" and dtypes[name] == "F8_E4M3" and f"{module}.weight_scale" in where:
            kinds[module] = "fp8"
    return kinds


def _check_targets(model: HybridLM, kinds: dict[str, str], where: dict[str, tuple[Path, str]],
                   groups: list[tuple[str, list[str], str]], ignore: list[str], d: Path) -> None:
    """Each quantized module is targeted (and not ignored) by a group of its kind, and vice versa."""
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "weight", None), nn.Parameter) or module.weight.dim() != 2:
            continue
        stored = where.get(f"{name}.weight", where.get(f"{name}.weight_packed", (None, name + ".")))[1]
        names = (name, stored.rpartition(".")[0], re.sub(r"^backbone\.", "model.", name))
        ignored = any(_matches(names, module, t) for t in ignore)
        group = next((g for g in groups if any(_matches(names, module, t) for t in g[1])), None)
        want = None if ignored or group is None else group[2]
        if want != kinds.get(name):
            raise ValueError(f"{d}: {name} is stored {kinds.get(name) or 'unquantized'} but quantization_config "
                             f"{'ignores it' if ignored else f'gives it {want}' if want else 'targets no group for it'}")


def _dequantized(kind: str, parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if kind == "nvfp4":
        for p in ("weight_scale", "weight_global_scale"):
            if p not in parts:
                raise ValueError(f"{name}: NVFP4 weight without its {p}")
        return ptq.nvfp4_dequantize(parts["weight_packed"], parts["weight_scale"], parts["weight_global_scale"])
    zp = parts.get("weight_zero_point")
    if zp is not None and bool(zp.to(torch.float32).ne(0).any()):
        raise ValueError(f"{name}: asymmetric FP8 weights (non-zero weight_zero_point) are not supported")
    return ptq.fp8_dequantize(parts["weight"], parts["weight_scale"])


def _split_qparams(where: dict[str, tuple[Path, str]], shapes: dict[str, torch.Tensor], kinds: dict[str, str],
                   kv_scales: bool) -> dict[str, dict[str, tuple[Path, str]]]:
    """Move the quantized modules' tensors out of `where` (and give `shapes` their dense weight shapes)."""
    parts: dict[str, dict[str, tuple[Path, str]]] = {m: {} for m in kinds}
    for name in list(where):
        module, _, param = name.rpartition(".")
        if module in kinds and (param in _QPARAMS or param == "weight"):
            parts[module][param] = where.pop(name)
            shape = shapes.pop(name).shape
            if param in ("weight", "weight_packed"):
                rows, cols = shape
                shapes[f"{module}.weight"] = torch.empty(rows, cols * (2 if param == "weight_packed" else 1),
                                                         device="meta")
        elif kv_scales and param in _KV_SCALES:
            where.pop(name)
            shapes.pop(name)
    return parts


def load_compressed(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> HybridLM:
    """`HybridLM` from a compressed-tensors Nemotron-H directory, every quantized weight dequantized exactly
    (``q * scale`` for FP8, ``q * (weight_scale / weight_global_scale)`` for NVFP4, in float32).

    ``dtype=None`` gives float32 (the dequantized values are exact there; dense bf16 tensors
    upcast exactly). ValueError naming the scheme for what is not supported.
    """
    d = Path(path)
    require_dir(d)
    raw = read_json_file(d / CONFIG_NAME, "Hugging Face model config")
    groups, ignore, kv_scales = parse_quantization_config(raw.get(QUANT_KEY) if isinstance(raw, dict) else None,
                                                          str(d / CONFIG_NAME))
    try:
        cfg = hf_config_to_hybrid({k: v for k, v in raw.items() if k != QUANT_KEY})
    except ValueError as e:
        raise ValueError(f"{d / CONFIG_NAME}: {e}") from None
    files = weight_files(d)
    where, shapes, _ = _index_tensors(d, files)
    dtypes = {n: s for f in files for n, s in _header_dtypes(f, where).items()}
    kinds = _quantized_modules(where, dtypes)
    parts = _split_qparams(where, shapes, kinds, kv_scales)
    cfg = _resolve_tied_head(cfg, where, shapes)
    with torch.device("meta"):
        model = HybridLM(cfg)
    check_state_dict(model, shapes, str(d))
    _check_targets(model, kinds, {**where, **{f"{m}.{p}": v for m, ps in parts.items() for p, v in ps.items()}},
                   groups, ignore, d)
    model = model.to(dtype or torch.float32).to_empty(device=device)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    _copy_tensors(model, where)
    with torch.no_grad():
        for module, ps in parts.items():
            tensors = {p: read_tensor(*loc) for p, loc in ps.items()}
            model.get_submodule(module).weight.copy_(_dequantized(kinds[module], tensors, module))
    return model.eval()


def _header_dtypes(f: Path, where: dict[str, tuple[Path, str]]) -> dict[str, str]:
    """our name -> safetensors dtype for the tensors of file `f`."""
    header = read_header(f)
    return {name: header[hf][1] for name, (file, hf) in where.items() if file == f}
