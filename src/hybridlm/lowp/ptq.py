"""Post-training quantization (PTQ) math: which linears, calibration amax, and weights quantized for storage.

The storage layouts are the ones inference engines load (compressed-tensors, vLLM); the
file format itself is `hybridlm.interop.compressed`'s business.

* **NVFP4 weight** (`NVFP4Weight`): E2M1 codes packed two per byte (first element in the
  low nibble), one E4M3 decode scale ``S_b`` per 16 consecutive elements of a row, one
  FP32 *encode* scale ``s_enc = 6 * 448 / amax`` per tensor. Decoding is
  ``w = q * (S_b / s_enc)``, in that order, in float32: the order of compressed-tensors'
  decompressor, so both give the same bits. (`nvfp4.NVFP4Tensor.dequantize` computes
  ``q * S_b / s_enc``; the two differ by at most one float32 ulp.) The codes and scales
  come from `nvfp4.quantize`: 1x16 blocks (PTQ), or 16x16 tiles (a model trained with
  ``--precision nvfp4``), whose tile scale is then repeated on each of its 16 rows.
* **FP8 weight** (`FP8Weight`): E4M3 values and an FP32 decode scale, per tensor (1,) or
  per output channel (out, 1), from `fp8.quantize`: ``w = q * scale``.
* **Shared scales.** Engines fuse some linears into one GEMM with one scale (vLLM's
  ``qkv_proj``: q, k and v of an attention layer). The ``*_weights`` functions take such a
  group and quantize it with one global (NVFP4) / per-tensor (FP8) scale, as if the
  weights were one stacked matrix.
* **Activations.** `calibration_amax` runs the model over calibration token batches and
  records each linear's input amax (forward pre-hooks); `nvfp4_input_global_scale` and
  `fp8_input_scale` turn it into the static scales. `fake_quantize_input` /
  `simulated_activations` apply them as a W4A4 / W8A8 engine does (to measure the loss of
  a quantized checkpoint with its activations quantized too).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import fp8, nvfp4
from .recipe import layer_spec_indices

PTQ_FORMATS = ("nvfp4", "fp8")
FP8_GRANULARITIES = ("tensor", "channel")


# ---------------------------------------------------------------------- storage types


@dataclass
class NVFP4Weight:
    """A weight (out, in) in NVFP4 storage: ``w = e2m1(packed) * (scale / global_scale)``."""

    packed: Tensor        # uint8 (out, in/2)
    scale: Tensor         # float8_e4m3fn (out, in/16): S_b, per 1x16 group
    global_scale: Tensor  # float32 (1,): s_enc = 6*448/amax, the encode scale (decode divides by it)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return nvfp4_dequantize(self.packed, self.scale, self.global_scale).to(dtype)


@dataclass
class FP8Weight:
    """A weight (out, in) in FP8 storage: ``w = data * scale``."""

    data: Tensor   # float8_e4m3fn (out, in)
    scale: Tensor  # float32 (1,) per tensor, or (out, 1) per output channel

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return fp8_dequantize(self.data, self.scale).to(dtype)


def nvfp4_dequantize(packed: Tensor, scale: Tensor, global_scale: Tensor) -> Tensor:
    """float32 (out, in) from packed codes (out, in/2), E4M3 group scales (out, in/16) and the encode scale."""
    q = nvfp4.e2m1_decode(nvfp4.unpack_fp4(packed))
    out, n = q.shape
    if scale.shape != (out, n // nvfp4.BLOCK) or n % nvfp4.BLOCK:
        raise ValueError(f"NVFP4 scale shape {tuple(scale.shape)} does not fit codes of shape {(out, n)} "
                         f"(want {(out, n // nvfp4.BLOCK)})")
    decode = _to_float32(scale) / global_scale.to(torch.float32).reshape(1)
    return (q.view(out, -1, nvfp4.BLOCK) * decode[..., None]).reshape(out, n)


def fp8_dequantize(data: Tensor, scale: Tensor) -> Tensor:
    """float32 ``data * scale`` (scale (1,), (out, 1) or broadcastable)."""
    return fp8.e4m3_to_float(data) * scale.to(torch.float32)


def _to_float32(t: Tensor) -> Tensor:
    return fp8.e4m3_to_float(t) if t.dtype == fp8.E4M3 else t.to(torch.float32)


# ---------------------------------------------------------------------- quantization


def _check_group(weights: Sequence[Tensor], what: str) -> None:
    if not weights:
        raise ValueError(f"{what}: no weights given")
    if any(w.dim() != 2 for w in weights) or len({w.shape[1] for w in weights}) != 1:
        raise ValueError(f"{what}: want 2-D weights with one in_features, got {[tuple(w.shape) for w in weights]}")
    bad = sum(int((~torch.isfinite(w)).sum()) for w in weights)
    if bad:
        raise ValueError(f"{what}: {bad} non-finite weight value(s) (NaN/inf) cannot be quantized")


def quantize_nvfp4_weights(weights: Sequence[Tensor], block: tuple[int, int] = (1, nvfp4.BLOCK)
                           ) -> list[NVFP4Weight]:
    """NVFP4 storage of weights (out_i, in) sharing one global scale (one weight, or a fused group).

    `block` (1, 16): each row's 16-element groups get their own scale (PTQ); (16, 16): the
    tiles of `--precision nvfp4` training, so the stored weights are the ones its forward saw.
    in_features must be a multiple of 16.
    """
    _check_group(weights, "NVFP4 weights")
    n = weights[0].shape[1]
    if n % nvfp4.BLOCK:
        raise ValueError(f"NVFP4 needs in_features divisible by {nvfp4.BLOCK}, got {n}")
    rows = block[0]
    padded = [torch.nn.functional.pad(w.detach().to(torch.float32), (0, 0, 0, -w.shape[0] % rows)) for w in weights]
    t = nvfp4.quantize(torch.cat(padded), block)                           # one amax -> one s_enc for all
    scales = t.block_scales.view(torch.uint8).repeat_interleave(rows, 0).view(fp8.E4M3)  # (sum R', in/16)
    out, start = [], 0
    for w, p in zip(weights, padded):
        r = w.shape[0]
        out.append(NVFP4Weight(t.packed[start:start + r].clone(), scales[start:start + r].clone(),
                               t.global_scale.reshape(1).to(torch.float32).clone()))
        start += p.shape[0]
    return out


def _fp8_parts(x: Tensor) -> tuple[Tensor, Tensor]:
    q = fp8.quantize(x)
    return q.data, q.scale_inv


def quantize_fp8_weights(weights: Sequence[Tensor], granularity: str = "tensor") -> list[FP8Weight]:
    """FP8 storage of weights (out_i, in): one per-tensor scale shared by the group, or one per row."""
    if granularity not in FP8_GRANULARITIES:
        raise ValueError(f"FP8 granularity must be one of {FP8_GRANULARITIES}, got {granularity!r}")
    _check_group(weights, "FP8 weights")
    ws = [w.detach().to(torch.float32) for w in weights]
    if granularity == "channel":
        with warnings.catch_warnings():  # vmap has no batching rule for clamp_ yet: a loop in C++, correct
            warnings.simplefilter("ignore", UserWarning)
            parts = [torch.func.vmap(_fp8_parts)(w) for w in ws]
        return [FP8Weight(data, scale.reshape(-1, 1)) for data, scale in parts]
    data, scale = _fp8_parts(torch.cat(ws))
    out, start = [], 0
    for w in ws:
        out.append(FP8Weight(data[start:start + w.shape[0]].clone(), scale.reshape(1).clone()))
        start += w.shape[0]
    return out


def nvfp4_input_global_scale(amax: float | Tensor) -> Tensor:
    """float32 (1,) static activation encode scale 6*448/amax (compressed-tensors' ``input_global_scale``)."""
    return nvfp4.global_encode_scale(torch.as_tensor(amax, dtype=torch.float32)).reshape(1)


def fp8_input_scale(amax: float | Tensor) -> Tensor:
    """float32 (1,) static activation decode scale amax/448 as `fp8.quantize` makes it (``input_scale``)."""
    return fp8.current_scale(torch.as_tensor(amax, dtype=torch.float32).reshape(1)).reciprocal().reshape(1)


# ---------------------------------------------------------------------- what, and calibration


@dataclass
class PtqPlan:
    quantize: list[str]        # linears to quantize (module names)
    keep: list[str]            # linears kept in high precision (lm_head, the high-precision blocks, unfit shapes)
    high_precision: list[int]  # block indices kept in high precision


def plan_linears(model: nn.Module, fmt: str, high_precision_layers: str | Iterable[int] = "auto") -> PtqPlan:
    """Which nn.Linear of `model` to quantize: those of the block stack (``backbone.layers``) except
    the `high_precision_layers` blocks (the `--high-precision-layers` syntax; 'auto' as in training)
    and, for NVFP4, linears whose in_features is not a multiple of 16. lm_head is never quantized."""
    if fmt not in PTQ_FORMATS:
        raise ValueError(f"quantization format must be one of {PTQ_FORMATS}, got {fmt!r}")
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"PTQ needs a HybridLM-like model (model.backbone.layers), got {type(model).__name__}")
    n = len(layers)
    if isinstance(high_precision_layers, str):
        keep_blocks = layer_spec_indices(high_precision_layers, n, fmt)
    else:
        keep_blocks = layer_spec_indices(",".join(str(int(i)) for i in high_precision_layers) or "none", n, fmt)
    plan = PtqPlan([], [], sorted(keep_blocks))
    block_of = {f"backbone.layers.{i}.{name}": i for i, b in enumerate(layers) for name, _ in b.named_modules()}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        block = block_of.get(name)
        fits = fmt != "nvfp4" or module.in_features % nvfp4.BLOCK == 0
        (plan.quantize if block is not None and block not in keep_blocks and fits else plan.keep).append(name)
    return plan


def _batch_ids(batch, device: torch.device) -> Tensor:
    ids = batch[0] if isinstance(batch, (tuple, list)) and batch and torch.is_tensor(batch[0]) else batch
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    return ids.to(device=device, dtype=torch.long)


@torch.no_grad()
def calibration_amax(model: nn.Module, names: Sequence[str], batches: Iterable) -> dict[str, Tensor]:
    """Input amax (float32 scalar) of each named linear over calibration token batches.

    A batch is a (b, l) tensor of token ids, a list of id lists, or an (ids, targets) pair.
    ValueError when there are no batches, a batch is empty, a named linear never ran, or an
    activation is non-finite.
    """
    amax: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().amax().to(torch.float32)
            amax[name] = torch.maximum(amax[name], a) if name in amax else a
        return hook

    device = next(model.parameters()).device
    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    was_training, n_batches = model.training, 0
    model.eval()
    try:
        for batch in batches:
            ids = _batch_ids(batch, device)
            if ids.numel() == 0:
                raise ValueError(f"calibration batch {n_batches} has no tokens")
            model(ids)
            n_batches += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("calibration data is empty: give at least one batch of token ids")
    missing = [n for n in names if n not in amax]
    bad = [n for n, a in amax.items() if not torch.isfinite(a)]
    if missing or bad:
        raise ValueError(f"calibration: linears that never ran {missing[:4]}, non-finite activations in {bad[:4]}")
    return amax


# ---------------------------------------------------------------------- activations at inference


def fake_quantize_input(x: Tensor, fmt: str, scale: Tensor | None) -> Tensor:
    """The activation (..., in) a W4A4 / W8A8 GEMM sees, in float32.

    nvfp4: 1x16 blocks along `in` under the static encode scale `scale` (``input_global_scale``);
    the E4M3 block scales are computed on the fly and saturate at 448, values at +-6.
    fp8: static per-tensor decode scale `scale` (``input_scale``; saturating at +-448), or
    dynamic per-token current scaling (`fp8.quantize` per row) when `scale` is None.
    """
    x32 = x.to(torch.float32)
    if fmt == "nvfp4":
        if scale is None:
            raise ValueError("NVFP4 activations need a static input_global_scale (calibrate)")
        n = x32.shape[-1]
        t = x32.reshape(-1, n // nvfp4.BLOCK, nvfp4.BLOCK)
        s_enc = scale.to(torch.float32).reshape(())
        s_b = fp8.e4m3_to_float(nvfp4.block_decode_scales(t.abs().amax(-1), s_enc))
        enc = torch.where(s_b > 0, s_enc / s_b, torch.zeros_like(s_b))
        q = nvfp4.e2m1_round(t * enc[..., None])
        return (q * (s_b / s_enc)[..., None]).reshape(x32.shape)
    if scale is not None:
        s = scale.to(torch.float32).reshape(())
        return fp8.e4m3_to_float((x32 / s).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3)) * s
    rows = x32.reshape(-1, x32.shape[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        data, scale_inv = torch.func.vmap(_fp8_parts)(rows)
    return (fp8.e4m3_to_float(data) * scale_inv[:, None]).reshape(x32.shape)


@contextlib.contextmanager
def simulated_activations(model: nn.Module, fmt: str, scales: Mapping[str, Tensor | None]) -> Iterator[None]:
    """Within the block, the named linears of `model` see `fake_quantize_input` of their input."""
    def hook_for(scale: Tensor | None):
        def hook(module: nn.Module, args: tuple) -> tuple:
            return (fake_quantize_input(args[0], fmt, scale).to(args[0].dtype), *args[1:])
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(s)) for n, s in scales.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
