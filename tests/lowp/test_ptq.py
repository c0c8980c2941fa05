"""PTQ math (`hybridlm.lowp.ptq`): which linears, the storage layouts against `nvfp4` / `fp8` and an
independent float64 decode, shared scales of fused groups, calibration amax against hand-computed inputs."""

import pytest
import torch

from hybridlm.lowp import fp8, nvfp4, ptq
from hybridlm.lowp.fp8 import E4M3

from helpers import small_model


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == E4M3 else t


def heavy_tailed(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g))


def reference_nvfp4_decode(q: ptq.NVFP4Weight) -> torch.Tensor:
    """q * (S_b / s_enc), written out in float64: the division rounded once to float32 (53 >= 2*24+2 bits,
    so float64-then-float32 equals a float32 division), then the exact product rounded to float32."""
    codes = nvfp4.unpack_fp4(q.packed).long()
    mags = torch.tensor(nvfp4.E2M1_VALUES, dtype=torch.float64)[codes & 7]
    vals = torch.where(codes >= 8, -mags, mags)
    decode = (q.scale.to(torch.float64) / q.global_scale.to(torch.float64)).float().double()
    return (vals * decode.repeat_interleave(16, dim=1)).float()


# ---- which linears --------------------------------------------------------------------------
def test_plan_keeps_lm_head_and_the_high_precision_blocks():
    model = small_model()  # 7 blocks M*-M-*M, 19 linears with lm_head
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    p = ptq.plan_linears(model, "nvfp4")  # auto for nvfp4: the last max(1, round(8/62 * 7)) = 1 block
    assert p.high_precision == [6] and "lm_head" in p.keep
    assert all(n.startswith("backbone.layers.6.") for n in p.keep if n != "lm_head")
    assert len(p.quantize) + len(p.keep) == n_linears
    assert ptq.plan_linears(model, "fp8").high_precision == [0, 6]
    none = ptq.plan_linears(model, "nvfp4", "none")
    assert none.keep == ["lm_head"] and len(none.quantize) == n_linears - 1
    assert ptq.plan_linears(model, "fp8", [1, -1]).high_precision == [1, 6]
    with pytest.raises(ValueError, match="bad item"):
        ptq.plan_linears(model, "nvfp4", "first:x")
    with pytest.raises(ValueError, match="format must be one of"):
        ptq.plan_linears(model, "int4")


def test_nvfp4_keeps_linears_whose_input_is_not_a_multiple_of_16():
    model = small_model(ffn_dim=40)  # down_proj has in_features 40
    nv, f8 = ptq.plan_linears(model, "nvfp4", "none"), ptq.plan_linears(model, "fp8", "none")
    assert "backbone.layers.2.mixer.down_proj" in nv.keep and "backbone.layers.2.mixer.down_proj" in f8.quantize


# ---- NVFP4 storage --------------------------------------------------------------------------
def test_nvfp4_weight_is_nvfp4_quantize_in_1x16_groups():
    w = heavy_tailed(40, 64)
    (q,) = ptq.quantize_nvfp4_weights([w])
    ref = nvfp4.quantize(w)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (40, 32)
    assert q.scale.dtype == E4M3 and q.scale.shape == (40, 4)
    assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == (1,)
    assert torch.equal(q.packed, ref.packed) and torch.equal(bits(q.scale), bits(ref.block_scales))
    assert torch.equal(q.global_scale, ref.global_scale.reshape(1))
    assert torch.equal(q.dequantize(), reference_nvfp4_decode(q))
    # NVFP4Tensor decodes q * S_b / s_enc (another order): the two agree to one float32 ulp
    ours, theirs = q.dequantize(), ref.dequantize()
    assert ((ours - theirs).abs() <= torch.finfo(torch.float32).eps * theirs.abs()).all()


def test_nvfp4_16x16_tiles_repeat_each_tile_scale_on_its_rows():
    w = heavy_tailed(40, 48, seed=1)  # 40 rows: the last tile row is padded
    (q,) = ptq.quantize_nvfp4_weights([w], (16, 16))
    ref = nvfp4.quantize(w, (16, 16))
    assert q.packed.shape == (40, 24) and torch.equal(q.packed, ref.packed[:40])
    tiles = bits(ref.block_scales)  # (3, 3)
    for r in range(40):
        assert torch.equal(bits(q.scale)[r], tiles[r // 16])
    assert torch.equal(q.dequantize(), reference_nvfp4_decode(q))
    assert ((q.dequantize() - nvfp4.fake_quantize(w, (16, 16))).abs()
            <= torch.finfo(torch.float32).eps * w.abs().amax()).all()


def test_a_fused_group_shares_the_global_scale_of_the_stacked_matrix():
    q, k, v = heavy_tailed(32, 64, seed=2), heavy_tailed(16, 64, seed=3), heavy_tailed(16, 64, seed=4)
    k[3, 5] = 100.0  # k holds the largest amax of the three
    for block in ((1, 16), (16, 16)):
        parts = ptq.quantize_nvfp4_weights([q, k, v], block)
        stacked = nvfp4.quantize(torch.cat([q, k, v]), block)
        for p in parts:
            assert torch.equal(p.global_scale, nvfp4.global_encode_scale(torch.tensor(100.0)).reshape(1))
        assert torch.equal(torch.cat([p.packed for p in parts]), stacked.packed)
        (k_alone,) = ptq.quantize_nvfp4_weights([k], block)  # so alone it is quantized the same
        assert torch.equal(k_alone.packed, parts[1].packed) and torch.equal(bits(k_alone.scale), bits(parts[1].scale))
        (q_alone,) = ptq.quantize_nvfp4_weights([q], block)
        assert q_alone.global_scale > parts[0].global_scale


def test_nvfp4_weight_errors():
    with pytest.raises(ValueError, match="divisible by 16"):
        ptq.quantize_nvfp4_weights([torch.ones(4, 24)])
    with pytest.raises(ValueError, match="non-finite"):
        ptq.quantize_nvfp4_weights([torch.tensor([[float("nan")] * 16])])
    with pytest.raises(ValueError, match="one in_features"):
        ptq.quantize_nvfp4_weights([torch.ones(4, 16), torch.ones(4, 32)])
    with pytest.raises(ValueError, match="does not fit"):
        ptq.nvfp4_dequantize(torch.zeros(4, 8, dtype=torch.uint8), torch.zeros(4, 2, dtype=E4M3), torch.ones(1))


def test_zero_weight_stays_zero():
    (q,) = ptq.quantize_nvfp4_weights([torch.zeros(16, 32)])
    assert torch.equal(q.dequantize(), torch.zeros(16, 32)) and q.global_scale.item() == 1.0


# ---- FP8 storage ----------------------------------------------------------------------------
def test_fp8_per_tensor_and_per_channel_are_fp8_quantize():
    w = heavy_tailed(24, 40, seed=5)
    (t,) = ptq.quantize_fp8_weights([w], "tensor")
    ref = fp8.quantize(w)
    assert t.data.dtype == E4M3 and t.scale.shape == (1,) and t.scale.dtype == torch.float32
    assert torch.equal(bits(t.data), bits(ref.data)) and torch.equal(t.scale, ref.scale_inv.reshape(1))
    assert torch.equal(t.dequantize(), fp8.fake_quantize(w))
    (c,) = ptq.quantize_fp8_weights([w], "channel")
    assert c.scale.shape == (24, 1)
    for r in range(24):
        row = fp8.quantize(w[r])
        assert torch.equal(bits(c.data[r]), bits(row.data)) and torch.equal(c.scale[r, 0], row.scale_inv)
    assert torch.equal(c.dequantize(), fp8.e4m3_to_float(c.data) * c.scale)
    assert (c.dequantize() - w).norm() < (t.dequantize() - w).norm()  # finer scales, smaller error


def test_fp8_group_shares_one_per_tensor_scale():
    a, b = heavy_tailed(8, 32, seed=6), 5 * heavy_tailed(4, 32, seed=7)
    pa, pb = ptq.quantize_fp8_weights([a, b])
    ref = fp8.quantize(torch.cat([a, b]))
    assert torch.equal(pa.scale, pb.scale) and torch.equal(pa.scale, ref.scale_inv.reshape(1))
    assert torch.equal(bits(torch.cat([pa.data, pb.data])), bits(ref.data))
    with pytest.raises(ValueError, match="granularity"):
        ptq.quantize_fp8_weights([a], "block")


def test_activation_scales():
    for amax in (0.37, 5.0, 1234.5):
        g = ptq.nvfp4_input_global_scale(amax)
        assert g.shape == (1,) and g.dtype == torch.float32
        a32 = torch.tensor(amax, dtype=torch.float32).double()
        assert g.item() == (2688.0 / a32).float().item()  # one correctly rounded float32 division
        s = ptq.fp8_input_scale(amax)
        assert s.shape == (1,) and abs(s.item() * 448 / amax - 1) < 1e-6
    assert ptq.nvfp4_input_global_scale(0.0).item() == 1.0 and ptq.fp8_input_scale(0.0).item() == 1.0


# ---- calibration ----------------------------------------------------------------------------
def test_calibration_amax_is_the_max_input_over_batches():
    model = small_model()
    batches = [torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(s)) for s in range(3)]
    names = ["backbone.layers.0.mixer.in_proj", "lm_head", "backbone.layers.2.mixer.down_proj"]
    amax = ptq.calibration_amax(model, names, batches)
    block0 = model.backbone.layers[0]
    with torch.no_grad():  # in_proj sees rmsnorm(embeddings(ids)), written out here
        want = max(block0.norm(model.backbone.embeddings(b)).abs().max() for b in batches)
    assert torch.allclose(amax[names[0]], want, rtol=1e-6)
    per_batch = [ptq.calibration_amax(model, names, [b]) for b in batches]
    for n in names:
        assert torch.equal(amax[n], torch.stack([p[n] for p in per_batch]).amax())
    pairs = ptq.calibration_amax(model, names, [(b, b) for b in batches])      # (ids, targets) pairs
    lists = ptq.calibration_amax(model, names, [b.tolist() for b in batches])  # lists of id lists
    assert all(torch.equal(pairs[n], amax[n]) and torch.equal(lists[n], amax[n]) for n in names)
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_calibration_errors():
    model = small_model()
    with pytest.raises(ValueError, match="calibration data is empty"):
        ptq.calibration_amax(model, ["lm_head"], [])
    with pytest.raises(ValueError, match="has no tokens"):
        ptq.calibration_amax(model, ["lm_head"], [torch.zeros(1, 0, dtype=torch.long)])
    with pytest.raises(ValueError, match="token ids must lie"):
        ptq.calibration_amax(model, ["lm_head"], [torch.tensor([[1000]])])
    assert not any(m._forward_pre_hooks for m in model.modules())


# ---- activations as a W4A4 / W8A8 engine quantizes them ------------------------------------
def test_fake_quantize_input_against_the_training_quantizers():
    x = heavy_tailed(6, 48, seed=8)
    own = nvfp4.global_encode_scale(x.abs().amax())  # a static scale equal to x's own: the dynamic result
    ref = nvfp4.fake_quantize(x)
    got = ptq.fake_quantize_input(x, "nvfp4", own.reshape(1))
    assert ((got - ref).abs() <= torch.finfo(torch.float32).eps * ref.abs()).all()
    small = ptq.nvfp4_input_global_scale(x.abs().amax() / 4)  # calibrated on smaller inputs: x saturates
    assert ptq.fake_quantize_input(x, "nvfp4", small).abs().max() <= 6 * 448 / small.item() * (1 + 1e-6)
    rows = ptq.fake_quantize_input(x, "fp8", None)  # dynamic: per-token current scaling
    assert torch.equal(rows, torch.stack([fp8.fake_quantize(r) for r in x]))
    s = ptq.fp8_input_scale(x.abs().amax() / 2)
    static = ptq.fake_quantize_input(x, "fp8", s)
    assert static.abs().max() == 448 * s.item() and (static - x).abs().max() < x.abs().max()
    with pytest.raises(ValueError, match="need a static input_global_scale"):
        ptq.fake_quantize_input(x, "nvfp4", None)


def test_simulated_activations_only_inside_the_block():
    model = small_model()
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    names = ptq.plan_linears(model, "fp8", "none").quantize
    with torch.no_grad():
        before = model(ids)
        with ptq.simulated_activations(model, "fp8", {n: None for n in names}):
            during = model(ids)
        after = model(ids)
    assert torch.equal(before, after) and not torch.equal(before, during)
    assert (during - before).abs().max() < 0.1 * before.abs().max()
