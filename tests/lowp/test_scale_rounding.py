"""FP8 and NVFP4 scales are correctly rounded FP32 arithmetic: bit-equal to the float64 computation
rounded to float32, over random and adversarial amax values (subnormal, powers of two, the ends of
the FP32 range, E4M3 rounding midpoints)."""

from __future__ import annotations

import math

import pytest
import torch

from hybridlm.lowp import fp8, nvfp4

pytestmark = pytest.mark.usefixtures("one_thread")

F32 = torch.finfo(torch.float32)
E4M3_MAX = 448.0
S_ENC_NUM = 6.0 * 448.0  # 2688, exact in FP32


# ----------------------------------------------------------------- inputs


def _neighbours(values: torch.Tensor, ulps: int = 2) -> torch.Tensor:
    """`values` (positive float32) and their float32 neighbours up to `ulps` ulps either side."""
    bits = values.to(torch.float32).view(torch.int32).to(torch.int64)
    near = torch.cat([bits + k for k in range(-ulps, ulps + 1)])
    near = near[(near > 0) & (near < 0x7F800000)]                        # positive, finite
    return near.to(torch.int32).view(torch.float32)


def adversarial_amax() -> torch.Tensor:
    """Powers of two, the subnormal range, the ends of the FP32 range, format constants and ratios."""
    powers = torch.tensor([2.0 ** e for e in range(-149, 128)], dtype=torch.float64)
    subnormal = torch.tensor([F32.smallest_normal * k / 64 for k in range(1, 64)], dtype=torch.float64)
    special = torch.tensor([F32.max, F32.max / 2, F32.max / 448, F32.max / 2688, 448.0 / F32.max,
                            2688.0 / F32.max, F32.tiny, F32.eps, 448.0, 2688.0, 6.0, 1 / 3, 0.1, 1e-3,
                            1e-30, 1e-38, 1e-40, 1e-45, 3.0, 7.0, 10.0, 1e30, 1e38], dtype=torch.float64)
    odd = torch.tensor([k / 2.0 ** 20 for k in range(1, 4000, 3)], dtype=torch.float64)  # odd mantissas
    return _neighbours(torch.cat([powers, subnormal, special, odd]).to(torch.float32))


def random_amax(n: int = 100_000, seed: int = 0) -> torch.Tensor:
    """`n` random positive finite float32: half random bit patterns (all exponents, subnormals included),
    half log-uniform over [2^-20, 2^20) (typical tensor amaxes)."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(1, 0x7F800000, (n // 2,), generator=g, dtype=torch.int64).to(torch.int32)
    typical = torch.exp2(torch.rand(n - n // 2, generator=g, dtype=torch.float64) * 40 - 20)
    return torch.cat([bits.view(torch.float32), typical.to(torch.float32)])


def all_amax() -> torch.Tensor:
    return torch.cat([adversarial_amax(), random_amax()])


# ------------------------------------------------------------- references


def const_over_ref(numerator: float, amax: torch.Tensor) -> torch.Tensor:
    """numerator / amax in float64, capped at the FP32 max, rounded once to float32."""
    return (numerator / amax.double()).clamp(max=F32.max).float()


def block_scale_ref(block_amax: torch.Tensor, s_enc: torch.Tensor) -> torch.Tensor:
    """The documented S_b = e4m3((amax_b / 6) * s_enc): each step in float64, rounded to float32
    (exact for one FP32 division or multiplication), then E4M3 with saturation at 448."""
    quotient = (block_amax.double() / 6.0).float()
    product = (quotient.double() * s_enc.double()).clamp(max=F32.max).float()
    return product.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn)


def _mismatches(got: torch.Tensor, want: torch.Tensor) -> int:
    return int((got.view(torch.int32) != want.view(torch.int32)).sum())


# ------------------------------------------------------------------ tests


def test_inputs_cover_the_hard_cases():
    amax = all_amax()
    assert amax.numel() > 100_000 and bool(torch.isfinite(amax).all()) and bool((amax > 0).all())
    assert bool((amax < F32.smallest_normal).any()) and bool((amax == F32.max).any())
    assert bool((amax < 448.0 / F32.max).any())              # 448 / amax overflows: the cap is exercised
    # the naive reciprocal-times-constant evaluation is off for a good share of these inputs
    naive = (1 / amax) * 448.0
    assert _mismatches(naive.clamp(max=F32.max), const_over_ref(448.0, amax)) > amax.numel() // 10


def test_fp8_current_scale_is_correctly_rounded():
    amax = all_amax()
    want = const_over_ref(E4M3_MAX, amax)
    got = torch.func.vmap(fp8.current_scale)(amax[:, None])         # one tensor per amax, batched
    bad = (got.view(torch.int32) != want.view(torch.int32)).nonzero().flatten()
    assert bad.numel() == 0, (f"{bad.numel()} of {amax.numel()} FP8 scales differ, e.g. amax "
                              f"{amax[bad[:3]].tolist()}: {got[bad[:3]].tolist()} vs {want[bad[:3]].tolist()}")
    looped = torch.stack([fp8.current_scale(a.reshape(1)) for a in amax[::50]])  # unbatched calls too
    assert _mismatches(looped, want[::50]) == 0
    # the sign of x does not matter, and the scale is the one quantize() applies
    assert _mismatches(fp8.current_scale(-amax[:1]).reshape(1), want[:1]) == 0
    x = torch.tensor([0.3, -1.7, 0.01])
    assert float(fp8.quantize(x).scale_inv) == float(fp8.current_scale(x).reciprocal())


def test_fp8_scale_special_cases():
    assert float(fp8.current_scale(torch.zeros(3))) == 1.0
    assert float(fp8.current_scale(torch.tensor([F32.smallest_normal / 64]))) == F32.max
    for bad in (math.inf, -math.inf, math.nan):
        assert math.isnan(float(fp8.current_scale(torch.tensor([1.0, bad]))))


def test_nvfp4_global_encode_scale_is_correctly_rounded():
    amax = all_amax()
    want = const_over_ref(S_ENC_NUM, amax)
    got = nvfp4.global_encode_scale(amax)
    assert got.dtype == torch.float32
    assert _mismatches(got, want) == 0
    # the scalar (0-dim) amax of a real tensor takes the same path
    scalars = torch.stack([nvfp4.global_encode_scale(a) for a in amax[:2000]])
    assert _mismatches(scalars, want[:2000]) == 0
    assert float(nvfp4.global_encode_scale(torch.tensor(0.0))) == 1.0


def _midpoint_blocks(amax: float, n: int = 48) -> torch.Tensor:
    """Block amaxes whose scaled value amax_b / amax * 448 lies at or within 2 ulps of a midpoint
    between consecutive E4M3 values: where a 1-ulp error in the scale flips the block scale."""
    table = sorted({float(v) for v in torch.arange(256, dtype=torch.int32).to(torch.uint8)
                    .view(torch.float8_e4m3fn).float() if 0 < v <= E4M3_MAX})
    mids = torch.tensor([(a + b) / 2 for a, b in zip(table, table[1:])], dtype=torch.float64)
    mids = mids[torch.linspace(0, mids.numel() - 1, n).round().long()]
    return _neighbours((mids * amax / E4M3_MAX).to(torch.float32)).clamp(max=amax)


def _block_tensor(amax: float, rows: int, seed: int) -> torch.Tensor:
    """A tensor of `rows` x 16 tiles (one tile per block), one block per adversarial or random block amax,
    each block reaching its amax exactly, one block reaching the tensor amax `amax`."""
    g = torch.Generator().manual_seed(seed)
    block_amax = torch.cat([_midpoint_blocks(amax), torch.rand(64, generator=g) * amax, torch.tensor([amax])])
    x = (torch.rand(block_amax.numel(), rows, 16, generator=g) * 2 - 1) * block_amax[:, None, None]
    x[:, 0, 0] = block_amax
    x[:, rows - 1, 15] = -block_amax
    return x.reshape(-1, 16)


@pytest.mark.parametrize("block", [(1, 16), (16, 16)])
def test_nvfp4_block_scales_match_float64_reference(block: tuple[int, int]):
    g = torch.Generator().manual_seed(1)
    amaxes = torch.cat([torch.exp2(torch.rand(40, generator=g) * 30 - 15), adversarial_amax()[::97]])
    amaxes = amaxes[(amaxes > 1e-30) & (amaxes < 1e30)]
    assert amaxes.numel() > 60
    for seed, amax in enumerate(amaxes.tolist()):
        x = _block_tensor(amax, block[0], seed)
        q = nvfp4.quantize(x, block)
        tiles = nvfp4._tiles(x.abs(), block[0])                          # reference block amaxes
        block_amax = tiles.amax(dim=(1, 3))
        s_enc = const_over_ref(S_ENC_NUM, x.abs().amax())
        assert _mismatches(q.global_scale.reshape(1), s_enc.reshape(1)) == 0
        want = block_scale_ref(block_amax, s_enc)
        got = q.block_scales
        assert bool((got.view(torch.uint8) == want.view(torch.uint8)).all()), (
            f"amax {amax}: block scales {got.float()[got.view(torch.uint8) != want.view(torch.uint8)][:4].tolist()}"
            f" vs {want.float()[got.view(torch.uint8) != want.view(torch.uint8)][:4].tolist()}")
        fake = nvfp4.fake_quantize(x, block)
        assert torch.equal(fake, q.dequantize())                         # the same scales in both paths
