"""Low-precision training recipes: `Recipe`, `LowPrecisionLinear`, `apply_recipe`, `quant_inspect`.

A linear layer runs three GEMMs per training step; a recipe decides how each is quantized:

    fprop  y  = x  @ W^T    (T, in) x (in, out)      reduction over `in`
    dgrad  dx = dy @ W      (T, out) x (out, in)     reduction over `out`
    wgrad  dW = dy^T @ x    (out, T) x (T, in)       reduction over the tokens T

* ``bf16``: no GEMM quantization (the compute dtype stays what ``--dtype`` says: bf16
  autocast on CUDA, fp32 on CPU). `apply_recipe` leaves the model untouched.
* ``fp8`` (Nemotron-H): x, W and dy in E4M3 with per-tensor current scaling
  (:mod:`hybridlm.fp8`); real FP8 GEMMs via ``torch._scaled_mm`` on CUDA cc >= 8.9.
* ``nvfp4`` (NVFP4 pretraining paper, :mod:`hybridlm.nvfp4`): 1x16 blocks along each
  GEMM's reduction dimension for x and dy, 16x16 blocks for W (so fprop and dgrad see
  the same quantized W); a 16x16 random Hadamard transform on both wgrad operands along
  T; stochastic rounding for dy, round-to-nearest-even for x and W. Ablations:
  ``nvfp4-no-rht``, ``nvfp4-no-sr``, ``nvfp4-no-2d`` (combinable: ``nvfp4-no-rht-no-sr``).

Master weights, optimizer state, biases, norms, the SSD scan, attention scores,
embeddings and ``lm_head`` stay in high precision; only the linears of the block stack
are quantized, except the blocks named by ``high_precision_layers`` (both papers keep
the first/last few in BF16). Checkpoints hold plain weights: `apply_recipe` changes the
class of existing ``nn.Linear`` modules in place, so parameter names, state dicts,
``isinstance(m, nn.Linear)`` and hooks already registered all keep working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import fp8, nvfp4

FORMATS = ("bf16", "fp8", "nvfp4")
NVFP4_ABLATIONS = {"rht": "rht", "sr": "stochastic_rounding", "2d": "weight_2d"}


# -------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """How the three GEMMs of a quantized linear are computed (the NVFP4 switches are ignored otherwise)."""

    format: str = "bf16"              # bf16 | fp8 | nvfp4
    rht: bool = True                  # nvfp4: random Hadamard transform on the wgrad operands
    stochastic_rounding: bool = True  # nvfp4: stochastic rounding of the output gradient dy
    weight_2d: bool = True            # nvfp4: 16x16 weight blocks (else 1x16 along each GEMM's reduction dim)
    rht_seed: int = 0                 # nvfp4: seed of the RHT's random signs (fixed for the whole run)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"precision format must be one of {FORMATS}, got {self.format!r}")

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """'bf16' | 'fp8' | 'nvfp4' with optional '-no-rht', '-no-sr', '-no-2d' suffixes (nvfp4 only)."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"precision must be a non-empty string, got {text!r}")
        head, *offs = text.lower().split("-no-")
        if head not in FORMATS:
            raise ValueError(f"precision {text!r}: format must be one of {FORMATS} "
                             "(nvfp4 ablations: nvfp4-no-rht, nvfp4-no-sr, nvfp4-no-2d)")
        if offs and head != "nvfp4":
            raise ValueError(f"precision {text!r}: only nvfp4 has -no-rht/-no-sr/-no-2d ablations")
        flags = {}
        for off in offs:
            if off not in NVFP4_ABLATIONS or NVFP4_ABLATIONS[off] in flags:
                raise ValueError(f"precision {text!r}: unknown or repeated ablation '-no-{off}' "
                                 f"(choose from {', '.join('-no-' + k for k in NVFP4_ABLATIONS)})")
            flags[NVFP4_ABLATIONS[off]] = False
        return cls(format=head, **flags)

    @property
    def name(self) -> str:
        if self.format != "nvfp4":
            return self.format
        return "nvfp4" + "".join(f"-no-{k}" for k, attr in NVFP4_ABLATIONS.items() if not getattr(self, attr))


def as_recipe(recipe: Recipe | str) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.parse(recipe)


# ------------------------------------------------------------- high-precision layers


def check_layer_spec(spec: str) -> None:
    """Syntax check of a --high-precision-layers value (ranges are checked against a model later)."""
    layer_spec_indices(spec, None, "bf16")


def default_high_precision(fmt: str, n_layers: int) -> set[int]:
    """'auto': fp8 keeps the first and the last block in BF16; nvfp4 the first round(2/62) and the last
    max(1, round(8/62)) of the blocks (the NVFP4 12B run kept its first 2 and last 8 of 62 blocks, ~16%)."""
    if fmt == "bf16" or n_layers == 0:
        return set()
    first, last = (1, 1) if fmt == "fp8" else (round(2 * n_layers / 62), max(1, round(8 * n_layers / 62)))
    return set(range(min(first, n_layers))) | set(range(max(0, n_layers - last), n_layers))


def layer_spec_indices(spec: str, n_layers: int | None, fmt: str) -> set[int]:
    """Block indices named by `spec`: 'auto', 'none' / '', or a comma list of 'first:N', 'last:N' and
    indices (negative counts from the end), e.g. 'first:1,last:4' or '0,5,7'."""
    spec = (spec or "").strip().lower()
    if spec == "auto":
        return default_high_precision(fmt, n_layers) if n_layers is not None else set()
    if spec in ("", "none"):
        return set()
    out: set[int] = set()
    for token in (t.strip() for t in spec.split(",")):
        kind, sep, count = token.partition(":")
        try:
            value = int(count if sep else token)
        except ValueError:
            raise ValueError(f"--high-precision-layers: bad item {token!r} (want first:N, last:N, an index, "
                             "'auto' or 'none')") from None
        if sep and (kind not in ("first", "last") or value < 0):
            raise ValueError(f"--high-precision-layers: bad item {token!r} (want first:N or last:N with N >= 0)")
        if n_layers is None:
            continue
        if sep:
            out |= set(range(min(value, n_layers))) if kind == "first" else set(range(max(0, n_layers - value),
                                                                                        n_layers))
        elif -n_layers <= value < n_layers:
            out.add(value % n_layers)
        else:
            raise ValueError(f"--high-precision-layers: layer {value} out of range for a {n_layers}-layer model")
    return out


# ---------------------------------------------------------------------- the GEMMs


def _quantized_gemms(recipe: Recipe):
    return {"bf16": _ExactGemms, "fp8": _Fp8Gemms, "nvfp4": _Nvfp4Gemms}[recipe.format]


class _ExactGemms:
    """No quantization: the three GEMMs in the input precision (reference for the autograd plumbing)."""

    @staticmethod
    def fprop(x: Tensor, w: Tensor, recipe: Recipe) -> tuple[Tensor, tuple]:
        return x @ w.t(), (x, w)

    @staticmethod
    def backward(dy: Tensor, saved: tuple, recipe: Recipe, need_dx: bool, need_dw: bool):
        x, w = saved
        return (dy @ w if need_dx else None), (dy.t() @ x if need_dw else None)


class _Fp8Gemms:
    """E4M3, per-tensor current scaling for x, W and dy; dy is quantized once for dgrad and wgrad."""

    @staticmethod
    def fprop(x: Tensor, w: Tensor, recipe: Recipe) -> tuple[Tensor, tuple]:
        xq, wq = fp8.quantize(x), fp8.quantize(w)
        return fp8.fp8_matmul(xq, wq.t()), (xq, wq)

    @staticmethod
    def backward(dy: Tensor, saved: tuple, recipe: Recipe, need_dx: bool, need_dw: bool):
        xq, wq = saved
        dyq = fp8.quantize(dy)
        dx = fp8.fp8_matmul(dyq, wq) if need_dx else None          # (T, out) @ (out, in)
        dw = fp8.fp8_matmul(dyq.t(), xq) if need_dw else None      # (out, T) @ (T, in)
        return dx, dw


class _Nvfp4Gemms:
    """NVFP4 (simulated: exact quantization, FP32 GEMM); blocks of 16 along each GEMM's reduction dim."""

    @staticmethod
    def fprop(x: Tensor, w: Tensor, recipe: Recipe) -> tuple[Tensor, tuple]:
        xq = nvfp4.fake_quantize(x)                                                  # (T, in), blocks along in
        wq = nvfp4.fake_quantize(w, (16, 16) if recipe.weight_2d else (1, 16))       # (out, in)
        return xq @ wq.t(), (x, w, wq)

    @staticmethod
    def backward(dy: Tensor, saved: tuple, recipe: Recipe, need_dx: bool, need_dw: bool):
        x, w, wq = saved
        sr = recipe.stochastic_rounding
        dx = dw = None
        if need_dx:
            dyq = nvfp4.fake_quantize(dy, stochastic=sr)                             # (T, out), blocks along out
            # 2D: the same tiles serve W and W^T; 1D: W re-quantized in blocks along out
            w_b = wq if recipe.weight_2d else nvfp4.fake_quantize(w.t()).t()        # (out, in)
            dx = dyq @ w_b
        if need_dw:
            if recipe.rht:  # both operands along T, so dy^T x is unchanged in exact arithmetic
                x, dy = nvfp4.apply_rht(x, recipe.rht_seed, 0), nvfp4.apply_rht(dy, recipe.rht_seed, 0)
            dy_t = nvfp4.fake_quantize(dy.t(), stochastic=sr)                        # (out, T), blocks along T
            x_t = nvfp4.fake_quantize(x.t())                                         # (in, T), blocks along T
            dw = dy_t @ x_t.t()
        return dx, dw


class _LowPrecisionLinearFn(torch.autograd.Function):
    """y = x W^T + b with the three GEMMs quantized per `recipe`. x (T, in), float32 throughout."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, recipe: Recipe) -> Tensor:
        gemms = _quantized_gemms(recipe)
        y, saved = gemms.fprop(x, weight, recipe)
        if bias is not None:
            y = y + bias
        ctx.recipe, ctx.saved, ctx.has_bias = recipe, saved, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        gemms = _quantized_gemms(ctx.recipe)
        dy = dy.contiguous()
        dx, dw = gemms.backward(dy, ctx.saved, ctx.recipe, need_dx, need_dw)
        db = dy.sum(0) if (ctx.has_bias and need_db) else None
        ctx.saved = None
        return dx, dw, db, None


class LowPrecisionLinear(nn.Linear):
    """`nn.Linear` whose fprop/dgrad/wgrad GEMMs follow a `Recipe` (same parameters and state dict).

    Inputs of any leading shape; computation in float32 (the quantized values are exact
    in it), output in the autocast dtype when autocast is on, else in the input dtype.
    """

    recipe: Recipe

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Recipe | str = "bf16",
                 device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.recipe = as_recipe(recipe)

    @classmethod
    def convert(cls, linear: nn.Linear, recipe: Recipe | str) -> "LowPrecisionLinear":
        """Turn an existing nn.Linear into a LowPrecisionLinear in place (same object, same parameters)."""
        if type(linear) not in (nn.Linear, cls):
            raise ValueError(f"can only convert a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.recipe = as_recipe(recipe)
        return linear  # type: ignore[return-value]

    def restore(self) -> nn.Linear:
        """Back to a plain nn.Linear in place (e.g. to finish training in BF16)."""
        self.__class__ = nn.Linear
        del self.recipe
        return self

    def forward(self, x: Tensor) -> Tensor:
        dev = x.device.type
        out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        with torch.autocast(dev, enabled=False):
            x2 = x.reshape(-1, self.in_features).to(torch.float32)
            bias = None if self.bias is None else self.bias.to(torch.float32)
            y = _LowPrecisionLinearFn.apply(x2, self.weight.to(torch.float32), bias, self.recipe)
        return y.reshape(*x.shape[:-1], self.out_features).to(out_dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe.name}"


# ------------------------------------------------------------------ model surgery


@dataclass
class AppliedRecipe:
    recipe: Recipe
    quantized: list[str]        # names of the linears now quantized
    high_precision: list[int]   # block indices kept in high precision
    n_layers: int

    def summary(self) -> str:
        if self.recipe.format == "bf16":
            return "precision bf16: no GEMM quantization"
        kept = ",".join(map(str, self.high_precision)) or "none"
        return (f"precision {self.recipe.name}: {len(self.quantized)} block linears quantized, "
                f"blocks kept in BF16: {kept} (of {self.n_layers}); embeddings and lm_head in high precision")


def _block_stack(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError("apply_recipe needs a HybridLM-like model (model.backbone.layers), "
                         f"got {type(model).__name__}")
    return layers


def apply_recipe(model: nn.Module, recipe: Recipe | str, high_precision_layers: str | Iterable[int] = "auto"
                 ) -> AppliedRecipe:
    """Quantize the GEMMs of every nn.Linear in the block stack except the `high_precision_layers` blocks.

    In place; embeddings, norms and lm_head are never touched. 'bf16' changes nothing
    (and turns LowPrecisionLinears from an earlier call back into nn.Linear).
    """
    recipe = as_recipe(recipe)
    layers = _block_stack(model)
    n = len(layers)
    if isinstance(high_precision_layers, str):
        keep = layer_spec_indices(high_precision_layers, n, recipe.format)
    else:
        keep = set(layer_spec_indices(",".join(str(int(i)) for i in high_precision_layers) or "none", n, recipe.format))
    quantized = []
    for i, block in enumerate(layers):
        for name, module in block.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            if recipe.format == "bf16" or i in keep:
                if isinstance(module, LowPrecisionLinear):
                    module.restore()
            else:
                LowPrecisionLinear.convert(module, recipe)
                quantized.append(f"backbone.layers.{i}.{name}")
    return AppliedRecipe(recipe, quantized, sorted(keep) if recipe.format != "bf16" else [], n)


def remove_recipe(model: nn.Module) -> int:
    """Turn every LowPrecisionLinear of `model` back into nn.Linear; returns how many."""
    found = [m for m in model.modules() if isinstance(m, LowPrecisionLinear)]
    for m in found:
        m.restore()
    return len(found)


# ---------------------------------------------------------------------- inspection


_CLIP_TOL = 1 + 1e-6  # amax * (max / amax) may exceed max by an ulp: not a clip


@dataclass
class QuantReport:
    """What quantizing one tensor did to it (see `quant_inspect`)."""

    name: str
    format: str
    shape: tuple[int, ...]
    amax: float
    global_scale: float            # fp8: 448 / amax; nvfp4: s_enc = 6 * 448 / amax
    block_scales: Tensor | None    # nvfp4: decoded E4M3 block scales S_b (Rb, Cb), float32
    zero_blocks: int               # nvfp4: blocks whose scale underflowed E4M3 (all flushed)
    frac_clipped: float            # values beyond the format's max after scaling (saturated)
    frac_flushed: float            # non-zero values that became zero
    rel_error: float               # ||q - x|| / ||x||
    max_abs_error: float
    mean_error: float              # mean(q - x): bias of the rounding
    sqnr_db: float                 # 20 log10(||x|| / ||q - x||)
    value_counts: dict[float, int] # nvfp4: how often each E2M1 magnitude was used

    def format_text(self, max_scales: int = 8) -> str:
        lines = [f"{self.name}: {self.format}, shape {tuple(self.shape)}, amax {self.amax:.4g}, "
                 f"global scale {self.global_scale:.4g}"]
        if self.block_scales is not None:
            s = self.block_scales.flatten()
            nz = s[s > 0]
            lines.append(f"  block scales (E4M3, {s.numel()} blocks): min {nz.min().item() if nz.numel() else 0:.4g}"
                         f"  median {s.median().item():.4g}  max {s.max().item():.4g}  zero {self.zero_blocks}")
            rows = self.block_scales[: max_scales, : max_scales]
            lines.append("  first block scales:")
            lines += ["    " + " ".join(f"{v:8.4g}" for v in row.tolist()) for row in rows]
            total = sum(self.value_counts.values()) or 1
            lines.append("  E2M1 magnitudes used: " + "  ".join(
                f"{k:g}:{100 * c / total:.1f}%" for k, c in self.value_counts.items()))
        lines.append(f"  clipped (saturated) {100 * self.frac_clipped:.3f}%   flushed to zero "
                     f"{100 * self.frac_flushed:.3f}%")
        lines.append(f"  error: relative L2 {self.rel_error:.4g}  max abs {self.max_abs_error:.4g}  "
                     f"mean (bias) {self.mean_error:.3g}  SQNR {self.sqnr_db:.2f} dB")
        return "\n".join(lines)


def quant_inspect(x: Tensor, fmt: str = "nvfp4", block: tuple[int, int] = (1, 16), rht_seed: int | None = None,
                  stochastic: bool = False, name: str = "tensor") -> tuple[QuantReport, Tensor]:
    """Quantize `x` (fp8 per-tensor, or nvfp4 with `block` along the last dim, optionally after the RHT
    within each 16-block of that dim) and report block scales, clipping, flushing and error.

    Returns (report, dequantized x); with the RHT both refer to the transformed (zero-padded) tensor.
    """
    if fmt not in ("fp8", "nvfp4"):
        raise ValueError(f"quant_inspect format must be fp8 or nvfp4, got {fmt!r}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty tensor")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name}: {bad} non-finite value(s); quantization would turn the whole tensor into NaN")
    x = x.detach().to(torch.float32)
    if rht_seed is not None:  # within each 16-block of the quantization (last) dim; padding kept
        x = nvfp4.apply_rht(x, rht_seed, -1)
    if fmt == "fp8":
        q = fp8.quantize(x)
        deq = q.dequantize()
        scale = float(fp8.current_scale(x))
        clipped = float((x.abs() * scale > fp8.E4M3_MAX * _CLIP_TOL).float().mean())
        block_scales, zero_blocks, counts = None, 0, {}
    else:
        rows = nvfp4._block_rows(block, x)
        x2 = nvfp4._as_2d(x)
        qt = nvfp4._quantize_tiles(x2, rows, stochastic, None)
        real = nvfp4._tiles(torch.ones_like(x2), rows) > 0                         # mask out the padding
        mags = qt.values.abs()[real]
        counts = {v: int((mags == v).sum()) for v in nvfp4.E2M1_VALUES}
        scaled = nvfp4._tiles(x2, rows).abs() * qt.encode[:, None, :, None]     # |x| * s_enc / S_b
        clipped = float((scaled > nvfp4.E2M1_MAX * _CLIP_TOL).sum()) / x.numel()
        deq = nvfp4._dequantize_tiles(qt.values, qt.block_scales, qt.s_enc, tuple(x2.shape)).reshape(x.shape)
        scale = float(qt.s_enc)
        block_scales = qt.block_scales.to(torch.float32)
        zero_blocks = int((block_scales == 0).sum())
    err = deq - x
    norm_x, norm_e = float(x.norm()), float(err.norm())
    report = QuantReport(
        name=name, format=fmt if fmt == "fp8" else f"nvfp4 {block[0]}x{block[1]}" + (" +RHT" if rht_seed is not None
                                                                                      else ""),
        shape=tuple(x.shape), amax=float(x.abs().max()), global_scale=scale, block_scales=block_scales,
        zero_blocks=zero_blocks, frac_clipped=clipped,
        frac_flushed=float(((x != 0) & (deq == 0)).float().mean()),
        rel_error=norm_e / norm_x if norm_x > 0 else 0.0, max_abs_error=float(err.abs().max()),
        mean_error=float(err.mean()),
        sqnr_db=20 * math.log10(norm_x / norm_e) if norm_e > 0 and norm_x > 0 else math.inf,
        value_counts=counts)
    return report, deq


def plot_inspect(x: Tensor, deq: Tensor, report: QuantReport, path: str | Path) -> Path:
    """PNG: histogram of |x| (log) with the dequantized values, and of the block scales."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_plots = 2 if report.block_scales is not None else 1
    fig, axes = plt.subplots(1, n_plots, figsize=(5.5 * n_plots, 3.8), squeeze=False)
    a = x.detach().float().abs().flatten()
    d = deq.detach().float().abs().flatten()
    lo = max(float(a[a > 0].min()) if bool((a > 0).any()) else 1e-8, 1e-12)
    bins = torch.logspace(math.log10(lo), math.log10(max(float(a.max()), lo * 10)), 80).numpy()
    ax = axes[0][0]
    ax.hist(a[a > 0].numpy(), bins=bins, alpha=0.6, label="|x|")
    ax.hist(d[d > 0].numpy(), bins=bins, alpha=0.6, label="|dequantized|")
    ax.set_xscale("log")
    ax.set_title(f"{report.name} ({report.format})\nrel err {report.rel_error:.3g}, "
                 f"flushed {100 * report.frac_flushed:.2f}%")
    ax.legend()
    if report.block_scales is not None:
        s = report.block_scales.flatten()
        axes[0][1].hist(s[s > 0].numpy(), bins=60)
        axes[0][1].set_title(f"E4M3 block scales ({report.zero_blocks} zero)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
