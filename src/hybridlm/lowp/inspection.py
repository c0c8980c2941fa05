"""What quantization does to a tensor: block scales, clipped / flushed values, error, a histogram.

`quant_inspect` quantizes one tensor (FP8 per-tensor, or NVFP4 with 1x16 / 16x16 blocks,
optionally after the random Hadamard transform) and returns a `QuantReport`;
`plot_inspect` draws it; `inspect_weights` and `random_tensor` give the tensors that
`hybridlm quant-inspect` looks at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..plotting import pyplot, save_figure
from . import fp8, nvfp4


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


@dataclass
class _Outcome:
    """One format's quantization of a tensor, for `quant_inspect`."""

    deq: Tensor                   # dequantized values, the shape of the input
    scale: float                  # the global (per-tensor) scale
    clipped: float                # fraction of values beyond the format's max after scaling
    block_scales: Tensor | None = None
    counts: dict[float, int] | None = None


def _quantize_fp8(x: Tensor) -> _Outcome:
    scale = float(fp8.current_scale(x))
    clipped = float((x.abs() * scale > fp8.E4M3_MAX * _CLIP_TOL).float().mean())
    return _Outcome(fp8.quantize(x).dequantize(), scale, clipped)


def _quantize_nvfp4(x: Tensor, block: tuple[int, int], stochastic: bool) -> _Outcome:
    rows = nvfp4._block_rows(block, x)
    x2 = nvfp4._as_2d(x)
    qt = nvfp4._quantize_tiles(x2, rows, stochastic, None)
    real = nvfp4._tiles(torch.ones_like(x2), rows) > 0                         # mask out the padding
    mags = qt.values.abs()[real]
    counts = {v: int((mags == v).sum()) for v in nvfp4.E2M1_VALUES}
    scaled = nvfp4._tiles(x2, rows).abs() * qt.encode[:, None, :, None]     # |x| * s_enc / S_b
    clipped = float((scaled > nvfp4.E2M1_MAX * _CLIP_TOL).sum()) / x.numel()
    deq = nvfp4._dequantize_tiles(qt.values, qt.block_scales, qt.s_enc, tuple(x2.shape)).reshape(x.shape)
    return _Outcome(deq, float(qt.s_enc), clipped, qt.block_scales.to(torch.float32), counts)


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
    q = _quantize_fp8(x) if fmt == "fp8" else _quantize_nvfp4(x, block, stochastic)
    err = q.deq - x
    norm_x, norm_e = float(x.norm()), float(err.norm())
    label = "fp8" if fmt == "fp8" else f"nvfp4 {block[0]}x{block[1]}" + (" +RHT" if rht_seed is not None else "")
    report = QuantReport(
        name=name, format=label, shape=tuple(x.shape), amax=float(x.abs().max()), global_scale=q.scale,
        block_scales=q.block_scales,
        zero_blocks=0 if q.block_scales is None else int((q.block_scales == 0).sum()),
        frac_clipped=q.clipped, frac_flushed=float(((x != 0) & (q.deq == 0)).float().mean()),
        rel_error=norm_e / norm_x if norm_x > 0 else 0.0, max_abs_error=float(err.abs().max()),
        mean_error=float(err.mean()),
        sqnr_db=20 * math.log10(norm_x / norm_e) if norm_e > 0 and norm_x > 0 else math.inf,
        value_counts=q.counts or {})
    return report, q.deq


def plot_inspect(x: Tensor, deq: Tensor, report: QuantReport, path: str | Path) -> Path:
    """PNG: histogram of |x| (log) with the dequantized values, and of the block scales."""
    n_plots = 2 if report.block_scales is not None else 1
    fig, axes = pyplot().subplots(1, n_plots, figsize=(5.5 * n_plots, 3.8), squeeze=False)
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
    return save_figure(fig, path)


# ---- the tensors `hybridlm quant-inspect` looks at ---------------------------------------------------
DISTRIBUTIONS = ("normal", "student-t", "lognormal")


def random_tensor(shape_text: str, dist: str = "normal", seed: int = 0) -> tuple[str, Tensor]:
    """(name, tensor) of a synthetic ROWSxCOLS tensor: normal, student-t (df=3, heavy tails) or
    lognormal magnitudes with random signs."""
    try:
        shape = tuple(int(v) for v in shape_text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--random must look like 256x1024, got {shape_text!r}") from None
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"--random must be two positive sizes like 256x1024, got {shape_text!r}")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {dist!r}")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if dist == "student-t":
        chi2 = torch.randn((3, *shape), generator=gen).square().sum(0)
        x = x / (chi2 / 3).sqrt()
    elif dist == "lognormal":
        x = x.exp() * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return f"random {dist} {shape[0]}x{shape[1]}", x


def model_weights(model: torch.nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The weight called `name`, or (None) every 2-D weight of the block stack (the quantized linears)."""
    params = dict(model.named_parameters())
    if name is None:
        return {n: w for n, w in params.items() if n.startswith("backbone.layers.") and w.dim() == 2}
    if name not in params:
        raise ValueError(f"no parameter {name!r}; linear weights are e.g. "
                         f"{', '.join(n for n in params if n.endswith('proj.weight'))[:300]}")
    return {name: params[name]}


def summary_table(tensors: dict[str, Tensor], fmt: str, block: tuple[int, int], rht_seed: int | None) -> str:
    """One line per tensor: shape, relative error, SQNR, clipped and flushed percentages."""
    lines = [f"{'weight':<44} {'shape':>12} {'rel err':>8} {'SQNR dB':>8} {'clipped%':>9} {'flushed%':>9}"]
    for name, x in tensors.items():
        r, _ = quant_inspect(x, fmt, block, rht_seed, name=name)
        lines.append(f"{name:<44} {'x'.join(map(str, r.shape)):>12} {r.rel_error:8.4f} {r.sqnr_db:8.2f} "
                     f"{100 * r.frac_clipped:9.3f} {100 * r.frac_flushed:9.3f}")
    return "\n".join(lines)
