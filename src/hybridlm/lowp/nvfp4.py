"""NVFP4: E2M1 elements, one E4M3 scale per 16-element block, one FP32 scale per tensor.

Element format E2M1 (1 sign, 2 exponent, 1 mantissa bit), code = sign << 3 | index::

    index  0    1    2    3    4    5    6    7
    value  0    0.5  1    1.5  2    3    4    6        (code 8 is -0.0)

Two-level scaling of a tensor x (blocks of 16 along the last dimension, the GEMM's
reduction dimension; weights may use 16x16 tiles so that W and W^T share blocks):

    s_enc   = 6 * 448 / amax(|x|)                 FP32 global encode scale (1 if x == 0)
    S_b     = e4m3((amax_b / 6) * s_enc)          per-block decode scale, fits E4M3 by construction
    q       = e2m1(x * s_enc / S_b)               RNE, or stochastic rounding (gradients)
    x      ~= q * S_b / s_enc

A block whose S_b underflows E4M3 (amax_b / amax < 2^-10 / 448, about 2^-19) is flushed
to zero. Values that land above 6 after the E4M3 rounding of S_b saturate to +-6.
Non-finite input: `fake_quantize` returns all-NaN (the trainer then skips the step);
`quantize` (packed storage: E2M1 has no NaN/inf codes) raises ValueError.

Also here: 4-bit packing (two codes per byte, first element in the low nibble), the
16x16 random Hadamard transform (RHT) used on the inputs of the weight-gradient GEMM, and
`hashed_uniform`: stochastic-rounding noise that is a pure function of (key, row, column),
so a tensor split by rows across processes gets the noise the whole tensor would get.
The GEMM itself is simulated: NVFP4 tensor cores exist only on Blackwell.

Both scale formulas are evaluated in FP32 with correctly rounded operations, in the order
written (TransformerEngine's emulation order; 6 * 448 = 2688 is exact): see `fp8.const_div`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .fp8 import E4M3, E4M3_MAX, F32_MAX, AmaxReduce, const_div, div_const, reduced_amax

E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude of code index 0..7
BLOCK = 16
# 2 * |value| -> code index (only the entries 0, 1, 2, 3, 4, 6, 8, 12 are real values)
_INDEX_OF_TWICE = {int(2 * v): i for i, v in enumerate(E2M1_VALUES)}


# ---------------------------------------------------------------------- elements


def e2m1_round(x: Tensor, stochastic: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """Round float `x` to the E2M1 grid (saturating at +-6), keeping the sign (also of zero).

    RNE: ties go to the even mantissa (0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 2.5 -> 2, 5 -> 4).
    Stochastic: round up with probability (|x| - lo) / (hi - lo), so E[q(x)] = x for |x| <= 6.
    On [0, 2) the grid step is 0.5, on [2, 4) it is 1, on [4, 6] it is 2, so rounding
    |x| / step to an integer (torch.round is half-to-even) is exactly E2M1 rounding.
    """
    return torch.copysign(_round_magnitude_(x.abs(), stochastic, generator), x)


def _round_magnitude_(a: Tensor, stochastic: bool, generator: torch.Generator | None,
                      noise: Tensor | None = None) -> Tensor:
    """E2M1 rounding of non-negative `a`, in place (few fresh tensors: large CPU allocations are slow).

    Stochastic rounding adds `noise` (uniform [0, 1), a's shape) or fresh `torch.rand` draws."""
    a.clamp_(max=E2M1_MAX)
    step = a.mul(0.5).floor_().clamp_(0.5, 2)                     # grid step: 0.5 on [0,2), 1 on [2,4), 2 on [4,6]
    a.div_(step)
    if stochastic:
        if noise is None:
            noise = torch.rand(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        a.add_(noise).floor_()
    else:
        a.round_()                                                # half to even
    return a.mul_(step)


def e2m1_encode(values: Tensor) -> Tensor:
    """4-bit codes (uint8 0..15) of values that lie exactly on the E2M1 grid (-0.0 -> code 8)."""
    mag2 = values.abs() * 2
    lut = torch.full((13,), -1, dtype=torch.int64, device=values.device)
    for twice, index in _INDEX_OF_TWICE.items():
        lut[twice] = index
    on_grid = (mag2 == mag2.round()) & (mag2 <= 12)
    idx = lut[torch.where(on_grid, mag2, torch.zeros_like(mag2)).long()]
    if not bool(on_grid.all()) or bool((idx < 0).any()):
        bad = values[~on_grid | (idx < 0)].flatten()[:4].tolist()
        raise ValueError(f"e2m1_encode: values not on the E2M1 grid, e.g. {bad}")
    sign = torch.signbit(values).to(torch.int64) << 3
    return (sign | idx).to(torch.uint8)


def e2m1_decode(codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Float values of 4-bit codes (code 8 decodes to -0.0)."""
    table = torch.tensor(E2M1_VALUES, dtype=dtype, device=codes.device)
    c = codes.to(torch.int64)
    mag = table[c & 7]
    return torch.where((c & 8) != 0, -mag, mag)


def pack_fp4(codes: Tensor) -> Tensor:
    """(..., n) uint8 codes (n even) -> (..., n/2) bytes, element 2i in the low nibble."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs an even last dimension, got {tuple(codes.shape)}")
    if codes.numel() and int(codes.max()) > 15:
        raise ValueError("pack_fp4: codes must be 4-bit (0..15)")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_fp4(packed: Tensor) -> Tensor:
    """Inverse of `pack_fp4`: (..., m) bytes -> (..., 2m) codes."""
    lo, hi = packed & 0x0F, packed >> 4
    return torch.stack([lo, hi], dim=-1).flatten(-2)


# ------------------------------------------------------------------------ scaling


def _block_rows(block: tuple[int, int], x: Tensor) -> int:
    """Rows of a `block` (1 or 16) after checking it, and that 16x16 blocks get a 2-D `x`."""
    if block not in ((1, BLOCK), (BLOCK, BLOCK)):
        raise ValueError(f"NVFP4 block must be (1, 16) or (16, 16), got {block}")
    if block[0] > 1 and x.dim() != 2:
        raise ValueError(f"16x16 NVFP4 blocks need a 2-D tensor, got shape {tuple(x.shape)} (use 1x16 blocks)")
    return block[0]


def _tiles(x: Tensor, rows: int) -> Tensor:
    """(R, C) -> zero-padded (R'/rows, rows, C'/16, 16) tiles."""
    r, c = x.shape
    pr, pc = -r % rows, -c % BLOCK
    if pr or pc:
        x = F.pad(x, (0, pc, 0, pr))
    return x.view((r + pr) // rows, rows, (c + pc) // BLOCK, BLOCK)


def global_encode_scale(amax: Tensor) -> Tensor:
    """FP32 s_enc = 6 * 448 / amax, correctly rounded (1 for amax == 0, capped at the FP32 max)."""
    s = const_div(E2M1_MAX * E4M3_MAX, amax).clamp(max=F32_MAX)
    return torch.where(amax > 0, s, torch.ones_like(s))


def block_decode_scales(block_amax: Tensor, s_enc: Tensor) -> Tensor:
    """E4M3 S_b = e4m3((amax_b / 6) * s_enc), each FP32 step correctly rounded (saturating at 448)."""
    return (div_const(block_amax, E2M1_MAX) * s_enc).clamp(max=E4M3_MAX).to(E4M3)


@dataclass
class _Quantized:
    """Internal result of block quantization, in tile layout (R'/rows, rows, C'/16, 16)."""

    values: Tensor        # float32 E2M1 grid values
    block_scales: Tensor  # float8_e4m3fn (R'/rows, C'/16): S_b
    s_enc: Tensor         # float32 scalar
    encode: Tensor        # float32 (R'/rows, C'/16): s_enc / S_b (0 for a flushed block)
    amax: Tensor          # float32 scalar


def _quantize_tiles(x2d: Tensor, rows: int, stochastic: bool, generator: torch.Generator | None,
                    reduce_amax: AmaxReduce | None = None, noise: Tensor | None = None) -> _Quantized:
    t = _tiles(x2d.detach().to(torch.float32), rows)                     # (Rb, rows, Cb, 16)
    mag = t.abs()
    block_amax = mag.amax(dim=(1, 3)) if rows > 1 else mag.amax(dim=3).squeeze(1)  # (Rb, Cb)
    amax = block_amax.amax() if block_amax.numel() else block_amax.new_zeros(())
    amax = reduced_amax(amax, reduce_amax)
    s_enc = global_encode_scale(amax)
    s_block = block_decode_scales(block_amax, s_enc)
    s_block_f = s_block.to(torch.float32)
    enc = torch.where(s_block_f > 0, (s_enc / s_block_f).clamp(max=F32_MAX), torch.zeros_like(s_block_f))
    mag.mul_(enc[:, None, :, None])
    noise_tiles = None if noise is None else _tiles(noise.to(torch.float32), rows)
    values = _round_magnitude_(mag, stochastic, generator, noise_tiles).copysign_(t)
    return _Quantized(values, s_block, s_enc, enc, amax)


def _dequantize_tiles(values: Tensor, s_block: Tensor, s_enc: Tensor, shape: tuple[int, int]) -> Tensor:
    """q * S_b / s_enc cropped to `shape`; overwrites `values`."""
    decode = s_block.to(torch.float32)[:, None, :, None]
    tiles = values.mul_(decode).div_(s_enc)
    rb, rows, cb, _ = tiles.shape
    return tiles.reshape(rb * rows, cb * BLOCK)[: shape[0], : shape[1]]


def _as_2d(x: Tensor) -> Tensor:
    if x.dim() == 0:
        raise ValueError("NVFP4 quantization needs a tensor with at least one dimension")
    return x.reshape(-1, x.shape[-1])


def fake_quantize(x: Tensor, block: tuple[int, int] = (1, BLOCK), stochastic: bool = False,
                  generator: torch.Generator | None = None, reduce_amax: AmaxReduce | None = None,
                  noise: Tensor | None = None) -> Tensor:
    """NVFP4 quantize + dequantize of `x` (blocks along the last dim), float32, shape of `x`.

    `block=(16, 16)` needs a 2-D `x`; then fake_quantize(W, (16,16)).T == fake_quantize(W.T, (16,16)).
    `reduce_amax`: `x` is one part of a tensor split across processes, s_enc is the whole
    tensor's (`fp8.reduced_amax`). `noise`: the stochastic-rounding uniforms, x's 2-D shape
    (e.g. `hashed_uniform`), instead of fresh draws from `generator`.
    """
    rows = _block_rows(block, x)
    x2 = _as_2d(x)
    if noise is not None and tuple(noise.shape) != tuple(x2.shape):
        raise ValueError(f"noise shape {tuple(noise.shape)} != the 2-D input shape {tuple(x2.shape)}")
    q = _quantize_tiles(x2, rows, stochastic, generator, reduce_amax, noise)
    s_enc = torch.where(torch.isfinite(q.amax), q.s_enc, float("nan"))  # non-finite input: all NaN
    return _dequantize_tiles(q.values, q.block_scales, s_enc, tuple(x2.shape)).reshape(x.shape)


# ------------------------------------------------------------------ packed storage


@dataclass
class NVFP4Tensor:
    """Packed NVFP4 storage of a tensor: 4-bit codes, E4M3 block scales, FP32 global scale."""

    packed: Tensor        # uint8 (R', C'/2): two E2M1 codes per byte, padded shape
    block_scales: Tensor  # float8_e4m3fn (R'/rows, C'/16)
    global_scale: Tensor  # float32 scalar s_enc (decode divides by it)
    shape: tuple[int, ...]
    block: tuple[int, int]

    def dequantize(self) -> Tensor:
        rows = self.block[0]
        values = e2m1_decode(unpack_fp4(self.packed))                    # (R', C')
        rp, cp = values.shape
        tiles = values.view(rp // rows, rows, cp // BLOCK, BLOCK)
        shape2d = (math.prod(self.shape[:-1]), self.shape[-1])
        return _dequantize_tiles(tiles, self.block_scales, self.global_scale, shape2d).reshape(self.shape)

    def nbytes(self) -> int:
        return self.packed.numel() + self.block_scales.numel() + 4


def quantize(x: Tensor, block: tuple[int, int] = (1, BLOCK), stochastic: bool = False,
             generator: torch.Generator | None = None) -> NVFP4Tensor:
    """Packed NVFP4 encoding of a finite tensor `x` (ValueError for NaN/inf: E2M1 cannot hold them)."""
    rows = _block_rows(block, x)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"cannot encode {bad} non-finite value(s) (NaN/inf) in NVFP4")
    q = _quantize_tiles(_as_2d(x), rows, stochastic, generator)
    rb, r, cb, _ = q.values.shape
    codes = e2m1_encode(q.values.reshape(rb * r, cb * BLOCK))
    return NVFP4Tensor(pack_fp4(codes), q.block_scales, q.s_enc, tuple(x.shape), block)


# ------------------------------------------------------- random Hadamard transform


def hadamard(n: int = BLOCK, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sylvester Hadamard matrix (n x n, entries +-1), n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _rht_matrix_f64(seed: int, n: int) -> Tensor:
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return hadamard(n, torch.float64) * signs.to(torch.float64) / math.sqrt(n)


def rht_matrix(seed: int, n: int = BLOCK, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> Tensor:
    """Orthogonal R = H diag(s) / sqrt(n) with random signs s drawn from `seed` (R R^T = I).

    Built once per (seed, n) (it is needed in every wgrad); the caller gets its own copy.
    """
    return _rht_matrix_f64(seed, n).to(dtype=dtype, device=device, copy=True)


def apply_rht(x: Tensor, seed: int, dim: int = 0) -> Tensor:
    """Apply R to every block of 16 along `dim` (zero-padded to a multiple of 16; the padding is kept).

    For a GEMM reducing over `dim`, a^T b == rht(a)^T rht(b): the transform cancels exactly.
    """
    x = x.movedim(dim, 0)
    n = x.shape[0]
    pad = -n % BLOCK
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))], 0)
    r = rht_matrix(seed, BLOCK, x.dtype, x.device)
    blocks = x.reshape(x.shape[0] // BLOCK, BLOCK, -1)                   # (nb, 16, rest)
    out = torch.matmul(r, blocks).reshape(x.shape)
    return out.movedim(0, dim)


# ------------------------------------------------------ position-keyed uniform noise

_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)   # SplitMix64's increment, as a signed int64
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _srl(z: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """SplitMix64's finalizer on int64 tensors (wrapping multiplies): a bijection that scrambles bits."""
    z = (z ^ _srl(z, 30)) * _MIX1
    z = (z ^ _srl(z, 27)) * _MIX2
    return z ^ _srl(z, 31)


def hashed_uniform(key: int, rows: Tensor, cols: Tensor) -> Tensor:
    """Uniform [0, 1) float32 noise (len(rows), len(cols)): entry (i, j) depends only on
    (key, rows[i], cols[j]) (24 random bits, like `torch.rand`).

    A counter-based generator: the rows a process holds of a larger tensor (global row
    indices in `rows`) get exactly the noise the whole tensor gets in one process, which
    `torch.rand` on each process's part cannot give.
    """
    r = _mix64(rows.to(torch.int64) * _GOLDEN + int(key))                      # (R,)
    z = _mix64(r[:, None] ^ (cols.to(torch.int64)[None, :] * _GOLDEN))         # (R, C)
    return _srl(z, 40).to(torch.float32) * (2.0 ** -24)
