"""FP8 E4M3 with per-tensor *current* scaling (the Nemotron-H FP8 recipe).

Every tensor is scaled by its own amax, computed on the fly each time it is quantized:

    scale = 448 / amax(|x|)            (1 when the tensor is all zeros)
    q     = e4m3(x * scale)            round-to-nearest-even, |q| <= 448
    x    ~= q * scale_inv              scale_inv = 1 / scale (FP32)

`fp8_matmul` multiplies two quantized operands: on CUDA with compute capability >= 8.9
(Ada, Hopper, Blackwell) with the real FP8 tensor-core GEMM `torch._scaled_mm`,
elsewhere by exact simulation (the E4M3 values upcast to FP32, an FP32 matmul, the two
scales applied to the FP32 result, as `_scaled_mm` does).

Non-finite input: a NaN or inf anywhere makes amax non-finite and the whole
dequantized tensor NaN (so a training step's loss or gradient norm goes non-finite and
the trainer skips the step); `torch`'s own E4M3 cast would silently saturate inf to 448.

Scales are correctly rounded FP32 divisions (as TransformerEngine computes them):
``448 / amax`` with a Python number on the left is evaluated by torch as
``reciprocal(amax) * 448``, two roundings, 1 ulp off for about a quarter of all amax
values. `const_div` / `div_const` divide by a tensor on the same device instead (a CPU
scalar divisor is also turned into a reciprocal multiply on CUDA).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
F32_MAX = torch.finfo(torch.float32).max
_MM_ALIGN = 16  # _scaled_mm wants every GEMM dimension a multiple of 16


_E4M3_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(E4M3).to(torch.float32)  # code -> value


def e4m3_to_float(data: Tensor) -> Tensor:
    """float32 values of an E4M3 tensor (on CPU a 256-entry table lookup: ~6x faster than torch's cast)."""
    if data.device.type != "cpu":
        return data.to(torch.float32)
    codes = data.contiguous().view(torch.uint8).reshape(-1).to(torch.int32)
    return _E4M3_TABLE.index_select(0, codes).view(data.shape)


@dataclass
class FP8Tensor:
    """E4M3 data plus the FP32 per-tensor decode scale: x ~= data * scale_inv."""

    data: Tensor       # float8_e4m3fn, the shape of the original tensor
    scale_inv: Tensor  # float32 scalar

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (e4m3_to_float(self.data) * self.scale_inv).to(dtype)

    def t(self) -> "FP8Tensor":
        return FP8Tensor(self.data.t(), self.scale_inv)


def const_div(numerator: float, t: Tensor) -> Tensor:
    """`numerator / t` as one correctly rounded division in `t`'s dtype (not ``reciprocal(t) * numerator``)."""
    return torch.full_like(t, numerator) / t


def div_const(t: Tensor, denominator: float) -> Tensor:
    """`t / denominator` as one correctly rounded division on every device (CUDA multiplies by the
    reciprocal of a CPU-scalar divisor)."""
    return t / torch.full_like(t, denominator)


AmaxReduce = Callable[[Tensor], Tensor]  # local amax (FP32 scalar) -> the amax of the whole tensor


def reduced_amax(local_amax: Tensor, reduce_amax: AmaxReduce | None) -> Tensor:
    """`reduce_amax(local_amax)` (the amax over every rank's part of a tensor split across
    processes, see `hybridlm.lowp.linear.DataParallelQuant`), NaN where this rank's own part is
    non-finite (whatever the reduction does with NaN); `local_amax` itself without a reduction."""
    if reduce_amax is None:
        return local_amax
    amax = reduce_amax(local_amax.clone())
    return torch.where(torch.isfinite(local_amax), amax, torch.full_like(amax, float("nan")))


def current_scale(x: Tensor, reduce_amax: AmaxReduce | None = None) -> Tensor:
    """FP32 scalar 448 / amax(|x|), correctly rounded (capped at the FP32 max for a tiny amax,
    1 for an all-zero tensor, NaN for a non-finite amax); `reduce_amax`: see `reduced_amax`."""
    amax = reduced_amax(x.detach().abs().amax().to(torch.float32), reduce_amax)
    scale = torch.where(amax > 0, const_div(E4M3_MAX, amax).clamp(max=F32_MAX), torch.ones_like(amax))
    return torch.where(torch.isfinite(amax), scale, torch.full_like(amax, float("nan")))


def quantize(x: Tensor, reduce_amax: AmaxReduce | None = None) -> FP8Tensor:
    """Per-tensor current-scaled E4M3 quantization of `x` (any shape); with `reduce_amax`, the
    scale of the whole tensor `x` is one part of (`reduced_amax`)."""
    scale = current_scale(x, reduce_amax)
    data = (x.detach().to(torch.float32) * scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return FP8Tensor(data, scale.reciprocal())


def fake_quantize(x: Tensor) -> Tensor:
    """quantize then dequantize, in float32: the value an FP8 GEMM sees."""
    return quantize(x).dequantize()


def scaled_mm_available(device: torch.device | str) -> bool:
    """True where `torch._scaled_mm` runs a real FP8 GEMM: CUDA, compute capability >= 8.9."""
    device = torch.device(device)
    return device.type == "cuda" and _cuda_fp8(device.index)


@functools.lru_cache(maxsize=None)
def _cuda_fp8(index: int | None) -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability(index) >= (8, 9)


def _pad_to(t: Tensor, rows: int, cols: int) -> Tensor:
    r, c = t.shape
    if (r, c) == (rows, cols):
        return t
    return F.pad(t.view(torch.uint8), (0, cols - c, 0, rows - r)).view(t.dtype)  # zero bytes = +0.0


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def fp8_matmul_scaled_mm(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """a (M, K) @ b (K, N) with `torch._scaled_mm` (operands zero-padded to multiples of 16)."""
    (m, k), n = a.data.shape, b.data.shape[1]
    mp, kp, np_ = _round_up(m, _MM_ALIGN), _round_up(k, _MM_ALIGN), _round_up(n, _MM_ALIGN)
    a_pad = _pad_to(a.data.contiguous(), mp, kp)                 # row-major (M, K)
    b_pad = _pad_to(b.data.t().contiguous(), np_, kp).t()        # column-major (K, N)
    out = torch._scaled_mm(a_pad, b_pad, scale_a=a.scale_inv.reshape(()).float(),
                           scale_b=b.scale_inv.reshape(()).float(), out_dtype=out_dtype)
    return out[:m, :n]


def fp8_matmul_simulated(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """a (M, K) @ b (K, N) in FP32 on the E4M3 values, then the two scales (what `_scaled_mm` computes)."""
    out = (e4m3_to_float(a.data) @ e4m3_to_float(b.data)) * (a.scale_inv * b.scale_inv)
    return out.to(out_dtype)


def fp8_matmul(a: FP8Tensor, b: FP8Tensor, out_dtype: torch.dtype = torch.float32,
               use_scaled_mm: bool | None = None) -> Tensor:
    """a (M, K) @ b (K, N): real FP8 GEMM where available (or when `use_scaled_mm`), simulation elsewhere."""
    if a.data.dim() != 2 or b.data.dim() != 2 or a.data.shape[1] != b.data.shape[0]:
        raise ValueError(f"fp8_matmul needs (M, K) @ (K, N), got {tuple(a.data.shape)} @ {tuple(b.data.shape)}")
    if use_scaled_mm is None:
        use_scaled_mm = scaled_mm_available(a.data.device)
    if use_scaled_mm:
        return fp8_matmul_scaled_mm(a, b, out_dtype)
    return fp8_matmul_simulated(a, b, out_dtype)
