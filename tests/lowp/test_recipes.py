"""LowPrecisionLinear's quantized GEMMs against their definition, recipes and high-precision layers,
apply_recipe model surgery, quant-inspect, short fp8 / nvfp4 training runs, and real FP8 GEMMs on CUDA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hybridlm.cli import main
from hybridlm.interop.checkpoint import load_model
from hybridlm.lowp import fp8, nvfp4
from hybridlm.lowp.linear import LowPrecisionLinear, apply_recipe, remove_recipe
from hybridlm.lowp.recipe import Recipe, layer_spec_indices
from hybridlm.training.loop import train
from hybridlm.training.train_config import TrainConfig

from helpers import small_model

pytestmark = pytest.mark.usefixtures("one_thread")


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
    from hybridlm.lowp.linear import _LowPrecisionLinearFn
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
    from hybridlm.interop.checkpoint import save_model
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
def test_scaled_mm_equals_simulation_on_cuda(no_tf32):
    if not fp8.scaled_mm_available("cuda"):
        pytest.skip("torch._scaled_mm needs compute capability >= 8.9")
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
