"""Training stability: the norm placements and logit capping against hand computations, the explicit
attention path against SDPA, output-norm monitoring against manual norms, divergence detection,
config / checkpoint / HF-export handling, the report plot and `sweep-lr`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm.attention import attention_mask, explicit_attention
from hybridlm.checkpoint import load_model, save_model
from hybridlm.config import HybridConfig
from hybridlm.hf_interop import hybrid_to_hf_config
from hybridlm.model import HybridLM
from hybridlm.monitor import OutputMonitor, layer_group
from hybridlm.training import TrainConfig, TrainingDiverged, _divergence, read_metrics, train

from helpers import left_padded_pair, small_config

ALL_ON = dict(qk_norm="layernorm", post_proj_norm="rmsnorm", post_fc2_norm="layernorm",
              mamba_out_norm="rmsnorm", attn_logit_softcap=2.0)


def one_layer(pattern: str, seed: int = 0, **options) -> HybridLM:
    """A float64 model with random (not identity) weights in every norm, including the new ones.

    (Norms compute in float32, as in the reference implementation, hence tolerances of 1e-6.)"""
    torch.manual_seed(seed)
    model = HybridLM(small_config(pattern=pattern, **options)).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def ids_for(model: HybridLM, b: int = 2, l: int = 11, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (b, l), generator=torch.Generator().manual_seed(seed))


# ---- hand computations --------------------------------------------------------------
def rms(x, w, eps=1e-5):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def norm_of(module, x):
    """The stability norm `module` (RMSNorm or LayerNorm), written out by hand."""
    if hasattr(module, "bias"):
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return module.weight * (x - mu) / torch.sqrt(var + 1e-5) + module.bias
    return rms(x, module.weight)


def head_out(model, x):
    return F.linear(rms(x, model.backbone.norm_f.weight), model.lm_head.weight)


def attention_by_hand(model, ids):
    """Logits of a one-layer `*` model: every option applied step by step with plain tensor ops."""
    cfg, blk = model.cfg, model.backbone.layers[0]
    att = blk.mixer
    x = model.backbone.embeddings.weight[ids]                             # (b, l, d)
    h = x if cfg.qkv_norm != "none" else rms(x, blk.norm.weight)          # qkv_norm removes the pre-norm
    q, k, v = (F.linear(h, m.weight) for m in (att.q_proj, att.k_proj, att.v_proj))
    if cfg.qkv_norm != "none":
        qkv = norm_of(att.qkv_norm, torch.cat([q, k, v], -1))
        q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], -1)
    b, l, _ = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    q, k, v = q.view(b, l, nh, hd), k.view(b, l, nkv, hd), v.view(b, l, nkv, hd)
    if cfg.qk_norm != "none":
        q, k = norm_of(att.q_norm, q), norm_of(att.k_norm, k)
    out = torch.zeros(b, l, nh, hd, dtype=x.dtype)
    for head in range(nh):
        kv = head // (nh // nkv)
        s = torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kv]) / math.sqrt(hd)
        if cfg.attn_logit_softcap:
            s = cfg.attn_logit_softcap * torch.tanh(s / cfg.attn_logit_softcap)
        s = s.masked_fill(torch.ones(l, l).triu(1).bool(), -math.inf)
        out[:, :, head] = torch.einsum("bij,bjd->bid", s.softmax(-1), v[:, :, kv])
    y = F.linear(out.reshape(b, l, -1), att.o_proj.weight)
    if cfg.post_proj_norm != "none":
        y = norm_of(att.post_proj_norm, y)
    return head_out(model, x + y)


def mlp_by_hand(model, ids):
    blk = model.backbone.layers[0]
    x = model.backbone.embeddings.weight[ids]
    y = F.linear(torch.relu(F.linear(rms(x, blk.norm.weight), blk.mixer.up_proj.weight)).square(),
                 blk.mixer.down_proj.weight)
    if model.cfg.post_fc2_norm != "none":
        y = norm_of(blk.mixer.post_fc2_norm, y)
    return head_out(model, x + y)


@pytest.mark.parametrize("options", [
    {},
    {"qk_norm": "layernorm"},
    {"qk_norm": "rmsnorm"},
    {"qkv_norm": "layernorm"},
    {"qkv_norm": "rmsnorm", "qk_norm": "layernorm"},
    {"post_proj_norm": "layernorm"},
    {"attn_logit_softcap": 0.7},
    {"qk_norm": "layernorm", "attn_logit_softcap": 1.5, "post_proj_norm": "rmsnorm"},
])
def test_attention_options_match_hand_computation(options):
    model = one_layer("*", **options)
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - attention_by_hand(model, ids)).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["none", "rmsnorm", "layernorm"])
def test_post_fc2_norm_matches_hand_computation(kind):
    model = one_layer("-", post_fc2_norm=kind)
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - mlp_by_hand(model, ids)).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_mamba_out_norm_is_a_norm_after_out_proj(kind):
    """Same weights without the option: the residual update becomes norm(out_proj output)."""
    model = one_layer("M", mamba_out_norm=kind)
    plain = HybridLM(model.cfg.replace(mamba_out_norm="none")).double().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "out_norm" not in k})
    seen = {}
    plain.backbone.layers[0].mixer.out_proj.register_forward_hook(lambda m, i, o: seen.update(y=o))
    ids = ids_for(model)
    with torch.no_grad():
        plain(ids)
        x = model.backbone.embeddings.weight[ids]
        want = head_out(model, x + norm_of(model.backbone.layers[0].mixer.out_norm, seen["y"]))
        assert (model(ids) - want).abs().max() < 1e-6


def test_qkv_norm_removes_the_attention_pre_norm_only():
    model = HybridLM(small_config(qkv_norm="layernorm"))
    for i, (kind, blk) in enumerate(zip(model.cfg.layer_kinds(), model.backbone.layers)):
        assert (blk.norm is None) == (kind == "attention")
        assert (f"backbone.layers.{i}.norm.weight" in model.state_dict()) == (kind != "attention")
    n_qkv = (model.cfg.n_heads + 2 * model.cfg.n_kv_heads) * model.cfg.head_dim
    assert model.backbone.layers[1].mixer.qkv_norm.weight.shape == (n_qkv,)


def test_options_off_keep_parameter_names_and_count():
    base = HybridLM(small_config())
    names = set(base.state_dict())
    assert not any("q_norm" in n or "post_" in n or "out_norm" in n for n in names)
    on = HybridLM(small_config(**ALL_ON))
    assert names <= set(on.state_dict())  # existing weights keep their names
    new = sorted(set(on.state_dict()) - names)
    assert new and all(n.rsplit(".", 2)[-2] in ("q_norm", "k_norm", "post_proj_norm", "post_fc2_norm", "out_norm")
                       for n in new)


# ---- softcap / explicit attention vs SDPA ------------------------------------------------
@pytest.mark.parametrize("case", ["causal", "padded", "cached", "decode"])
def test_explicit_attention_equals_sdpa(case):
    gen = torch.Generator().manual_seed(0)
    b, h, hk, d = 2, 4, 2, 8
    lq, lk = {"causal": (7, 7), "padded": (7, 7), "cached": (3, 10), "decode": (1, 9)}[case]
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hk, lk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(b, lk, dtype=torch.bool)
    if case == "padded":
        valid[1, :3] = False
    mask = attention_mask(lq, valid)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out, max_logit = explicit_attention(q, k, v, mask)
    assert (out - ref).abs().max() < 1e-12
    scores = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(2, 1)) / math.sqrt(d)
    assert abs(float(max_logit) - float(scores.masked_fill(~mask, -math.inf).max())) < 1e-12
    huge, _ = explicit_attention(q, k, v, mask, cap=1e7)
    assert (huge - ref).abs().max() < 1e-6
    capped, _ = explicit_attention(q, k, v, mask, cap=0.5)
    assert (capped - ref).abs().max() > 1e-3  # a small cap really changes the attention


def test_huge_softcap_equals_no_cap_in_the_model():
    model = one_layer("M*-", attn_logit_softcap=1e7)
    plain = HybridLM(model.cfg.replace(attn_logit_softcap=0.0)).double().eval()
    plain.load_state_dict(model.state_dict())
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - plain(ids)).abs().max() < 1e-6


@pytest.mark.parametrize("options", [ALL_ON, {"qkv_norm": "rmsnorm", "attn_logit_softcap": 1.0}])
def test_decode_equals_forward_with_options_on(options):
    model = one_layer("M*-M-*M", seed=3, **options)
    ids = ids_for(model, b=2, l=21, seed=4)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, capacity=4)  # the KV cache has to grow
        steps = [model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache) for t in range(6, 21)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-6


def test_left_padding_with_options_on():
    model = one_layer("M*-M-*M", seed=5, **ALL_ON)
    a, b, ids, mask = left_padded_pair(13, 8, seed=5)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        assert (batched[1, 5:] - model(b)[0]).abs().max() < 1e-6
        assert (batched[0] - model(a)[0]).abs().max() < 1e-6


# ---- config, checkpoints, HF ----------------------------------------------------------
def test_config_defaults_validation_and_round_trip(tmp_path):
    assert HybridConfig().stability_options() == {}
    for bad, match in [({"qk_norm": "batchnorm"}, "qk_norm"), ({"post_fc2_norm": True}, "post_fc2_norm"),
                       ({"attn_logit_softcap": -1.0}, "attn_logit_softcap"),
                       ({"attn_logit_softcap": math.inf}, "attn_logit_softcap")]:
        with pytest.raises(ValueError, match=match):
            HybridConfig(**bad)
    cfg = small_config(**ALL_ON, qkv_norm="rmsnorm")
    assert HybridConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = cfg.to_dict()
    for name in ("qk_norm", "qkv_norm", "post_proj_norm", "post_fc2_norm", "mamba_out_norm", "attn_logit_softcap"):
        del old[name]  # a config.json written before these fields existed
    assert HybridConfig.from_dict(old).stability_options() == {}
    model = one_layer("M*-", **ALL_ON).float()
    save_model(model, tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    ids = ids_for(model)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_hf_export_refuses_stability_options():
    hybrid_to_hf_config(small_config())  # still fine with everything off
    for name, value in [("qk_norm", "layernorm"), ("qkv_norm", "rmsnorm"), ("mamba_out_norm", "layernorm"),
                        ("attn_logit_softcap", 30.0)]:
        with pytest.raises(ValueError, match=name):
            hybrid_to_hf_config(small_config(**{name: value}))


# ---- monitoring ----------------------------------------------------------------------
class TaggedLinear(torch.nn.Linear):
    """A subclass, as low-precision layers are: it must be monitored too."""


def test_monitor_matches_manual_norms():
    model = one_layer("M*-", seed=7, qk_norm="layernorm")
    model.lm_head.__class__ = TaggedLinear
    ids1, ids2 = ids_for(model, seed=1), ids_for(model, b=3, l=5, seed=2)
    with torch.no_grad():
        plain = model(ids1)
        with OutputMonitor(model) as mon:
            logits1, logits2 = model(ids1), model(ids2)
        # by hand: layer 0's in_proj output, the logits (lm_head), and layer 1's attention logits
        x = model.backbone.embeddings.weight[ids1]
        blk0, blk1 = model.backbone.layers[:2]
        in1 = F.linear(rms(x, blk0.norm.weight), blk0.mixer.in_proj.weight)
        in2 = F.linear(rms(model.backbone.embeddings.weight[ids2], blk0.norm.weight), blk0.mixer.in_proj.weight)
        want_in = math.sqrt((in1.pow(2).sum() + in2.pow(2).sum()) / (in1.numel() + in2.numel()))
        want_head = math.sqrt((logits1.pow(2).sum() + logits2.pow(2).sum()) / (logits1.numel() + logits2.numel()))
        h = rms(blk0(x), blk1.norm.weight)
        att, (b, l, _) = blk1.mixer, x.shape
        q = norm_of(att.q_norm, F.linear(h, att.q_proj.weight).view(b, l, 4, 16))
        k = norm_of(att.k_norm, F.linear(h, att.k_proj.weight).view(b, l, 2, 16)).repeat_interleave(2, 2)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / 4.0
        want_logit = s.masked_fill(torch.ones(l, l).triu(1).bool(), -math.inf).max()
    rms_by_layer = mon.layer_rms()
    assert rms_by_layer["backbone.layers.0.mixer.in_proj"] == pytest.approx(want_in, rel=1e-6)
    assert rms_by_layer["lm_head"] == pytest.approx(want_head, rel=1e-6)
    assert mon.logit_max()["backbone.layers.1.mixer"] >= want_logit - 1e-6  # ids2 may hold a larger one
    s = mon.summary()
    qkv = [v for n, v in rms_by_layer.items() if layer_group(n) == "QKV"]
    assert len(qkv) == 3 and s["rms/QKV"] == max(qkv)
    assert {"rms/QKV", "rms/Proj", "rms/FC1", "rms/FC2", "rms/in_proj", "rms/out_proj", "rms/lm_head"} <= set(s)
    assert (plain - logits1).abs().max() < 1e-10  # the monitored (explicit) path computes the same model
    # hooks are gone afterwards and attention is back on SDPA
    assert all(not m._forward_hooks for m in model.modules())
    assert not blk1.mixer.record_logits


def test_monitor_logit_max_single_call():
    model = one_layer("*", seed=8)
    ids = ids_for(model, b=1, l=9)
    with torch.no_grad(), OutputMonitor(model) as mon:
        model(ids)
        att = model.backbone.layers[0].mixer
        h = rms(model.backbone.embeddings.weight[ids], model.backbone.layers[0].norm.weight)
        q = F.linear(h, att.q_proj.weight).view(1, 9, 4, 16)
        k = F.linear(h, att.k_proj.weight).view(1, 9, 2, 16).repeat_interleave(2, 2)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / 4.0
    want = s.masked_fill(torch.ones(9, 9).triu(1).bool(), -math.inf).max()
    assert mon.logit_max()["backbone.layers.0.mixer"] == pytest.approx(float(want), rel=1e-6)


# ---- divergence detection ----------------------------------------------------------------
def test_divergence_rule():
    assert _divergence(float("nan"), 2.0, 3.0) == "non-finite loss (nan)"
    assert "running minimum" in _divergence(6.1, 2.0, 3.0)
    assert _divergence(5.9, 2.0, 3.0) is None
    assert _divergence(float("inf"), 2.0, 0.0) is None  # off: max_bad_steps handles it
    with pytest.raises(ValueError, match="diverge_factor"):
        TrainConfig(diverge_factor=0.5)
    with pytest.raises(ValueError, match="monitor_every"):
        TrainConfig(monitor_every=-1)


@pytest.mark.slow
def test_exploding_run_stops_cleanly(tmp_path, small_shards, tiny_model_file, one_thread):
    from hybridlm.run_checkpoints import latest_checkpoint
    out = tmp_path / "boom"
    tc = TrainConfig(model=tiny_model_file, data=str(small_shards), out=str(out), steps=40, batch_size=4,
                     seq_len=32, lr=1.0, min_lr=0.1, warmup_steps=20, save_every=2, eval_batches=0,
                     monitor_every=1, diverge_factor=1.5, progress=False, grad_clip=0.0)
    with pytest.raises(TrainingDiverged, match="diverged at step") as info:
        train(tc)
    step = info.value.step
    assert step < 40
    (div,) = read_metrics(out, "diverged")
    assert div["step"] == step and div["loss"] > 1.5 * div["min_loss"]
    mon = read_metrics(out, "monitor")
    assert [r["step"] for r in mon] == list(range(1, step + 1))  # monitored every step up to the stop
    ckpt = latest_checkpoint(out)  # the checkpoint before the divergence is intact and loadable
    assert ckpt is not None and int(ckpt.name[5:]) < step
    load_model(ckpt)
    assert not (out / "final").exists()
    from hybridlm.report import write_report
    page = write_report(out).read_text()
    assert "Output norms" in page and (out / "plots" / "monitor.png").is_file() and "diverged" in page


@pytest.mark.slow
def test_healthy_run_unchanged_by_detection(tmp_path, small_shards, tiny_model_file, one_thread):
    """Same seed and data: a run with monitoring + detection on logs the same losses as one without."""
    common = dict(model=tiny_model_file, data=str(small_shards), steps=12, batch_size=4, seq_len=32,
                  eval_batches=0, log_every=1, progress=False)
    train(TrainConfig(out=str(tmp_path / "a"), **common))
    train(TrainConfig(out=str(tmp_path / "b"), monitor_every=4, diverge_factor=1.5, **common))
    la = [r["loss"] for r in read_metrics(tmp_path / "a", "train")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "b", "train")]
    assert len(la) == 12 and la == pytest.approx(lb, rel=1e-5, abs=1e-5)
    assert [r["step"] for r in read_metrics(tmp_path / "b", "monitor")] == [4, 8, 12]
    assert not read_metrics(tmp_path / "b", "diverged")


# ---- sweep-lr ----------------------------------------------------------------------------
@pytest.mark.slow
def test_sweep_lr_table_plot_and_skip(tmp_path, small_shards, tiny_model_file, one_thread, monkeypatch):
    from hybridlm import sweep
    from hybridlm.cli import main
    out = tmp_path / "sweep"
    argv = ["sweep-lr", "--model", tiny_model_file, "--data", str(small_shards), "--out", str(out),
            "--variants", "qk_norm,qkv_norm", "--lrs", "1e-3,3", "--steps", "12", "--warmup-steps", "2",
            "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--grad-clip", "0",
            "--diverge-factor", "1.5", "--monitor-every", "2"]
    assert main(argv) == 0
    rows = list(json.loads((out / v / f"lr_{lr}" / "result.json").read_text())
                for v in ("qk_norm", "qkv_norm") for lr in ("0.001", "3"))
    assert [r["status"] for r in rows] == ["ok", "diverged", "ok", "diverged"]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in rows if r["status"] == "ok")
    table = (out / "results.md").read_text()
    assert "diverged @ step" in table and "- qk_norm: 0.001" in table
    assert (out / "loss_vs_lr.png").stat().st_size > 0
    assert len((out / "results.csv").read_text().splitlines()) == 5
    assert HybridConfig.load(out / "qkv_norm" / "model.json").qkv_norm == "layernorm"
    monkeypatch.setattr(sweep, "train", lambda tc: pytest.fail("finished runs must not be re-trained"))
    assert main(argv) == 0
    assert main(argv[:-4] + ["--variants", "nonsense"]) == 1


# ---- GPU ---------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_options_and_monitor_on_cuda():
    torch.manual_seed(0)
    model = HybridLM(small_config(**ALL_ON)).cuda().eval()
    ids = torch.randint(0, 97, (2, 33), device="cuda")
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        steps = [model(ids[:, :10], cache)] + [model(ids[:, t:t + 1], cache) for t in range(10, 33)]
        assert (torch.cat(steps, 1) - full).abs().max() < 1e-3
        with torch.autocast("cuda", dtype=torch.bfloat16), OutputMonitor(model) as mon:
            model(ids)
    s = mon.summary()
    assert math.isfinite(s["attn_logit_max"]) and s["rms/QKV"] > 0
