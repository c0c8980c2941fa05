"""Low-precision training: FP8 (Nemotron-H) and NVFP4 recipes for the linear layers.

    fp8.py         E4M3 with per-tensor current scaling, `torch._scaled_mm` on CUDA >= 8.9, exact simulation elsewhere
    nvfp4.py       E2M1 + E4M3 block scales + FP32 tensor scale, 2D blocks, RHT, stochastic rounding, packing
    recipe.py      `Recipe` (bf16 | fp8 | nvfp4 and ablations), which blocks stay high precision
    linear.py      `LowPrecisionLinear` (fprop/dgrad/wgrad quantized), `apply_recipe` / `remove_recipe`,
                   `DataParallelQuant` (DDP / FSDP2 ranks quantize as one process)
    inspection.py  `quant_inspect`: block scales, clipped / flushed values, error, histogram
"""

from .linear import AppliedRecipe, DataParallelQuant, LowPrecisionLinear, apply_recipe, remove_recipe
from .recipe import Recipe

__all__ = ["AppliedRecipe", "DataParallelQuant", "LowPrecisionLinear", "Recipe", "apply_recipe", "remove_recipe"]
