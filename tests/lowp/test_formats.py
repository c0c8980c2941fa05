"""FP8 (E4M3, current scaling) and NVFP4 (E2M1, two-level scales, 2D blocks, RHT, stochastic rounding,
packing) against independent slow references and hand-written bits."""

from __future__ import annotations

import math

import pytest
import torch

from hybridlm.lowp import fp8, nvfp4
from hybridlm.lowp.inspection import quant_inspect

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = nvfp4.E2M1_VALUES


# ----------------------------------------------------------------- references


def e2m1_reference(v: float) -> int:
    """Slow obvious E2M1 RNE: nearest magnitude by enumeration, ties to the even code index, saturating."""
    a = min(abs(v), 6.0)
    best = min(range(8), key=lambda i: (abs(GRID[i] - a), i % 2))
    return (8 if math.copysign(1.0, v) < 0 else 0) | best


def e4m3_table() -> list[float]:
    """All finite non-negative E4M3 (fn) values from the bit layout: s.eeee.mmm, bias 7, no inf, NaN=e15 m7."""
    vals = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue
            vals.append(2.0 ** -6 * m / 8 if e == 0 else 2.0 ** (e - 7) * (1 + m / 8))
    return vals


def e4m3_reference(v: float) -> float:
    """Nearest E4M3 value (ties to even mantissa), saturating at 448, sign kept."""
    table = e4m3_table()
    a = min(abs(v), 448.0)
    idx = min(range(len(table)), key=lambda i: (abs(table[i] - a), i % 2))
    return math.copysign(table[idx], v)


# ----------------------------------------------------------------------- E2M1


def test_every_e2m1_code_round_trips_and_packs():
    codes = torch.arange(16, dtype=torch.uint8)
    values = nvfp4.e2m1_decode(codes)
    assert values.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert torch.signbit(values[8])  # code 0b1000 is -0.0
    assert torch.equal(nvfp4.e2m1_encode(values), codes)
    assert torch.equal(nvfp4.e2m1_round(values), values)                      # on-grid values are fixed points
    pairs = torch.cartesian_prod(codes, codes).to(torch.uint8).reshape(16, 32)  # every (lo, hi) nibble pair
    packed = nvfp4.pack_fp4(pairs)
    assert packed.shape == (16, 16) and packed[0, 1].item() == 0b0001_0000  # (0, 1): 1 in the high nibble
    assert torch.equal(nvfp4.unpack_fp4(packed), pairs)
    assert sorted(packed.flatten().tolist()) == list(range(256))


@pytest.mark.parametrize("x,bits", [
    (0.25, 0b0000),    # tie 0 | 0.5 -> even (0)
    (0.26, 0b0001),
    (0.75, 0b0010),    # tie 0.5 | 1 -> 1
    (1.25, 0b0010),    # tie 1 | 1.5 -> 1
    (1.75, 0b0100),    # tie 1.5 | 2 -> 2
    (2.5, 0b0100),     # tie 2 | 3 -> 2
    (3.5, 0b0110),     # tie 3 | 4 -> 4
    (5.0, 0b0110),     # tie 4 | 6 -> 4
    (5.01, 0b0111),
    (-5.0, 0b1110),
    (6.5, 0b0111),     # saturation
    (1e9, 0b0111),
    (-1e9, 0b1111),
    (-0.0, 0b1000),    # negative zero keeps its sign
    (-0.1, 0b1000),    # rounds to -0
])
def test_e2m1_rne_hand_examples(x, bits):
    q = nvfp4.e2m1_round(torch.tensor([x]))
    assert nvfp4.e2m1_encode(q).item() == bits == e2m1_reference(x)


def test_e2m1_rounding_matches_slow_reference():
    gen = torch.Generator().manual_seed(0)
    mids = [(a + b) / 2 for a, b in zip(GRID, GRID[1:])]
    x = torch.cat([torch.randn(3000, generator=gen) * 3, torch.tensor(mids + [-m for m in mids] + [7.0, -7.0])])
    got = nvfp4.e2m1_encode(nvfp4.e2m1_round(x)).tolist()
    assert got == [e2m1_reference(v) for v in x.tolist()]


def test_encode_rejects_off_grid_values():
    with pytest.raises(ValueError, match="not on the E2M1 grid"):
        nvfp4.e2m1_encode(torch.tensor([0.7]))
    with pytest.raises(ValueError, match="even last dimension"):
        nvfp4.pack_fp4(torch.zeros(3, dtype=torch.uint8))


# ---------------------------------------------------------------- NVFP4 scaling


def test_every_block_scale_round_trips_exactly():
    """Block b = (the 16 E2M1 values) * s_b for every positive E4M3 value s_b; amax 6*448 makes s_enc = 1,
    so S_b == s_b exactly and dequantization returns the input bit for bit. Plus one all-zero block."""
    scales = [s for s in e4m3_table() if s > 0]
    block = torch.tensor(list(GRID) + [-v for v in GRID])                       # 16 values, amax 6
    x = torch.cat([torch.stack([block * s for s in scales]), torch.zeros(1, 16)])  # (n_scales + 1, 16)
    q = nvfp4.quantize(x)
    assert float(q.global_scale) == 1.0
    assert q.block_scales.to(torch.float32).flatten().tolist() == scales + [0.0]
    assert torch.equal(q.dequantize(), x)


def test_hand_computed_nvfp4_blocks():
    # block 0: amax 6 -> s_enc = 2688 / 6 = 448, S_0 = e4m3(6/6 * 448) = 448, encode factor 1
    # block 1: amax 0.75 -> S_1 = e4m3(0.75/6 * 448) = 56, factor 448/56 = 8
    # block 2: amax 0.7 -> 0.7/6*448 = 52.27 rounds to E4M3 52, factor 8.615: 0.7 -> 6.03 saturates to 6
    b0 = [6.0, 3.0, 1.4, -0.2, 0.0] + [0.0] * 11
    b1 = [0.75, 0.1, 0.03125, -0.0625] + [0.0] * 12
    b2 = [0.7, -0.35] + [0.0] * 14
    q = nvfp4.quantize(torch.tensor([b0 + b1 + b2]))
    assert float(q.global_scale) == 448.0
    assert q.block_scales.to(torch.float32).tolist() == [[448.0, 56.0, 52.0]]
    codes = nvfp4.unpack_fp4(q.packed)[0].tolist()
    assert codes[:5] == [0b0111, 0b0101, 0b0011, 0b1000, 0b0000]   # 6, 3, 1.5, -0, 0
    assert codes[16:20] == [0b0111, 0b0010, 0b0000, 0b1001]         # 6, 1 (0.8), 0 (0.25 tie), -0.5
    assert codes[32:34] == [0b0111, 0b1101]                         # 6 (clipped from 6.03), -3 (-3.015)
    deq = q.dequantize()[0]
    assert deq[:5].tolist() == [6.0, 3.0, 1.5, -0.0, 0.0]
    assert deq[16:20].tolist() == [0.75, 0.125, 0.0, -0.0625]
    assert deq[32:34].tolist() == pytest.approx([6 * 52 / 448, -3 * 52 / 448], rel=1e-7)
    report, _ = quant_inspect(torch.tensor([b0 + b1 + b2]))
    assert report.frac_clipped == pytest.approx(1 / 48) and report.zero_blocks == 0


def test_fake_quantize_equals_packed_storage_and_zero_block_flush():
    gen = torch.Generator().manual_seed(1)
    for shape, block in [((37, 50), (1, 16)), ((3, 5, 40), (1, 16)), ((40, 56), (16, 16))]:
        x = torch.randn(shape, generator=gen) * torch.rand(shape, generator=gen).pow(4) * 10
        q = nvfp4.quantize(x, block)
        assert torch.equal(q.dequantize(), nvfp4.fake_quantize(x, block))
    assert nvfp4.quantize(torch.randn(32, 64)).nbytes() == 32 * 64 // 2 + 32 * 4 + 4  # 4.5 bits/value + FP32
    # a block 2^-20 below the tensor amax: its scale 448 * 2^-20 underflows E4M3 (min 2^-9): flushed to zero
    x = torch.cat([torch.full((16,), 1000.0), torch.full((16,), 1000.0 * 2 ** -20)])
    q = nvfp4.quantize(x)
    assert q.block_scales.to(torch.float32).tolist() == [[448.0, 0.0]]
    assert q.dequantize()[16:].abs().max() == 0
    neg_zero = nvfp4.quantize(torch.full((16,), -0.0))
    assert nvfp4.unpack_fp4(neg_zero.packed).tolist() == [[0b1000] * 16]
    assert torch.signbit(neg_zero.dequantize()).all() and float(neg_zero.global_scale) == 1.0


def test_nonfinite_inputs():
    x = torch.randn(4, 32)
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[1, 3] = bad
        assert torch.isnan(nvfp4.fake_quantize(y)).all()          # documented: whole tensor NaN
        assert torch.isnan(fp8.fake_quantize(y)).all()            # torch's cast alone would give 448 for inf
        with pytest.raises(ValueError, match="non-finite"):
            nvfp4.quantize(y)
        with pytest.raises(ValueError, match="non-finite"):
            quant_inspect(y)


def test_tiny_amax_stays_finite():
    # 448 / amax and s_enc / S_b overflow FP32 here; uncapped, 0 * inf turned the zeros into NaN
    x = torch.zeros(2, 32)
    x[0, 0], x[0, 20], x[1, 5] = 1e-38, -5e-39, 1e-41
    for q in (fp8.fake_quantize(x), nvfp4.fake_quantize(x), nvfp4.quantize(x).dequantize()):
        assert torch.isfinite(q).all()
        assert (q[x == 0] == 0).all() and (torch.sign(q) * torch.sign(x) >= 0).all()
    assert fp8.fake_quantize(x)[0, 0].item() == pytest.approx(1e-38, rel=0.1)


def test_2d_weight_blocks_are_transpose_consistent():
    w = torch.randn(40, 72, generator=torch.Generator().manual_seed(2))
    w[3, 5] = 30.0  # an outlier makes block choice matter
    q2 = nvfp4.fake_quantize(w, (16, 16))
    assert torch.equal(q2.t(), nvfp4.fake_quantize(w.t().contiguous(), (16, 16)))
    assert not torch.equal(nvfp4.fake_quantize(w).t(), nvfp4.fake_quantize(w.t().contiguous()))  # 1x16 is not


# --------------------------------------------------------------------------- RHT


def test_rht_is_orthogonal_and_cancels_in_wgrad():
    h = nvfp4.hadamard(16)
    assert torch.equal(h @ h.t(), 16 * torch.eye(16))
    r = nvfp4.rht_matrix(7, dtype=torch.float64)
    assert (r @ r.t() - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-15
    assert not torch.equal(r, nvfp4.rht_matrix(8, dtype=torch.float64))
    assert torch.equal(r, nvfp4.rht_matrix(7, dtype=torch.float64))          # seeded
    gen = torch.Generator().manual_seed(3)
    x, dy = torch.randn(50, 24, generator=gen, dtype=torch.float64), torch.randn(50, 40, generator=gen,
                                                                                dtype=torch.float64)
    xt, dyt = nvfp4.apply_rht(x, 7, 0), nvfp4.apply_rht(dy, 7, 0)             # T=50 padded to 64
    assert xt.shape == (64, 24)
    assert (dyt.t() @ xt - dy.t() @ x).abs().max() < 1e-12
    assert (xt[:50] - x).abs().max() > 0.1                                    # it really transformed


# --------------------------------------------------------------------- rounding


def test_stochastic_rounding_is_unbiased_and_rne_deterministic():
    n = 100_000
    gen = torch.Generator().manual_seed(4)
    for v in (0.3, 1.1, 1.9, 2.7, 4.9, -3.3, 5.5):
        q = nvfp4.e2m1_round(torch.full((n,), v), stochastic=True, generator=gen)
        lo = max(g for g in GRID if g <= abs(v))
        hi = min(g for g in GRID if g >= abs(v))
        assert set(q.abs().unique().tolist()) == {lo, hi}
        p = (abs(v) - lo) / (hi - lo)
        sigma = (hi - lo) * math.sqrt(p * (1 - p) / n)
        assert abs(q.mean().item() - v) < 3 * sigma
    # the whole NVFP4 quantizer: block amax 6 gives exact scales, so E[dequant] == x per position
    block = torch.tensor([6.0, 0.3, -1.1, 2.2, 4.7, 0.01, -5.9, 3.3] + [0.0] * 8)
    deq = nvfp4.fake_quantize(block.repeat(n, 1), stochastic=True, generator=gen)
    mean, std = deq.mean(0), deq.std(0)
    assert ((mean - block).abs() <= 3 * std / math.sqrt(n) + 1e-7).all()
    x = torch.randn(64, 48)
    assert torch.equal(nvfp4.fake_quantize(x), nvfp4.fake_quantize(x))
    a = nvfp4.fake_quantize(x, stochastic=True, generator=torch.Generator().manual_seed(5))
    b = nvfp4.fake_quantize(x, stochastic=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, nvfp4.fake_quantize(x))


# ------------------------------------------------------------------------- FP8


def test_fp8_matches_independent_e4m3_reference():
    gen = torch.Generator().manual_seed(6)
    table = e4m3_table()
    mids = [(a + b) / 2 for a, b in zip(table, table[1:])]
    x = torch.cat([torch.randn(2000, generator=gen) * 50, torch.tensor(mids[:60] + [-m for m in mids[100:]]),
                   torch.tensor([448.0])])
    q = fp8.quantize(x)
    scale = 448.0 / x.abs().max().item()
    assert float(q.scale_inv) == pytest.approx(1 / scale, rel=1e-6)
    scaled = (x * torch.tensor(scale, dtype=torch.float32)).tolist()
    assert q.data.to(torch.float32).tolist() == [e4m3_reference(v) for v in scaled]
    assert q.data.to(torch.float32).abs().max() == 448.0
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn)
    torch.testing.assert_close(fp8.e4m3_to_float(codes), codes.to(torch.float32), rtol=0, atol=0, equal_nan=True)
    zero = fp8.quantize(torch.zeros(5))
    assert float(zero.scale_inv) == 1.0 and zero.dequantize().abs().max() == 0


def test_fp8_simulated_matmul_equals_dequantized_matmul():
    gen = torch.Generator().manual_seed(7)
    a, b = fp8.quantize(torch.randn(33, 70, generator=gen)), fp8.quantize(torch.randn(70, 20, generator=gen) * 1e-3)
    ref = a.dequantize(torch.float64) @ b.dequantize(torch.float64)
    got = fp8.fp8_matmul(a, b, use_scaled_mm=False)
    assert ((got.double() - ref).abs() / ref.abs().max()).max() < 1e-6
    with pytest.raises(ValueError, match="fp8_matmul needs"):
        fp8.fp8_matmul(a, a)
