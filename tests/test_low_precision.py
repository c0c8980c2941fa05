"""FP8 / NVFP4 formats, LowPrecisionLinear, apply_recipe, quant-inspect, and short fp8/nvfp4 training runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hybridlm import fp8, nvfp4
from hybridlm.checkpoint import load_model
from hybridlm.cli import main
from hybridlm.low_precision import (
    LowPrecisionLinear,
    Recipe,
    apply_recipe,
    layer_spec_indices,
    quant_inspect,
    remove_recipe,
)
from hybridlm.training import TrainConfig, train

from helpers import small_model

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


# -------------------------------------------------------------- LowPrecisionLinear


def test_low_precision_linear_bf16_mode_equals_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(24, 40).double()
    lp = LowPrecisionLinear(24, 40, recipe="bf16").double()
    lp.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 24, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), lp(x2.float()).double()
    assert (y - y_ref).abs().max() < 1e-5
    # gradients through the custom autograd Function, in float64 to compare tightly
    lp64 = LowPrecisionLinear(24, 40, recipe="bf16").double()
    lp64.load_state_dict(ref.state_dict())
    g = torch.randn(3, 7, 40, dtype=torch.float64)
    ref(x).backward(g)
    from hybridlm.low_precision import _LowPrecisionLinearFn
    y64 = _LowPrecisionLinearFn.apply(x2.reshape(-1, 24), lp64.weight, lp64.bias, Recipe("bf16"))
    y64.backward(g.reshape(-1, 40))
    assert (y64.reshape(3, 7, 40) - ref(x)).abs().max() < 1e-12
    for a, b in ((x2.grad, x.grad), (lp64.weight.grad, ref.weight.grad), (lp64.bias.grad, ref.bias.grad)):
        assert (a - b).abs().max() < 1e-12
    assert lp.state_dict().keys() == ref.state_dict().keys() and isinstance(lp, nn.Linear)


@pytest.mark.parametrize("recipe", ["fp8", "nvfp4-no-sr", "nvfp4-no-sr-no-rht", "nvfp4-no-sr-no-2d"])
def test_quantized_gemms_equal_their_definition(recipe):
    """fprop/dgrad/wgrad of LowPrecisionLinear == the quantized formulas written out (deterministic recipes)."""
    r = Recipe.parse(recipe)
    gen = torch.Generator().manual_seed(8)
    lin = nn.Linear(48, 40)
    x = torch.randn(2, 25, 48, generator=gen, requires_grad=True)
    dy = torch.randn(2, 25, 40, generator=gen)
    y = LowPrecisionLinear.convert(lin, r)(x)
    y.backward(dy)
    x2, d2, w = x.detach().reshape(50, 48), dy.reshape(50, 40), lin.weight.detach()
    if r.format == "fp8":
        q = fp8.fake_quantize
        y_ref, dx_ref, dw_ref = q(x2) @ q(w).t(), q(d2) @ q(w), q(d2).t() @ q(x2)
    else:
        q = nvfp4.fake_quantize
        wq = q(w, (16, 16)) if r.weight_2d else q(w)
        y_ref = q(x2) @ wq.t()
        dx_ref = q(d2) @ (wq if r.weight_2d else q(w.t().contiguous()).t())
        xt, dt = (nvfp4.apply_rht(x2, 0, 0), nvfp4.apply_rht(d2, 0, 0)) if r.rht else (x2, d2)
        dw_ref = q(dt.t().contiguous()) @ q(xt.t().contiguous()).t()
    assert torch.allclose(y.detach().reshape(50, 40), y_ref + lin.bias.detach(), atol=1e-5)
    assert torch.allclose(x.grad.reshape(50, 48), dx_ref, atol=1e-5)
    assert torch.allclose(lin.weight.grad, dw_ref, atol=1e-5)
    assert torch.allclose(lin.bias.grad, d2.sum(0), atol=1e-5)
    exact = x2 @ w.t()
    rel = ((y.detach().reshape(50, 40) - lin.bias.detach() - exact).norm() / exact.norm()).item()
    assert 0 < rel < (0.05 if r.format == "fp8" else 0.25)  # quantized, but close


# ---------------------------------------------------------------- recipes / surgery


def test_recipe_parsing_and_layer_specs():
    assert Recipe.parse("nvfp4-no-rht-no-sr") == Recipe("nvfp4", rht=False, stochastic_rounding=False)
    assert Recipe.parse("NVFP4-no-2d").name == "nvfp4-no-2d" and Recipe.parse("fp8").name == "fp8"
    for bad, msg in [("fp16", "format must be one of"), ("fp8-no-rht", "only nvfp4"), ("nvfp4-no-xyz", "unknown"),
                     ("nvfp4-no-sr-no-sr", "repeated")]:
        with pytest.raises(ValueError, match=msg):
            Recipe.parse(bad)
    assert layer_spec_indices("first:1,last:2", 8, "fp8") == {0, 6, 7}
    assert layer_spec_indices("0,-1, 5", 8, "fp8") == {0, 5, 7}
    assert layer_spec_indices("none", 8, "nvfp4") == set() == layer_spec_indices("", 8, "fp8")
    assert layer_spec_indices("auto", 8, "fp8") == {0, 7}
    assert layer_spec_indices("auto", 62, "nvfp4") == {0, 1} | set(range(54, 62))  # the 12B run: 2 + 8 blocks
    assert layer_spec_indices("auto", 8, "nvfp4") == {7} and layer_spec_indices("auto", 8, "bf16") == set()
    for bad, msg in [("first:x", "bad item"), ("middle:2", "bad item"), ("9", "out of range"), ("a", "bad item")]:
        with pytest.raises(ValueError, match=msg):
            layer_spec_indices(bad, 8, "fp8")
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="int4")
    with pytest.raises(ValueError, match="high-precision-layers"):
        TrainConfig(precision="fp8", high_precision_layers="last:two")


def test_apply_recipe_keeps_names_hooks_and_plain_checkpoints(tmp_path):
    from hybridlm.checkpoint import save_model
    model = small_model()  # pattern M*-M-*M: 7 blocks
    seen = []
    model.backbone.layers[3].mixer.in_proj.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    keys = list(model.state_dict())
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        ref = model(ids)
    assert seen == ["Linear"]
    seen.clear()
    applied = apply_recipe(model, "nvfp4", "first:1,last:2")
    assert applied.high_precision == [0, 5, 6]
    quantized = {n for n, m in model.named_modules() if isinstance(m, LowPrecisionLinear)}
    assert quantized == set(applied.quantized) and quantized
    assert all(n.startswith(("backbone.layers.1.", "backbone.layers.2.", "backbone.layers.3.",
                             "backbone.layers.4.")) for n in quantized)
    assert type(model.lm_head) is nn.Linear and "lm_head" not in str(applied.quantized)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        out = model(ids)
    assert seen == ["LowPrecisionLinear"]                 # the hook registered before the swap still fires
    assert 0 < (out - ref).abs().max() < 0.5 * ref.abs().max()
    save_model(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")                  # plain weights, no recipe needed
    assert not any(isinstance(m, LowPrecisionLinear) for m in loaded.modules())
    with torch.no_grad():
        assert torch.allclose(loaded(ids), ref, atol=1e-6)
    assert remove_recipe(model) == len(quantized)
    with torch.no_grad():
        assert torch.equal(model(ids), ref)
    assert apply_recipe(model, "bf16").quantized == []
    with pytest.raises(ValueError, match="out of range"):
        apply_recipe(model, "fp8", "7")


# ---------------------------------------------------------------------- CLI


def test_quant_inspect_cli(tmp_path, tiny_model_file, capsys):
    assert main(["quant-inspect", "--random", "64x64", "--dist", "student-t", "--plot", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    assert "block scales (E4M3, 256 blocks)" in out and "flushed to zero" in out and "SQNR" in out
    assert (tmp_path / "h.png").stat().st_size > 1000
    assert main(["quant-inspect", "--config", tiny_model_file, "--format", "fp8"]) == 0
    out = capsys.readouterr().out
    assert "backbone.layers.0.mixer.in_proj.weight" in out and "rel err" in out
    assert main(["quant-inspect", "--config", tiny_model_file, "--tensor", "backbone.layers.1.mixer.up_proj.weight",
                 "--rht"]) == 0
    assert "nvfp4 16x16 +RHT" in capsys.readouterr().out
    assert main(["quant-inspect", "--config", tiny_model_file, "--tensor", "nope"]) == 1
    assert "error: no parameter 'nope'" in capsys.readouterr().err
    assert main(["quant-inspect", "--random", "12"]) == 1
    assert main(["quant-inspect"]) == 1
    assert "exactly one of" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--precision", "nvfp4-no-xyz"]) == 1
    assert "error: precision 'nvfp4-no-xyz'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "r"), "--precision", "fp8", "--high-precision-layers", "x:1"]) == 1
    assert "--high-precision-layers: bad item 'x:1'" in capsys.readouterr().err


# ------------------------------------------------------------------- training


@pytest.mark.slow
def test_fp8_and_nvfp4_training_track_bf16(small_shards, tiny_model_file, tmp_path):
    base = dict(model=tiny_model_file, data=str(small_shards), steps=60, batch_size=8, seq_len=64, lr=3e-3,
                min_lr=3e-4, warmup_steps=5, eval_every=0, eval_batches=4, save_every=0, log_every=10,
                progress=False, device="cpu", seed=1, high_precision_layers="none")
    runs = {p: train(TrainConfig(**base, precision=p, out=str(tmp_path / p))) for p in ("bf16", "fp8", "nvfp4")}
    first = {p: runs[p]["val_loss"] for p in runs}
    assert first["bf16"] < 0.8 * math.log(4096)  # it learned something
    for p in ("fp8", "nvfp4"):
        assert abs(first[p] - first["bf16"]) / first["bf16"] < 0.05, first
    assert first["fp8"] != first["bf16"] and first["nvfp4"] != first["fp8"]  # the recipes really differ
    final = load_model(tmp_path / "nvfp4" / "final")
    assert not any(isinstance(m, LowPrecisionLinear) for m in final.modules())


# ---------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scaled_mm_equals_simulation_on_cuda():
    if not fp8.scaled_mm_available("cuda"):
        pytest.skip("torch._scaled_mm needs compute capability >= 8.9")
    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator(device="cuda").manual_seed(0)
    for m, k, n in ((64, 128, 96), (33, 70, 20), (512, 1024, 256)):
        a = fp8.quantize(torch.randn(m, k, device="cuda", generator=gen))
        b = fp8.quantize(torch.randn(k, n, device="cuda", generator=gen) * 3)
        real = fp8.fp8_matmul(a, b, use_scaled_mm=True)
        sim = fp8.fp8_matmul(a, b, use_scaled_mm=False)
        # accumulation only: Hopper's FP8 tensor cores keep fewer than 23 mantissa bits between promotions
        assert ((real - sim).abs() / sim.abs().max()).max() < 1e-3
    # the whole layer: real FP8 GEMMs on CUDA == the CPU simulation (same inputs, same output gradient,
    # so every quantized operand is identical and only the accumulation order differs)
    lin_cpu = LowPrecisionLinear.convert(nn.Linear(128, 64), "fp8")
    lin = LowPrecisionLinear.convert(nn.Linear(128, 64), "fp8").cuda()
    lin.load_state_dict({k: v.cuda() for k, v in lin_cpu.state_dict().items()})
    x_cpu = torch.randn(4, 32, 128, requires_grad=True)
    g = torch.randn(4, 32, 64)
    x = x_cpu.detach().cuda().requires_grad_(True)
    y, y_cpu = lin(x), lin_cpu(x_cpu)
    y.backward(g.cuda())
    y_cpu.backward(g)
    for got, want in ((y, y_cpu), (x.grad, x_cpu.grad), (lin.weight.grad, lin_cpu.weight.grad),
                      (lin.bias.grad, lin_cpu.bias.grad)):
        assert torch.allclose(got.detach().cpu(), want.detach(), atol=1e-3, rtol=1e-3)
