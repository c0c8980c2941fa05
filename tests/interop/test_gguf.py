"""GGUF export (`save_gguf`, `convert(to="gguf")`) read back by llama.cpp's own `gguf` package: every tensor
equals ours after the documented transforms (exactly in F32, to the dtype's rounding in F16/BF16), the metadata
llama.cpp's nemotron_h reads, the tokenizer; bad input gets a clear error; llama.cpp itself, when it is here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
import torch
from torch import nn

from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import save_model
from hybridlm.interop.convert import convert
from hybridlm.interop.gguf import save_gguf
from hybridlm.interop.hf_weights import save_hf_dir
from hybridlm.model import HybridLM
from hybridlm.training.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer, default_tokenizer

from helpers import TINY_MODEL

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[2]
NANO2_LIKE = ROOT / "tests" / "data" / "nano2_like_chat_template.jinja"
F32_ALWAYS = ("attn_norm.weight", "output_norm.weight", "ssm_norm.weight", "ssm_conv1d.weight", "ssm_conv1d.bias",
              "ssm_dt.bias", "ssm_a", "ssm_d")


def gguf_model(seed: int = 0, **overrides) -> HybridLM:
    """TINY_MODEL with 2 Mamba groups and every layer kind, its norms, D and biases moved off their init."""
    torch.manual_seed(seed)
    model = HybridLM(HybridConfig(**{**TINY_MODEL, "pattern": "M-*M-", "n_groups": 2, **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", ".D", ".bias")):
                p.add_(0.3 * torch.randn_like(p))
    return model


def expected_tensors(model: HybridLM) -> dict[str, torch.Tensor]:
    """The GGUF tensors of `model` written out by hand from llama.cpp's nemotron_h layout."""
    cfg, out = model.cfg, {"token_embd.weight": model.backbone.embeddings.weight,
                           "output_norm.weight": model.backbone.norm_f.weight}
    if not cfg.tie_embeddings:
        out["output.weight"] = model.lm_head.weight
    for i, (kind, block) in enumerate(zip(cfg.pattern, model.backbone.layers)):
        b, m = f"blk.{i}.", block.mixer
        out[b + "attn_norm.weight"] = block.norm.weight
        if kind == "M":
            out.update({b + "ssm_in.weight": m.in_proj.weight, b + "ssm_conv1d.weight": m.conv1d.weight[:, 0, :],
                        b + "ssm_conv1d.bias": m.conv1d.bias if cfg.conv_bias else torch.zeros(cfg.conv_dim),
                        b + "ssm_dt.bias": m.dt_bias, b + "ssm_a": -torch.exp(m.A_log)[:, None],
                        b + "ssm_d": m.D[:, None], b + "ssm_norm.weight": m.norm.weight.view(cfg.n_groups, -1),
                        b + "ssm_out.weight": m.out_proj.weight})
        for ours, theirs in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                             ("o_proj", "attn_output"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            if hasattr(m, ours):
                out[b + theirs + ".weight"] = getattr(m, ours).weight
                if getattr(m, ours).bias is not None:
                    out[b + theirs + ".bias"] = getattr(m, ours).bias
    return {k: v.detach() for k, v in out.items()}


def read_tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (ggml type name, float32 values in torch's order) as the gguf package reads them."""
    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        out[t.name] = (t.tensor_type.name, torch.from_numpy(values.astype("float32")))
    return out


def fields(path: Path) -> dict:
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()}


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_every_tensor_reads_back_as_ours_after_the_documented_transforms(tmp_path, dtype):
    model = gguf_model()
    path = save_gguf(model, default_tokenizer(), tmp_path / "m.gguf", dtype)
    got, want = read_tensors(path), expected_tensors(model)
    assert sorted(got) == sorted(want)
    rounding = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    for name, expected in want.items():
        kind, values = got[name]
        stays_f32 = name.endswith(F32_ALWAYS)
        assert kind == ("F32" if stays_f32 else dtype.upper()), name
        expected = expected if stays_f32 else expected.to(rounding).float()
        assert values.shape == expected.shape, name
        assert torch.equal(values, expected), name  # bit-exact: the same rounding, nothing else


def test_a_tied_head_a_missing_conv_bias_and_every_optional_bias(tmp_path):
    model = gguf_model(tie_embeddings=True, conv_bias=False, attention_bias=True, mlp_bias=True)
    got = read_tensors(save_gguf(model, default_tokenizer(), tmp_path / "m.gguf"))
    assert "output.weight" not in got  # llama.cpp falls back to token_embd
    assert torch.equal(got["blk.0.ssm_conv1d.bias"][1], torch.zeros(model.cfg.conv_dim))  # llama.cpp adds one always
    assert {"blk.2.attn_q.bias", "blk.2.attn_output.bias", "blk.1.ffn_up.bias", "blk.1.ffn_down.bias"} <= set(got)
    assert sorted(got) == sorted(expected_tensors(model))
    assert all(torch.equal(got[k][1], v) for k, v in expected_tensors(model).items())


def test_metadata_is_what_llama_cpp_nemotron_h_reads(tmp_path):
    model, tok = gguf_model(max_seq_len=1234, norm_eps=1e-6), default_tokenizer()
    f = fields(save_gguf(model, tok, tmp_path / "m.gguf", "bf16", name="tiny-test"))
    a, cfg = "nemotron_h.", model.cfg
    assert (f["general.architecture"], f["general.name"], f["general.file_type"]) == ("nemotron_h", "tiny-test", 32)
    assert (f[a + "block_count"], f[a + "context_length"], f[a + "embedding_length"], f[a + "vocab_size"]) == (
        5, 1234, cfg.d_model, 4096)
    assert f[a + "feed_forward_length"] == [0, cfg.ffn_dim, 0, 0, cfg.ffn_dim]  # "M-*M-"
    assert f[a + "attention.head_count_kv"] == [0, 0, cfg.n_kv_heads, 0, 0]
    assert f[a + "attention.head_count"] == cfg.n_heads
    assert f[a + "attention.key_length"] == f[a + "attention.value_length"] == cfg.head_dim
    assert f[a + "attention.layer_norm_rms_epsilon"] == f[a + "attention.layer_norm_epsilon"] == pytest.approx(1e-6)
    assert [f[a + "ssm." + k] for k in ("conv_kernel", "inner_size", "state_size", "time_step_rank", "group_count")] \
        == [cfg.conv_kernel, cfg.mamba_heads * cfg.mamba_head_dim, cfg.ssm_state, cfg.mamba_heads, 2]


def test_tokenizer_metadata_is_the_tokenizer(tmp_path):
    tok = Tokenizer.from_file(DEFAULT_TOKENIZER_PATH)
    f = fields(save_gguf(gguf_model(bos_token_id=None, pad_token_id=0), tok, tmp_path / "m.gguf",
                         chat_template="{{ messages[0]['content'] }}"))
    spec = json.loads(DEFAULT_TOKENIZER_PATH.read_text())
    assert (f["tokenizer.ggml.model"], f["tokenizer.ggml.pre"]) == ("gpt2", "gpt-2")
    assert f["tokenizer.ggml.tokens"] == [tok.id_to_token(i) for i in range(4096)]
    assert f["tokenizer.ggml.token_type"] == [3] + [1] * 4095  # <|endoftext|> is a control token
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert (f["tokenizer.ggml.eos_token_id"], f["tokenizer.ggml.padding_token_id"]) == (tok.eos_id, 0)
    assert f["tokenizer.ggml.bos_token_id"] == tok.eos_id  # no BOS: GPT-2's convention, not llama.cpp's token 11
    assert (f["tokenizer.ggml.add_bos_token"], f["tokenizer.ggml.add_eos_token"]) == (False, False)
    assert f["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"


def test_a_larger_model_vocabulary_is_padded_with_unused_tokens(tmp_path):
    f = fields(save_gguf(gguf_model(vocab_size=4100), default_tokenizer().backend, tmp_path / "m.gguf"))
    assert f["tokenizer.ggml.tokens"][4096:] == [f"[PAD{i}]" for i in range(4096, 4100)]
    assert f["tokenizer.ggml.token_type"][4096:] == [5] * 4
    assert "tokenizer.chat_template" not in f


def test_bad_input_gets_a_clear_error(tmp_path):
    model, tok, out = gguf_model(), default_tokenizer(), tmp_path / "m.gguf"
    with pytest.raises(ValueError, match="unknown GGUF dtype 'q4_0'"):
        save_gguf(model, tok, out, "q4_0")
    with pytest.raises(TypeError, match="exports a hybridlm HybridLM, not Linear"):
        save_gguf(nn.Linear(2, 2), tok, out)
    with pytest.raises(TypeError, match="tokenizer must be"):
        save_gguf(model, "tokenizer.json", out)
    with pytest.raises(ValueError, match="mamba_proj_bias=True cannot be exported to GGUF"):
        save_gguf(gguf_model(mamba_proj_bias=True), tok, out)
    with pytest.raises(ValueError, match="training-stability options .*qk_norm"):
        save_gguf(gguf_model(qk_norm="rmsnorm"), tok, out)
    with pytest.raises(ValueError, match="time_step_limit=.*no upper bound"):
        save_gguf(gguf_model(time_step_limit=(0.0, 1.0)), tok, out)
    with pytest.raises(ValueError, match="tokenizer has 4096 tokens but the model's vocabulary only 4000"):
        save_gguf(gguf_model(vocab_size=4000), tok, out)
    assert not out.exists()


def test_a_tokenizer_llama_cpp_would_split_otherwise_is_refused_unless_named(tmp_path):
    spec = json.loads(DEFAULT_TOKENIZER_PATH.read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    prefixed = tokenizers.Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(ValueError, match="does not pre-tokenize like llama.cpp's 'gpt-2' .*prefix space"):
        save_gguf(gguf_model(), prefixed, tmp_path / "m.gguf")
    path = save_gguf(gguf_model(), prefixed, tmp_path / "m.gguf", tokenizer_pre="default")
    assert fields(path)["tokenizer.ggml.pre"] == "default"
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0}, unk_token="a"))
    with pytest.raises(ValueError, match="only BPE tokenizers"):
        save_gguf(gguf_model(), word_level, tmp_path / "w.gguf", tokenizer_pre="default")


def test_convert_to_gguf_file_or_directory_with_the_source_tokenizer(tmp_path):
    src = tmp_path / "ours"
    save_model(gguf_model(), src)
    (src / "tokenizer.json").write_bytes(DEFAULT_TOKENIZER_PATH.read_bytes())
    (src / "chat_template.jinja").write_bytes(NANO2_LIKE.read_bytes())
    out = convert(src, tmp_path / "out", to="gguf")
    assert out == tmp_path / "out" / "model-f32.gguf"
    f = fields(out)
    assert f["tokenizer.chat_template"] == NANO2_LIKE.read_text(encoding="utf-8")
    assert (f["general.file_type"], f["general.name"]) == (0, "ours")
    assert convert(src, tmp_path / "x.gguf", to="gguf", dtype=torch.bfloat16) == tmp_path / "x.gguf"
    assert fields(tmp_path / "x.gguf")["general.file_type"] == 32
    with pytest.raises(ValueError, match="unknown GGUF dtype"):
        convert(src, tmp_path / "y.gguf", to="gguf", dtype=torch.float64)


def test_convert_hf_bf16_to_gguf_keeps_bf16_and_uses_the_bundled_tokenizer(tmp_path):
    model = gguf_model().to(torch.bfloat16)
    save_hf_dir(model, tmp_path / "hf")  # no tokenizer files
    out = convert(tmp_path / "hf", tmp_path / "g", to="gguf")
    assert out.name == "model-bf16.gguf"
    got = read_tensors(out)
    assert torch.equal(got["token_embd.weight"][1], model.backbone.embeddings.weight.float())
    bundled = default_tokenizer()
    assert fields(out)["tokenizer.ggml.tokens"] == [bundled.id_to_token(i) for i in range(4096)]


@pytest.mark.slow
def test_llama_cpp_gives_our_tokens_and_logits(tmp_path):
    """benchmarks/check_gguf_llamacpp.py (skipped without llama.cpp: set LLAMA_CPP_BIN to its build/bin)."""
    if not os.environ.get("LLAMA_CPP_BIN") and shutil.which("llama-bench") is None:
        pytest.skip("no llama.cpp: set LLAMA_CPP_BIN to its build/bin")
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "check_gguf_llamacpp.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode == 2:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {(r["variant"], r["dtype"]) for r in results} == {(v, d) for v in ("plain", "tied-biases")
                                                             for d in ("f32", "f16", "bf16")}
    for r in results:
        assert r["tokens_equal"] and r["special_token_parsed"], r
        if r["dtype"] == "f32":
            assert r["max_abs_logit_diff"] < 1e-4, r
