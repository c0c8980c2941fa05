"""`LowPrecisionLinear` and `apply_recipe`: the quantized GEMMs of a `Recipe` inside a model.

Master weights, optimizer state, biases, norms, the SSD scan, attention scores,
embeddings and ``lm_head`` stay in high precision; only the linears of the block stack
are quantized, except the blocks named by ``high_precision_layers``. Checkpoints hold
plain weights: `apply_recipe` changes the class of existing ``nn.Linear`` modules in
place, so parameter names, state dicts, ``isinstance(m, nn.Linear)`` and hooks already
registered all keep working.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from . import fp8, nvfp4
from .recipe import Recipe, as_recipe, layer_spec_indices


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
