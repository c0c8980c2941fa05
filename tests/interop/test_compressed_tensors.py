"""compressed-tensors checkpoints (`hybridlm.interop.compressed`), with the compressed-tensors library itself as
the reference: its config for each preset, its decompressors (and transformers + compressed-tensors) on our
exports, our loader on checkpoints its compressor wrote; trained-model exports, generation, errors."""

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridlm.config import HybridConfig
from hybridlm.interop.compressed import (export_compressed, fused_groups, load_compressed, quantization_config,
                                         scheme_name)
from hybridlm.interop.convert import load
from hybridlm.interop.hf_weights import save_hf_dir
from hybridlm.lowp import apply_recipe, fp8, nvfp4, ptq
from hybridlm.lowp.fp8 import E4M3
from hybridlm.model import HybridLM

from helpers import TINY_MODEL, small_model

try:  # the reference library (the test extra; it needs Python >= 3.11)
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from compressed_tensors.quantization import (QuantizationConfig, QuantizationScheme, apply_quantization_config,
                                                 preset_name_to_scheme)
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
    HAVE_CT = True
except ImportError:
    HAVE_CT = False
needs_ct = pytest.mark.skipif(not HAVE_CT, reason="compressed-tensors is not installed (pip install -e .[test])")

VOCAB = 97
# (format, fp8 granularity, calibrated) -> the compressed-tensors preset it is, and how it differs
CASES = {"nvfp4-w4a4": ("nvfp4", "tensor", True), "nvfp4-a16": ("nvfp4", "tensor", False),
         "fp8-static": ("fp8", "tensor", True), "fp8-channel-dynamic": ("fp8", "channel", False)}


def calib_batches(n: int = 2, seed: int = 0) -> list[torch.Tensor]:
    return [torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def export(tmp_path, case: str, model: HybridLM | None = None, **kw):
    fmt, gran, calibrated = CASES[case]
    model = small_model() if model is None else model
    return model, export_compressed(model, tmp_path / case, fmt, calib_batches() if calibrated else None,
                                    fp8_granularity=gran, **kw)


def ct_scheme(group: dict) -> "QuantizationScheme":
    return QuantizationScheme.model_validate(group)


def stored_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module -> its compressed-tensors parameters (local names) for every quantized module in a file."""
    mods = {k.rpartition(".")[0] for k in tensors if k.endswith(("weight_packed", "weight_scale"))}
    return {m: {k.rpartition(".")[2]: v for k, v in tensors.items() if k.rpartition(".")[0] == m} for m in mods}


# ---- the config ---------------------------------------------------------------------------
@needs_ct
@pytest.mark.parametrize("case,preset,weights_strategy", [
    ("nvfp4-w4a4", "NVFP4", None), ("nvfp4-a16", "NVFP4A16", None), ("fp8-static", "FP8", None),
    ("fp8-channel-dynamic", "FP8_DYNAMIC", None), ("fp8-channel-static", "FP8", "channel"),
    ("fp8-tensor-dynamic", "FP8_DYNAMIC", "tensor")])
def test_quantization_config_is_what_compressed_tensors_writes(case, preset, weights_strategy):
    fmt, gran, static = {"fp8-channel-static": ("fp8", "channel", True),
                         "fp8-tensor-dynamic": ("fp8", "tensor", False)}.get(case) or CASES[case]
    ignore = ["lm_head", "backbone.layers.6.mixer.up_proj"]
    ours = quantization_config(fmt, gran, static, ignore)
    scheme = preset_name_to_scheme(preset, ["Linear"])
    if weights_strategy:
        scheme.weights.strategy = weights_strategy
    fmt_name = "nvfp4-pack-quantized" if fmt == "nvfp4" else "float-quantized"
    scheme.format = fmt_name
    theirs = QuantizationConfig(config_groups={"group_0": scheme}, ignore=ignore, format=fmt_name,
                                quantization_status="compressed").model_dump(exclude=["quant_method"])
    # ModelCompressor.update_config adds these four keys beside the dump
    extras = {"quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {}}
    assert {k: v for k, v in ours.items() if k != "version"} == {**theirs, **extras}
    assert re.fullmatch(r"\d+\.\d+\.\d+", ours["version"])
    assert QuantizationConfig.model_validate(ours).config_groups["group_0"] == scheme
    assert scheme_name(fmt, gran, static).split(" ")[0] == preset


# ---- what we write --------------------------------------------------------------------------
def test_export_layout_names_dtypes_shapes_and_ignore(tmp_path):
    model, r = export(tmp_path, "nvfp4-w4a4")
    cfg = json.loads((r.out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and cfg["quantization_config"]["format"] == "nvfp4-pack-quantized"
    kept = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("backbone.layers.6")]
    assert r.ignored == [*kept, "lm_head"] and r.high_precision == [6] and r.scheme == "NVFP4"
    assert cfg["quantization_config"]["ignore"] == [x for n in kept
                                                    for x in (n, "model." + n[len("backbone."):])] + ["lm_head"]
    t = load_file(r.out / "model.safetensors")
    w = model.backbone.layers[0].mixer.in_proj.weight
    m = "backbone.layers.0.mixer.in_proj"
    assert f"{m}.weight" not in t
    assert (t[f"{m}.weight_packed"].dtype, tuple(t[f"{m}.weight_packed"].shape)) == (torch.uint8, (w.shape[0], w.shape[1] // 2))
    assert (t[f"{m}.weight_scale"].dtype, tuple(t[f"{m}.weight_scale"].shape)) == (E4M3, (w.shape[0], w.shape[1] // 16))
    for p in ("weight_global_scale", "input_global_scale"):
        assert (t[f"{m}.{p}"].dtype, tuple(t[f"{m}.{p}"].shape)) == (torch.float32, (1,))
    assert t["lm_head.weight"].dtype == torch.float32 and "backbone.layers.0.mixer.conv1d.weight" in t
    assert all(f"{n}.weight" in t for n in kept)

    _, f = export(tmp_path, "fp8-channel-dynamic")  # fp8 'auto' keeps blocks 0 and 6
    t = load_file(f.out / "model.safetensors")
    m = "backbone.layers.3.mixer.in_proj"
    assert t[f"{m}.weight"].dtype == E4M3 and tuple(t[f"{m}.weight_scale"].shape) == (w.shape[0], 1)
    assert f"{m}.input_scale" not in t and f.high_precision == [0, 6]
    _, s = export(tmp_path, "fp8-static")
    t = load_file(s.out / "model.safetensors")
    assert tuple(t[f"{m}.weight_scale"].shape) == (1,) and t[f"{m}.input_scale"].dtype == torch.float32


def test_fused_qkv_share_their_scales_and_calibrated_activation_scales(tmp_path):
    model, r = export(tmp_path, "nvfp4-w4a4", high_precision_layers="none")
    t = load_file(r.out / "model.safetensors")
    att = "backbone.layers.1.mixer"
    qkv = [model.get_submodule(f"{att}.{p}").weight for p in ("q_proj", "k_proj", "v_proj")]
    want = nvfp4.global_encode_scale(torch.cat(qkv).abs().amax()).reshape(1)
    for p in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(t[f"{att}.{p}.weight_global_scale"], want)
    amax = ptq.calibration_amax(model, [f"{att}.q_proj", f"{att}.o_proj"], calib_batches())
    assert torch.equal(t[f"{att}.q_proj.input_global_scale"], ptq.nvfp4_input_global_scale(amax[f"{att}.q_proj"]))
    assert torch.equal(t[f"{att}.o_proj.input_global_scale"], ptq.nvfp4_input_global_scale(amax[f"{att}.o_proj"]))
    assert fused_groups([f"{att}.q_proj", f"{att}.k_proj", f"{att}.o_proj"]) == [[f"{att}.q_proj"], [f"{att}.k_proj"],
                                                                               [f"{att}.o_proj"]]


# ---- compressed-tensors decompresses our exports ------------------------------------------
@needs_ct
@pytest.mark.parametrize("case", list(CASES))
def test_compressed_tensors_decompresses_our_export_bit_for_bit(tmp_path, case):
    _, r = export(tmp_path, case)
    group = json.loads((r.out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    scheme = ct_scheme(group)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    ours = load(r.out).state_dict()
    stored = load_file(r.out / "model.safetensors")
    mods = stored_modules(stored)
    assert sorted(mods) == sorted(r.quantized)
    for m, params in mods.items():
        w = compressor.decompress(dict(params), scheme)["weight"]  # NVFP4 decompresses into bf16
        assert w.dtype == (torch.bfloat16 if case.startswith("nvfp4") else torch.float32)
        assert torch.equal(ours[f"{m}.weight"].to(w.dtype), w), m
        if case.startswith("nvfp4"):  # its own dequantize in float32 too
            out, half = params["weight_packed"].shape
            w32 = dequantize(unpack_fp4_from_uint8(params["weight_packed"], out, 2 * half, dtype=torch.float32),
                             params["weight_scale"].float(), args=scheme.weights,
                             global_scale=params["weight_global_scale"], dtype=torch.float32)
            assert torch.equal(ours[f"{m}.weight"], w32), m
    # the model-free dequantizer of a whole file (its 'Linear' target matches every '.weight': name the dense ones)
    dense = [k.rpartition(".")[0] for k, v in stored.items() if k.endswith(".weight") and v.dtype != E4M3]
    theirs = CompressedTensorsDequantizer(r.out, ignore=dense, dtype=torch.float32).process(dict(stored))
    for k, v in ours.items():
        assert torch.equal(v.to(torch.bfloat16).float() if k.rpartition(".")[0] in mods and case.startswith("nvfp4")
                           else v, theirs[k]), k


@needs_ct
@pytest.mark.parametrize("case", ["nvfp4-w4a4", "fp8-channel-dynamic"])
def test_transformers_with_compressed_tensors_loads_our_export(tmp_path, case):
    tf = pytest.importorskip("transformers")
    _, r = export(tmp_path, case)
    theirs = tf.NemotronHForCausalLM.from_pretrained(r.out, dtype=torch.float32).eval()
    theirs.hf_quantizer.compressor.decompress_model(theirs)
    torch.nn.Module.float(theirs)  # its NVFP4 decompression is bf16; compare in float32
    for module in theirs.modules():
        module.quantization_enabled = False  # weights only: no activation fake-quantization
    ours = load(r.out)
    if case.startswith("nvfp4"):
        with torch.no_grad():
            for name in r.quantized:
                w = ours.get_submodule(name).weight
                w.copy_(w.to(torch.bfloat16))
    sd = {k.replace("model.", "backbone.", 1): v for k, v in theirs.state_dict().items()}
    for k, v in ours.state_dict().items():
        assert torch.equal(v, sd[k]), k
    ids = calib_batches(1, seed=9)[0]
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids)).abs().max() < 1e-5


# ---- we load what compressed-tensors wrote ---------------------------------------------------
def ct_quantize_and_save(src, out, preset: str):
    """A transformers model quantized and compressed by compressed-tensors alone: its scheme, its qparam
    functions (generate_gparam / calculate_qparams) on weight and calibration min/max, its compressor."""
    tf = pytest.importorskip("transformers")
    model = tf.NemotronHForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme(preset, ["Linear"])}, ignore=["lm_head"])
    apply_quantization_config(model, qc)
    linears = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    amax = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: amax.__setitem__(n, max(amax.get(n, 0.0),
                                                                                   a[0].abs().max().item())))
             for n, m in linears.items()]
    with torch.no_grad():
        for m in linears.values():
            m.quantization_enabled = False
        model(calib_batches(1)[0])
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            _ct_qparams(m, torch.tensor(amax[n]))
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    compressor.decompress_model(model)
    return {k.replace("model.", "backbone.", 1): v for k, v in model.state_dict().items()}


def _ct_qparams(m: torch.nn.Module, a: torch.Tensor) -> None:
    s, w = m.quantization_scheme, m.weight
    if s.weights.strategy == "tensor_group":
        gs = generate_gparam(w.min(), w.max())
        m.weight_global_scale.copy_(gs)
        groups = w.view(w.shape[0], -1, 16)
        m.weight_scale.copy_(calculate_qparams(groups.amin(-1), groups.amax(-1), s.weights, global_scale=gs)[0])
        if hasattr(m, "input_global_scale"):
            m.input_global_scale.copy_(generate_gparam(-a, a))
        return
    lo, hi = (w.amin(1, keepdim=True), w.amax(1, keepdim=True)) if s.weights.strategy == "channel" else (w.min(), w.max())
    m.weight_scale.copy_(calculate_qparams(lo, hi, s.weights)[0])
    if hasattr(m, "input_scale"):
        m.input_scale.copy_(calculate_qparams(-a, a, s.input_activations)[0])


@needs_ct
@pytest.mark.parametrize("preset", ["NVFP4", "FP8", "FP8_DYNAMIC"])
def test_we_load_checkpoints_compressed_tensors_wrote(tmp_path, preset):
    save_hf_dir(small_model(), tmp_path / "src")
    theirs = ct_quantize_and_save(tmp_path / "src", tmp_path / preset, preset)
    stored = load_file(tmp_path / preset / "model.safetensors")
    assert any(k.endswith("weight_packed" if preset == "NVFP4" else "weight_scale") for k in stored)
    ours = load(tmp_path / preset)
    for k, v in ours.state_dict().items():
        assert torch.equal(v.to(theirs[k].dtype), theirs[k]), k
    if preset != "NVFP4":  # FP8 decompresses in float32: exact there as well
        assert all(theirs[k].dtype == torch.float32 for k in ours.state_dict())


# ---- a model trained with --precision -------------------------------------------------------
def test_export_of_a_model_trained_with_nvfp4_stores_its_16x16_weights(tmp_path):
    model = small_model()
    applied = apply_recipe(model, "nvfp4")  # what `hybridlm train --precision nvfp4` does
    r = export_compressed(model, tmp_path / "t")  # format and linears from the LowPrecisionLinears
    assert sorted(r.quantized) == sorted(applied.quantized) and r.high_precision == applied.high_precision
    stored = stored_modules(load_file(r.out / "model.safetensors"))
    ours = load(r.out)
    for name in applied.quantized:
        w = model.get_submodule(name).weight
        if name.endswith(("q_proj", "k_proj", "v_proj")):
            continue  # one global scale for the three (vLLM fuses them)
        ref = nvfp4.quantize(w, (16, 16))
        assert torch.equal(stored[name]["weight_packed"], ref.packed[: w.shape[0]])
        assert torch.equal(stored[name]["weight_scale"].view(torch.uint8),
                           ref.block_scales.view(torch.uint8).repeat_interleave(16, 0)[: w.shape[0]])
        seen = nvfp4.fake_quantize(w, (16, 16))  # what the training forward computed with, to 1 ulp
        assert ((ours.get_submodule(name).weight - seen).abs() <= torch.finfo(torch.float32).eps * seen.abs()).all()


def test_export_of_a_model_trained_with_fp8_stores_its_weights_exactly(tmp_path):
    model = small_model()
    r = export_compressed(model, tmp_path / "t", recipe="fp8", high_precision_layers="auto")
    assert r.scheme == "FP8_DYNAMIC" and r.high_precision == [0, 6]
    ours = load(r.out)
    for name in r.quantized:
        if not name.split(".")[-1] in ("q_proj", "k_proj", "v_proj"):
            w = model.get_submodule(name).weight
            assert torch.equal(ours.get_submodule(name).weight, fp8.fake_quantize(w)), name


# ---- load, then generate --------------------------------------------------------------------
def test_load_an_nvfp4_export_and_generate_text(tmp_path):
    from hybridlm.serve.generation import generate, generate_text
    from hybridlm.training.tokenizer import default_tokenizer

    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**TINY_MODEL)).eval()
    tok = default_tokenizer()
    calib = [torch.tensor([tok.encode("In the beginning God created the heaven and the earth.")])]
    r = export_compressed(model, tmp_path / "q", "nvfp4", calib, high_precision_layers="none")
    loaded = load(r.out)
    with torch.no_grad():  # the reference: the same model with its weights quantized in memory
        for group in fused_groups(r.quantized):
            parts = ptq.quantize_nvfp4_weights([model.get_submodule(n).weight for n in group])
            for name, q in zip(group, parts):
                model.get_submodule(name).weight.copy_(q.dequantize())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    prompt = tok.encode("And God said")
    new = generate(loaded, [prompt], max_new_tokens=12, temperature=0)
    assert len(new[0]) == 12 and all(0 <= t < TINY_MODEL["vocab_size"] for t in new[0])
    assert new == generate(model, [prompt], max_new_tokens=12, temperature=0)
    text = generate_text(loaded, tok, ["And God said"], max_new_tokens=12, temperature=0)
    assert isinstance(text[0], str) and text[0] == tok.decode(new[0])


# ---- errors ---------------------------------------------------------------------------------
def rewrite_config(d, change) -> None:
    cfg = json.loads((d / "config.json").read_text())
    change(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


W4A16 = {"format": "pack-quantized", "targets": ["Linear"], "input_activations": None,
         "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True,
                     "dynamic": False}}


@pytest.mark.parametrize("change,message", [
    (lambda q: q.update(quant_method="awq"), "quantization method 'awq' is not supported"),
    (lambda q: q.update(quant_method="modelopt"), "quantization method 'modelopt'"),
    (lambda q: q["config_groups"].update(group_0=W4A16), r"format 'pack-quantized', weights int4 group\(128\)"),
    (lambda q: q["config_groups"]["group_0"].update(format="nvfp4-super"), "format 'nvfp4-super'"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="block", block_structure=[128, 128]),
     r"weights float8 block\(128x128\)"),
    (lambda q: q.update(sparsity_config={"format": "sparse-24-bitmask"}), "sparsity_config is not supported"),
    (lambda q: q.update(config_groups={}), "no config_groups"),
    (lambda q: q["ignore"].append("backbone.layers.3.mixer.in_proj"), "layers.3.mixer.in_proj is stored fp8 but "
                                                                       "quantization_config ignores it"),
    (lambda q: q["ignore"].remove("lm_head"), "lm_head is stored unquantized but quantization_config gives it fp8"),
])
def test_unsupported_or_inconsistent_checkpoints_fail_clearly(tmp_path, change, message):
    _, r = export(tmp_path, "fp8-static")
    rewrite_config(r.out, change)
    with pytest.raises(ValueError, match=message):
        load(r.out)


def test_a_missing_scale_fails_clearly(tmp_path):
    _, r = export(tmp_path, "nvfp4-a16")
    t = load_file(r.out / "model.safetensors")
    del t["backbone.layers.0.mixer.in_proj.weight_scale"]
    save_file(t, r.out / "model.safetensors")
    with pytest.raises(ValueError, match="in_proj: NVFP4 weight without its weight_scale"):
        load_compressed(r.out)


def test_export_errors(tmp_path):
    model = small_model()
    with pytest.raises(ValueError, match="nothing to quantize"):
        export_compressed(model, tmp_path / "a", "nvfp4", high_precision_layers="first:7")
    with pytest.raises(ValueError, match="fp8_granularity"):
        export_compressed(model, tmp_path / "b", "fp8", fp8_granularity="row")
    with pytest.raises(ValueError, match="does not match the training recipe"):
        export_compressed(model, tmp_path / "c", "fp8", recipe="nvfp4")
    with pytest.raises(ValueError, match="calibration data is empty"):
        export_compressed(model, tmp_path / "d", "nvfp4", calib=[])
    with pytest.raises(ValueError, match="format must be one of"):
        export_compressed(model, tmp_path / "e", "int8")
