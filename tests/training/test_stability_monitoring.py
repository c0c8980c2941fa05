"""Stability monitoring and the divergence stop (Rybakov et al.): output-norm monitoring against
manual norms, the divergence rule, an exploding run that stops cleanly, a healthy run left unchanged,
the report plot and `sweep-lr`."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import load_model
from hybridlm.model import HybridLM
from hybridlm.training.divergence import TrainingDiverged, divergence_reason
from hybridlm.training.loop import train
from hybridlm.training.metrics import read_metrics
from hybridlm.training.monitor import OutputMonitor, layer_group
from hybridlm.training.train_config import TrainConfig

from helpers import ALL_ON, ids_for, norm_of, one_layer, rms, small_config


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
    assert divergence_reason(float("nan"), 2.0, 3.0) == "non-finite loss (nan)"
    assert "running minimum" in divergence_reason(6.1, 2.0, 3.0)
    assert divergence_reason(5.9, 2.0, 3.0) is None
    assert divergence_reason(float("inf"), 2.0, 0.0) is None  # off: max_bad_steps handles it
    with pytest.raises(ValueError, match="diverge_factor"):
        TrainConfig(diverge_factor=0.5)
    with pytest.raises(ValueError, match="monitor_every"):
        TrainConfig(monitor_every=-1)


@pytest.mark.slow
def test_exploding_run_stops_cleanly(tmp_path, small_shards, tiny_model_file, one_thread):
    from hybridlm.training.checkpoints import latest_checkpoint
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
    from hybridlm.training.report import write_report
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
    from hybridlm.training import sweep
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
