"""Training loop: schedules, loss goes down, exact resume, crash safety, NaN guard, pruning, bad inputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hybridlm.config import preset
from hybridlm.interop.checkpoint import WEIGHTS_NAME, load_model
from hybridlm.interop.files import load_tensors
from hybridlm.model import HybridLM
from hybridlm.training.checkpoints import OPTIMIZER_NAME, latest_checkpoint, list_checkpoints, load_checkpoint
from hybridlm.training.divergence import TrainingDiverged
from hybridlm.training.loop import train
from hybridlm.training.metrics import read_metrics
from hybridlm.training.optim import build_optimizer, lr_at, param_groups
from hybridlm.training.train_config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _tc(model: str, data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(model=model, data=str(data), out=str(out), steps=8, batch_size=4, seq_len=32, lr=3e-3,
                min_lr=3e-4, warmup_steps=2, eval_every=4, eval_batches=2, save_every=4, keep_last=0,
                log_every=1, progress=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def _losses(run: Path, kind: str = "train", key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run, kind)}


# ------------------------------------------------------------------ optimizer / schedule


def test_lr_schedules() -> None:
    kw = dict(lr=1.0, min_lr=0.1, steps=100, warmup_steps=10)
    assert [lr_at(s, **kw) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(10, **kw) == pytest.approx(1.0) and lr_at(99, **kw) == pytest.approx(0.1)
    cos = [lr_at(s, **kw) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(cos, cos[1:]))  # monotone decay after warmup
    assert lr_at(55, **kw) == pytest.approx(0.55, abs=0.01)  # half way: (lr + min_lr) / 2
    wsd = dict(kw, schedule="wsd", decay_frac=0.2)
    assert [lr_at(s, **wsd) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable phase
    assert lr_at(80, **wsd) == pytest.approx(1.0 - 0.9 / 20) and lr_at(99, **wsd) == pytest.approx(0.1)
    assert lr_at(50, **dict(kw, schedule="constant")) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, **dict(kw, schedule="linear"))


def test_no_weight_decay_on_1d_params() -> None:
    model = HybridLM(preset("tiny", d_model=64, pattern="M*-", ffn_dim=128, ssm_state=16, mamba_head_dim=16,
                            tie_embeddings=True))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied counted once
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].rsplit(".", 1)[-1] for p in no_decay["params"]} == {"weight", "bias", "A_log", "D", "dt_bias"}
    assert build_optimizer(model, 1e-3, 0.1).defaults["foreach"] is True


# ----------------------------------------------------------------------------- learning


def test_loss_decreases_and_run_dir_layout(small_shards: Path, tiny_model_file: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    summary = train(_tc(tiny_model_file, small_shards, run, steps=200, batch_size=4, seq_len=64, warmup_steps=10,
                        eval_every=100, eval_batches=4, save_every=100, keep_last=1, log_every=10))
    val = _losses(run, "val", "val_loss")
    assert sorted(val) == [0, 100, 200]
    assert val[0] == pytest.approx(math.log(4096), abs=0.05)  # the initial model is near uniform
    assert val[200] < 0.7 * val[0], val
    assert summary["val_loss"] == val[200] and summary["step"] == 200 and summary["tokens"] == 200 * 4 * 64
    assert summary["run_dir"] == str(run) and summary["skipped_steps"] == 0
    # metrics schema
    rows = read_metrics(run, "train")
    assert [r["step"] for r in rows] == list(range(10, 201, 10))
    assert set(rows[0]) == {"kind", "step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "time"}
    assert rows[-1]["tokens"] == 200 * 256 and rows[-1]["tokens_per_s"] > 0 and rows[-1]["grad_norm"] > 0
    assert rows[-1]["lr"] == pytest.approx(3e-4)  # cosine ends at min_lr
    assert rows[-1]["time"] > rows[0]["time"] > 0
    assert set(read_metrics(run, "val")[0]) == {"kind", "step", "val_loss", "tokens"}
    # run directory
    assert json.loads((run / "train_config.json").read_text())["steps"] == 200
    assert [p.name for p in list_checkpoints(run)] == ["step_00000200"]  # keep_last=1
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000200"
    final = load_model(run / "final")
    ckpt = load_model(run / "checkpoints" / "step_00000200")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), ckpt.state_dict().values()))
    assert (run / "final" / "tokenizer.json").is_file()


def test_raw_text_is_tokenized_into_the_run_dir(tmp_path: Path, tiny_model_file: str) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"And God said, let there be light {i}."}) + "\n"
                              for i in range(400)), encoding="utf-8")
    summary = train(_tc(tiny_model_file, corpus, tmp_path / "run", steps=2, save_every=0, eval_batches=1,
                        val_fraction=0.2))
    meta = json.loads((tmp_path / "run" / "data" / "meta.json").read_text())
    assert meta["sources"] == [str(corpus)] and summary["step"] == 2


# ------------------------------------------------------------------------------- resume


def test_resume_is_bit_exact(small_shards: Path, tiny_model_file: str, tmp_path: Path) -> None:
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    a = train(_tc(tiny_model_file, small_shards, straight))
    first = train(_tc(tiny_model_file, small_shards, parts, stop_at=4))
    assert first["step"] == 4 and latest_checkpoint(parts).name == "step_00000004"
    assert not (parts / "final").exists()
    b = train(_tc(tiny_model_file, small_shards, parts, resume=True))
    assert b["step"] == 8 and b["train_loss"] == a["train_loss"] and b["val_loss"] == a["val_loss"]
    la, lb = _losses(straight), _losses(parts)
    assert list(lb) == list(range(1, 9))  # one line per step: nothing duplicated by the resume
    assert la == lb  # exact float equality, step for step
    assert _losses(straight, "val", "val_loss") == _losses(parts, "val", "val_loss")
    wa = load_tensors(straight / "checkpoints" / "step_00000008" / WEIGHTS_NAME)
    wb = load_tensors(parts / "checkpoints" / "step_00000008" / WEIGHTS_NAME)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = load_checkpoint(straight / "checkpoints" / "step_00000008")
    ob = load_checkpoint(parts / "checkpoints" / "step_00000008")
    assert oa["state"]["tokens"] == ob["state"]["tokens"] == 8 * 4 * 32
    for k, sa in oa["optimizer"]["state"].items():
        assert all(torch.equal(sa[n], ob["optimizer"]["state"][k][n]) for n in ("exp_avg", "exp_avg_sq"))
    # resuming a finished run trains nothing more and keeps the result
    again = train(_tc(tiny_model_file, small_shards, parts, resume=True))
    assert again["step"] == 8 and again["val_loss"] == a["val_loss"] and _losses(parts) == la


_CRASH_SCRIPT = textwrap.dedent("""
    import json, sys
    from hybridlm.training import TrainConfig, train
    train(TrainConfig(**json.loads(sys.argv[1])))
""")


def test_kill_during_checkpoint_write_then_resume(small_shards: Path, tiny_model_file: str, tmp_path: Path) -> None:
    run, ref = tmp_path / "run", tmp_path / "ref"
    cfg = dict(_tc(tiny_model_file, small_shards, run, save_every=2, eval_batches=0).to_dict())
    env = {**os.environ, "HYBRIDLM_TEST_CKPT_SLEEP": "0.4", "OMP_NUM_THREADS": "1"}  # the writer sleeps after every checkpoint file
    proc = subprocess.Popen([sys.executable, "-c", _CRASH_SCRIPT, json.dumps(cfg)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = run / "checkpoints"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            # kill once step 2 is complete and a later checkpoint is half written
            partial = [p for p in ckpts.glob(".tmp-step_*") if (p / WEIGHTS_NAME).is_file()] if ckpts.is_dir() else []
            if partial and (ckpts / "latest").is_file():
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    assert list(ckpts.glob(".tmp-step_*")), "the kill should have interrupted a checkpoint write"
    good = latest_checkpoint(run)
    assert good is not None and good.name in {"step_00000002", "step_00000004", "step_00000006"}
    assert load_checkpoint(good)["state"]["step"] == int(good.name[5:])
    load_model(good)  # the previous checkpoint is intact
    resumed = train(TrainConfig(**{**cfg, "resume": True}))
    assert resumed["step"] == 8 and not list(ckpts.glob(".tmp-*"))  # leftovers cleaned up
    straight = train(TrainConfig(**{**cfg, "out": str(ref)}))
    assert _losses(run) == _losses(ref) and resumed["train_loss"] == straight["train_loss"]


# ---------------------------------------------------------------------------- NaN guard


class _InfGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, g):
        return g * math.inf


def _inject(monkeypatch, bad_steps: set[int], kind: str) -> None:
    """Make the training loss (not the no-grad eval loss) non-finite on the given 1-based steps."""
    original = HybridLM.loss
    calls = {"n": 0}

    def loss(self, x, y):
        out = original(self, x, y)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in bad_steps:
                return out * math.nan if kind == "loss" else _InfGrad.apply(out)
        return out

    monkeypatch.setattr(HybridLM, "loss", loss)


def test_nan_guard_skips_bad_steps(small_shards: Path, tiny_model_file: str, tmp_path: Path, monkeypatch) -> None:
    _inject(monkeypatch, {3, 5}, "loss")
    _inject(monkeypatch, {6}, "grad")
    run = tmp_path / "run"
    summary = train(_tc(tiny_model_file, small_shards, run, save_every=0, eval_batches=1))
    skips = read_metrics(run, "skip")
    assert [s["step"] for s in skips] == [3, 5, 6] and summary["skipped_steps"] == 3
    assert "non-finite loss" in skips[0]["reason"] and "non-finite gradient norm" in skips[2]["reason"]
    assert sorted(_losses(run)) == [1, 2, 4, 7, 8]  # no train line for a skipped step
    assert all(math.isfinite(v) for v in _losses(run).values()) and math.isfinite(summary["val_loss"])
    assert all(torch.isfinite(t).all() for t in load_model(run / "final").state_dict().values())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # strict JSON: no NaN literals


def test_nan_guard_stops_after_max_bad_steps(small_shards: Path, tiny_model_file: str, tmp_path: Path,
                                             monkeypatch) -> None:
    _inject(monkeypatch, set(range(3, 100)), "loss")
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="3 consecutive steps") as info:
        train(_tc(tiny_model_file, small_shards, run, save_every=2, eval_batches=0, max_bad_steps=3))
    assert isinstance(info.value, RuntimeError) and info.value.step == 5
    assert info.value.checkpoint == run / "checkpoints" / "step_00000004" and "step_00000004" in str(info.value)
    assert [s["step"] for s in read_metrics(run, "skip")] == [3, 4, 5]
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002", "step_00000004"]
    # skipped steps change nothing: the checkpoint taken mid-streak holds the step-2 weights
    w2, w4 = (load_tensors(run / "checkpoints" / f"step_0000000{i}" / WEIGHTS_NAME) for i in (2, 4))
    assert all(torch.equal(w2[k], w4[k]) and torch.isfinite(w4[k]).all() for k in w2)


# --------------------------------------------------------------------------- checkpoints


def test_keep_last_prunes_old_checkpoints(small_shards: Path, tiny_model_file: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_tc(tiny_model_file, small_shards, run, steps=5, save_every=1, keep_last=2, eval_batches=0))
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000005"]
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000005"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000004", "step_00000005"]
    ck = load_checkpoint(latest_checkpoint(run))
    assert ck["state"]["step"] == 5 and set(ck["rng"]) >= {"torch", "numpy", "python"}
    assert json.loads((run / "checkpoints" / "step_00000005" / "config.json").read_text())["step"] == 5


# ---------------------------------------------------------------------------- bad inputs


def test_bad_data_inputs(tmp_path: Path, tiny_model_file: str) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        train(_tc(tiny_model_file, tmp_path / "missing", tmp_path / "r1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        train(_tc(tiny_model_file, empty, tmp_path / "r2"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match="UTF-8"):
        train(_tc(tiny_model_file, latin1, tmp_path / "r3"))


def test_bad_config_inputs(small_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="distributed"):
        TrainConfig(distributed="deepspeed")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        train(_tc("no-such-model", small_shards, tmp_path / "r"))
    with pytest.raises(ValueError, match="vocab"):  # data ids would not fit the embedding
        bad = tmp_path / "small_vocab.json"
        preset("tiny", vocab_size=512).save(bad)
        train(_tc(str(bad), small_shards, tmp_path / "r"))


def test_corrupt_checkpoints_on_resume(small_shards: Path, tiny_model_file: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(_tc(tiny_model_file, small_shards, run, steps=4, save_every=2, eval_batches=0))
    with pytest.raises(ValueError, match="resume"):  # never silently overwrite a run
        train(_tc(tiny_model_file, small_shards, run, steps=4, eval_batches=0))
    latest = latest_checkpoint(run)
    resume = _tc(tiny_model_file, small_shards, run, steps=6, eval_batches=0, resume=True)

    weights = latest / WEIGHTS_NAME
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"step_00000004.{WEIGHTS_NAME}") as info:
        train(resume)
    assert "to resume from step_00000002 instead, delete" in str(info.value)
    weights.write_bytes(good)

    opt = latest / OPTIMIZER_NAME
    good_opt = opt.read_bytes()
    opt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"step_00000004.{OPTIMIZER_NAME}"):
        train(resume)
    opt.write_bytes(good_opt)

    (latest / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="trainer_state.json is missing"):
        train(resume)

    (run / "checkpoints" / "latest").write_text("step_00000099\n")
    with pytest.raises(ValueError, match="step_00000099"):
        train(resume)

    other = tmp_path / "other.json"
    preset("tiny", d_model=32, pattern="M-", ffn_dim=64, ssm_state=8, mamba_head_dim=8, n_heads=2,
           head_dim=16, n_kv_heads=1, n_groups=1).save(other)
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    with pytest.raises(ValueError, match="different model config"):
        train(_tc(str(other), small_shards, run, steps=6, eval_batches=0, resume=True))
    assert train(resume)["step"] == 6  # the previous good checkpoint still resumes


def test_resume_without_checkpoint_starts_fresh(small_shards: Path, tiny_model_file: str, tmp_path: Path) -> None:
    summary = train(_tc(tiny_model_file, small_shards, tmp_path / "run", steps=2, eval_batches=0, resume=True))
    assert summary["step"] == 2 and latest_checkpoint(tmp_path / "run").name == "step_00000002"
