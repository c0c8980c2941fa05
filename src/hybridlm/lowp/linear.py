"""`LowPrecisionLinear` and `apply_recipe`: the quantized GEMMs of a `Recipe` inside a model.

Master weights, optimizer state, biases, norms, the SSD scan, attention scores,
embeddings and ``lm_head`` stay in high precision; only the linears of the block stack
are quantized, except the blocks named by ``high_precision_layers``. Checkpoints hold
plain weights: `apply_recipe` changes the class of existing ``nn.Linear`` modules in
place, so parameter names, state dicts, ``isinstance(m, nn.Linear)`` and hooks already
registered all keep working.

Data parallelism (DDP, FSDP2): each rank holds rows ``[rank * T, (rank + 1) * T)`` of the
tokens of a global batch that one process would see whole. With a `DataParallelQuant`
(``apply_recipe(..., data_parallel=...)``) the quantization does not depend on that
split: the per-tensor amax of x and dy (FP8 scale, NVFP4 global scale) is all-reduced
(MAX) over the ranks, one 4-byte all-reduce per quantized activation / gradient (the
unsharded weights are the same on every rank); NVFP4 stochastic rounding draws its noise
from `nvfp4.hashed_uniform` at the global (token, column) position, with a key drawn from
the global torch CPU generator once per backward call (every rank seeds it alike and
calls backward alike, and checkpoints save it, so resume stays exact); the RHT's 16-token
blocks line up with the global ones when ``T`` is a multiple of 16. Then 2 ranks with
batch B give one process's batch-2B run up to float summation order. Saved operands go
through ``ctx.save_for_backward`` so activation checkpointing can drop and recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import fp8, nvfp4
from .recipe import Recipe, as_recipe, layer_spec_indices


@dataclass(frozen=True, eq=False)
class DataParallelQuant:
    """The data-parallel ranks whose micro-batches together make the batch one process would quantize."""

    group: Any        # torch.distributed ProcessGroup (None = the default group)
    rank: int         # this process's rank in `group`
    world_size: int

    @classmethod
    def default_group(cls) -> "DataParallelQuant | None":
        """All processes of the initialized default group; None without one, or with one process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return cls(None, dist.get_rank(), dist.get_world_size())

    def reduce_amax(self, amax: Tensor) -> Tensor:
        """MAX of a float32 scalar over the group (collective: every rank quantizes the same tensors)."""
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=self.group)
        return amax

    def __deepcopy__(self, memo: dict) -> "DataParallelQuant":
        return self  # process groups are handles, not copyable state


def _reducer(dp: DataParallelQuant | None):
    return None if dp is None else dp.reduce_amax


def _sr_noise(key: int, n_rows: int, n_cols: int, dp: DataParallelQuant | None, device: torch.device) -> Tensor:
    """Stochastic-rounding uniforms (n_rows tokens, n_cols) at this rank's global token rows."""
    offset = 0 if dp is None else dp.rank * n_rows
    rows = torch.arange(offset, offset + n_rows, device=device)
    return nvfp4.hashed_uniform(key, rows, torch.arange(n_cols, device=device))


def _quantized_gemms(recipe: Recipe):
    return {"bf16": _ExactGemms, "fp8": _Fp8Gemms, "nvfp4": _Nvfp4Gemms}[recipe.format]


# Each GEMM class: fprop(x (T, in), w (out, in), recipe, dp) -> (y (T, out), saved tensors) and
# backward(dy (T, out), saved, recipe, dp, need_dx, need_dw) -> (dx, dw).


class _ExactGemms:
    """No quantization: the three GEMMs in the input precision (reference for the autograd plumbing)."""

    @staticmethod
    def fprop(x: Tensor, w: Tensor, recipe: Recipe, dp: DataParallelQuant | None) -> tuple[Tensor, tuple]:
        return x @ w.t(), (x, w)

    @staticmethod
    def backward(dy: Tensor, saved: tuple, recipe: Recipe, dp: DataParallelQuant | None, need_dx: bool,
                 need_dw: bool):
        x, w = saved
        return (dy @ w if need_dx else None), (dy.t() @ x if need_dw else None)


class _Fp8Gemms:
    """E4M3, per-tensor current scaling for x, W and dy; dy is quantized once for dgrad and wgrad."""

    @staticmethod
    def fprop(x: Tensor, w: Tensor, recipe: Recipe, dp: DataParallelQuant | None) -> tuple[Tensor, tuple]:
        xq, wq = fp8.quantize(x, _reducer(dp)), fp8.quantize(w)
        return fp8.fp8_matmul(xq, wq.t()), (xq.data, xq.scale_inv, wq.data, wq.scale_inv)

    @staticmethod
    def backward(dy: Tensor, saved: tuple, recipe: Recipe, dp: DataParallelQuant | None, need_dx: bool,
                 need_dw: bool):
        xq, wq = fp8.FP8Tensor(*saved[:2]), fp8.FP8Tensor(*saved[2:])
        dyq = fp8.quantize(dy, _reducer(dp))
        dx = fp8.fp8_matmul(dyq, wq) if need_dx else None          # (T, out) @ (out, in)
        dw = fp8.fp8_matmul(dyq.t(), xq) if need_dw else None      # (out, T) @ (T, in)
        return dx, dw


class _Nvfp4Gemms:
    """NVFP4 (simulated: exact quantization, FP32 GEMM); blocks of 16 along each GEMM's reduction dim."""

    @staticmethod
    def fprop(x: Tensor, w: Tensor, recipe: Recipe, dp: DataParallelQuant | None) -> tuple[Tensor, tuple]:
        xq = nvfp4.fake_quantize(x, reduce_amax=_reducer(dp))                       # (T, in), blocks along in
        wq = nvfp4.fake_quantize(w, (16, 16) if recipe.weight_2d else (1, 16))       # (out, in)
        return xq @ wq.t(), (x, w, wq)

    @staticmethod
    def backward(dy: Tensor, saved: tuple, recipe: Recipe, dp: DataParallelQuant | None, need_dx: bool,
                 need_dw: bool):
        x, w, wq = saved
        sr, reduce = recipe.stochastic_rounding, _reducer(dp)
        (t, n_out), dev = dy.shape, dy.device
        keys = torch.randint(0, 2 ** 62, (2,)).tolist() if sr else (0, 0)  # the global CPU generator
        dx = dw = None
        if need_dx:
            noise = _sr_noise(keys[0], t, n_out, dp, dev) if sr else None           # (T, out)
            dyq = nvfp4.fake_quantize(dy, stochastic=sr, reduce_amax=reduce, noise=noise)  # blocks along out
            # 2D: the same tiles serve W and W^T; 1D: W re-quantized in blocks along out
            w_b = wq if recipe.weight_2d else nvfp4.fake_quantize(w.t()).t()        # (out, in)
            dx = dyq @ w_b
        if need_dw:
            if recipe.rht:  # both operands along T, so dy^T x is unchanged in exact arithmetic
                x, dy = nvfp4.apply_rht(x, recipe.rht_seed, 0), nvfp4.apply_rht(dy, recipe.rht_seed, 0)
            noise = _sr_noise(keys[1], t, n_out, dp, dev).t() if sr else None       # (out, T)
            dy_t = nvfp4.fake_quantize(dy.t(), stochastic=sr, reduce_amax=reduce, noise=noise)  # blocks along T
            x_t = nvfp4.fake_quantize(x.t(), reduce_amax=reduce)                     # (in, T), blocks along T
            dw = dy_t @ x_t.t()
        return dx, dw


class _LowPrecisionLinearFn(torch.autograd.Function):
    """y = x W^T + b with the three GEMMs quantized per `recipe`. x (T, in), float32 throughout."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, recipe: Recipe,
                dp: DataParallelQuant | None = None) -> Tensor:
        gemms = _quantized_gemms(recipe)
        y, saved = gemms.fprop(x, weight, recipe, dp)
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(*saved)
        ctx.recipe, ctx.dp, ctx.has_bias = recipe, dp, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        gemms = _quantized_gemms(ctx.recipe)
        dy = dy.contiguous()
        dx, dw = gemms.backward(dy, ctx.saved_tensors, ctx.recipe, ctx.dp, need_dx, need_dw)
        db = dy.sum(0) if (ctx.has_bias and need_db) else None
        return dx, dw, db, None, None


def low_precision_linear(x: Tensor, weight: Tensor, bias: Tensor | None, recipe: Recipe,
                         data_parallel: DataParallelQuant | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` with the GEMMs of `recipe`: x (..., in), weight (out, in).

    Computes in float32 (the quantized values are exact in it); the output is in the
    autocast dtype when autocast is on, else in x's dtype. For modules that hold a linear's
    weight in another form (e.g. concatenated row segments) as well as `LowPrecisionLinear`.
    """
    dev = x.device.type
    out_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        x2 = x.reshape(-1, weight.shape[1]).to(torch.float32)
        b = None if bias is None else bias.to(torch.float32)
        y = _LowPrecisionLinearFn.apply(x2, weight.to(torch.float32), b, recipe, data_parallel)
    return y.reshape(*x.shape[:-1], weight.shape[0]).to(out_dtype)


class LowPrecisionLinear(nn.Linear):
    """`nn.Linear` whose fprop/dgrad/wgrad GEMMs follow a `Recipe` (same parameters and state dict).

    Inputs of any leading shape; computation in float32 (the quantized values are exact
    in it), output in the autocast dtype when autocast is on, else in the input dtype.
    `data_parallel`: see the module docstring.
    """

    recipe: Recipe
    data_parallel: DataParallelQuant | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True, recipe: Recipe | str = "bf16",
                 device: Any = None, dtype: Any = None, data_parallel: DataParallelQuant | None = None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.recipe = as_recipe(recipe)
        self.data_parallel = data_parallel

    @classmethod
    def convert(cls, linear: nn.Linear, recipe: Recipe | str,
                data_parallel: DataParallelQuant | None = None) -> "LowPrecisionLinear":
        """Turn an existing nn.Linear into a LowPrecisionLinear in place (same object, same parameters)."""
        if type(linear) not in (nn.Linear, cls):
            raise ValueError(f"can only convert a plain nn.Linear, got {type(linear).__name__}")
        linear.__class__ = cls
        linear.recipe = as_recipe(recipe)
        linear.data_parallel = data_parallel
        return linear  # type: ignore[return-value]

    def restore(self) -> nn.Linear:
        """Back to a plain nn.Linear in place (e.g. to finish training in BF16)."""
        self.__class__ = nn.Linear
        del self.recipe
        self.__dict__.pop("data_parallel", None)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return low_precision_linear(x, self.weight, self.bias, self.recipe, getattr(self, "data_parallel", None))

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


def apply_recipe(model: nn.Module, recipe: Recipe | str, high_precision_layers: str | Iterable[int] = "auto",
                 data_parallel: DataParallelQuant | None = None) -> AppliedRecipe:
    """Quantize the GEMMs of every nn.Linear in the block stack except the `high_precision_layers` blocks.

    In place; embeddings, norms and lm_head are never touched. 'bf16' changes nothing
    (and turns LowPrecisionLinears from an earlier call back into nn.Linear).
    `data_parallel`: the ranks that split each batch (see the module docstring).
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
                LowPrecisionLinear.convert(module, recipe, data_parallel)
                quantized.append(f"backbone.layers.{i}.{name}")
    return AppliedRecipe(recipe, quantized, sorted(keep) if recipe.format != "bf16" else [], n)


def remove_recipe(model: nn.Module) -> int:
    """Turn every LowPrecisionLinear of `model` back into nn.Linear; returns how many."""
    found = [m for m in model.modules() if isinstance(m, LowPrecisionLinear)]
    for m in found:
        m.restore()
    return len(found)
