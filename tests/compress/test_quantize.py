"""`quantize_checkpoint`: a checkpoint directory (ours or Hugging Face) + calibration shards -> a compressed-tensors
directory that loads back, with the tokenizer beside it; bad calibration input fails with one clear error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from hybridlm.compress.quantize import calibration_data, quantize_checkpoint
from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import save_model
from hybridlm.interop.convert import load
from hybridlm.interop.hf_weights import save_hf_dir
from hybridlm.lowp import ptq
from hybridlm.model import HybridLM
from hybridlm.training.tokenizer import DEFAULT_TOKENIZER_PATH

from helpers import TINY_MODEL


@pytest.fixture
def tiny_ckpt(tmp_path):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**TINY_MODEL)).eval()
    d = save_model(model, tmp_path / "src")
    shutil.copyfile(DEFAULT_TOKENIZER_PATH, d / "tokenizer.json")
    return model, d


def test_quantize_our_checkpoint_with_calibration_shards(tiny_ckpt, small_shards, tmp_path):
    model, src = tiny_ckpt
    r = quantize_checkpoint(src, tmp_path / "q", "nvfp4", calib=small_shards, calib_seqs=4, seq_len=32, batch_size=2)
    assert r.calibrated and r.scheme == "NVFP4" and (r.out / "tokenizer.json").is_file()
    stored = load_file(r.out / "model.safetensors")
    assert all(f"{n}.input_global_scale" in stored for n in r.quantized)
    batches = calibration_data(small_shards, model.cfg.vocab_size, 4, 32, 2)
    amax = ptq.calibration_amax(model, r.quantized, batches)  # the same windows, so the same scales
    n = r.quantized[-1]
    assert torch.equal(stored[f"{n}.input_global_scale"], ptq.nvfp4_input_global_scale(amax[n]))
    back = load(r.out)
    ids = batches[0][:1, :16]
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max() < 1.0 and not torch.equal(back(ids), model(ids))


def test_quantize_a_bf16_hf_directory_keeps_its_dense_dtype(tiny_ckpt, tmp_path):
    model, _ = tiny_ckpt
    save_hf_dir(model.to(torch.bfloat16), tmp_path / "hf")
    r = quantize_checkpoint(tmp_path / "hf", tmp_path / "q", "fp8", fp8_granularity="channel")
    cfg = json.loads((r.out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and r.scheme == "FP8_DYNAMIC (channel weights)"
    stored = load_file(r.out / "model.safetensors")
    assert stored["lm_head.weight"].dtype == torch.bfloat16 and stored["backbone.norm_f.weight"].dtype == torch.bfloat16
    assert load(r.out).lm_head.weight.dtype == torch.float32  # loaded dequantized, float32


def test_bad_calibration_input_and_paths(tiny_ckpt, tmp_path):
    _, src = tiny_ckpt
    with pytest.raises(FileNotFoundError, match="calibration data not found"):
        quantize_checkpoint(src, tmp_path / "q", "nvfp4", calib=tmp_path / "missing")
    with pytest.raises(ValueError, match="calibration data is empty"):
        quantize_checkpoint(src, tmp_path / "q", "nvfp4", calib=[])
    with pytest.raises(ValueError, match="is the source checkpoint"):
        quantize_checkpoint(src, src, "nvfp4")
    with pytest.raises(FileNotFoundError):
        quantize_checkpoint(tmp_path / "nope", tmp_path / "q", "fp8")


def test_a_training_recipe_implies_the_format_and_its_weight_blocks(tiny_ckpt, tmp_path):
    _, src = tiny_ckpt
    ptq_ = quantize_checkpoint(src, tmp_path / "ptq", "nvfp4")
    no2d = quantize_checkpoint(src, tmp_path / "no2d", recipe="nvfp4-no-2d")  # 1x16 weight blocks, as PTQ
    tiles = quantize_checkpoint(src, tmp_path / "tiles", recipe="nvfp4")      # 16x16 tiles
    a, b, c = (load_file(r.out / "model.safetensors") for r in (ptq_, no2d, tiles))
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) for k in a if a[k].dtype != torch.float8_e4m3fn)
    n = "backbone.layers.1.mixer.up_proj.weight_scale"
    assert not torch.equal(a[n].view(torch.uint8), c[n].view(torch.uint8))
    assert torch.equal(c[n].view(torch.uint8)[0::16], c[n].view(torch.uint8)[15::16])  # one scale per 16 rows
    assert quantize_checkpoint(src, tmp_path / "f", recipe="fp8").scheme == "FP8_DYNAMIC"


def test_quantize_command_then_serve_the_checkpoint(tiny_ckpt, small_shards, tmp_path):
    """`hybridlm quantize --format nvfp4` from the CLI, then `serve`'s loader and server: greedy answers over
    HTTP equal `generate()` on the dequantized model, and a bad format / missing source is one clear error."""
    import argparse

    import httpx

    from hybridlm.cli import load_model_from, load_tokenizer_for, main
    from hybridlm.serve.generation import generate

    from helpers import serving

    _, src = tiny_ckpt
    out = tmp_path / "nvfp4"
    assert main(["quantize", "--ckpt", str(src), "--format", "nvfp4", "--calib", str(small_shards),
                 "--calib-seqs", "2", "--seq-len", "32", "--batch-size", "2", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["format"] == "nvfp4-pack-quantized"
    args = argparse.Namespace(ckpt=str(out), hf=None, device="cpu", tokenizer=None, chat_template=None)
    served, tok = load_model_from(args), load_tokenizer_for(args)
    assert torch.equal(served.lm_head.weight, load(out).lm_head.weight)
    prompt = "In the beginning God"
    expected = tok.decode([t for t in generate(served, [tok.encode(prompt)], max_new_tokens=8, temperature=0)[0]
                           if t != tok.eos_id])
    with serving(served, tok, model_name="q") as srv:
        r = httpx.post(srv.url + "/v1/completions", timeout=60,
                       json={"model": "q", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected
    assert main(["quantize", "--out", str(tmp_path / "x")]) == 1
    assert main(["quantize", "--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 1
