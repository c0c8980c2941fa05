"""Sharded DCP checkpoints survive a change of layout: a 4-process TP=2 x FSDP2=2 run checkpointed at
step 2 of 4 resumes on the same mesh, on 1 process, on 2 (FSDP2) and on 2 (TP=2) processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import WEIGHTS_NAME, save_model
from hybridlm.interop.files import load_tensors
from hybridlm.model import HybridLM
from hybridlm.training.checkpoints import latest_checkpoint, list_checkpoints, load_checkpoint
from hybridlm.training.dcp_checkpoint import DCP_DIR, load_dcp
from hybridlm.training.loop import train
from hybridlm.training.metrics import read_metrics
from hybridlm.training.optim import build_optimizer
from hybridlm.training.train_config import TrainConfig

from helpers import TP_MICRO, TP_MODEL, run_train_actions, torchrun_actions, tp_train_config, truncate_run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                 reason="torch.distributed with the gloo backend is not available")]
TOL = 1e-5
STEP2 = Path("checkpoints") / "step_00000002"


@pytest.fixture(scope="module")
def resumed(tp_runs: dict[str, Path], small_shards: Path, tp_model_file: str,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The TP x FSDP2 run's step-2 checkpoint resumed on 1 process and on 2 (FSDP2; TP=2), each with its
    state right after the resume in ``<name>.pt``."""
    root = tmp_path_factory.mktemp("dcp_resume")
    src = tp_runs["tp_fsdp"]

    def action(name: str, **kw) -> dict:
        return {"train": tp_train_config(tp_model_file, small_shards, root / name, resume=True, **kw),
                "dump": str(root / f"{name}.pt")}
    for name in ("one", "fsdp2", "tp2"):
        truncate_run(src, root / name, 2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_train_actions([action("one")])  # one process, no process group
    finally:
        torch.set_num_threads(threads)
    torchrun_actions([action("fsdp2", batch_size=TP_MICRO, distributed="fsdp2"),
                      action("tp2", tp=2, distributed="fsdp2")], root, nproc=2)
    return {"same_mesh": tp_runs["same_mesh"], **{name: root / name for name in ("one", "fsdp2", "tp2")}}


def test_checkpoint_holds_dcp_shards_and_gathered_weights(tp_runs: dict[str, Path]) -> None:
    ckpt = tp_runs["tp_fsdp"] / STEP2
    shards = sorted(p.name for p in (ckpt / DCP_DIR).glob("*.distcp"))
    assert len(shards) == 4 and (ckpt / DCP_DIR / ".metadata").is_file()  # every rank wrote its shards
    assert not (ckpt / "optimizer.pt").exists()
    full = load_checkpoint(ckpt)  # consolidated in this process, canonical names
    ref = load_checkpoint(tp_runs["ref"] / STEP2)
    assert set(full["model"]) == set(ref["model"]) and set(full["optimizer"]["state"]) == set(ref["optimizer"]["state"])
    assert all(torch.allclose(full["model"][k], ref["model"][k], atol=TOL, rtol=0) for k in ref["model"])


@pytest.mark.parametrize("name", ["same_mesh", "one", "fsdp2", "tp2"])
def test_resume_loads_the_saved_state_bit_exactly(resumed: dict[str, Path], tp_runs: dict[str, Path],
                                                  name: str) -> None:
    saved = load_checkpoint(tp_runs["tp_fsdp"] / STEP2)
    loaded = torch.load(resumed[name].with_suffix(".pt"), weights_only=False)
    assert set(loaded["model"]) == set(saved["model"])
    assert all(torch.equal(loaded["model"][k], saved["model"][k]) for k in saved["model"])
    state, saved_state = loaded["optimizer"]["state"], saved["optimizer"]["state"]
    assert set(state) == set(saved_state)
    for k, s in saved_state.items():
        assert all(torch.equal(state[k][m], s[m]) for m in ("step", "exp_avg", "exp_avg_sq")), k


@pytest.mark.parametrize("name", ["same_mesh", "one", "fsdp2", "tp2"])
def test_resumed_run_reaches_the_uninterrupted_weights(resumed: dict[str, Path], tp_runs: dict[str, Path],
                                                       name: str) -> None:
    """Bit-exact on the same mesh (the same arithmetic); within 1e-5 (float32) on another layout."""
    run, full = resumed[name], tp_runs["tp_fsdp"]
    losses = {r["step"]: r["loss"] for r in read_metrics(run, "train")}
    want = {r["step"]: r["loss"] for r in read_metrics(full, "train")}
    assert list(losses) == [1, 2, 3, 4]  # steps 1-2 kept from the copied run, 3-4 trained after the resume
    w, wf = load_tensors(run / "final" / WEIGHTS_NAME), load_tensors(full / "final" / WEIGHTS_NAME)
    assert set(w) == set(wf)
    if name == "same_mesh":
        assert losses == want and all(torch.equal(w[k], wf[k]) for k in wf)
    else:
        assert all(abs(losses[s] - want[s]) <= TOL for s in want), (losses, want)
        assert all(torch.allclose(w[k], wf[k], atol=TOL, rtol=0) for k in wf)
    assert load_checkpoint(latest_checkpoint(run), tensors=False)["state"]["step"] == 4


def test_incompatible_checkpoint_is_refused_before_any_step(tp_runs: dict[str, Path], small_shards: Path,
                                                            tmp_path: Path) -> None:
    other_cfg = HybridConfig(**{**TP_MODEL, "d_model": 32, "mamba_heads": 4})
    other_file = tmp_path / "other.json"
    other_cfg.save(other_file)
    ckpt_dcp = tp_runs["tp_fsdp"] / STEP2 / DCP_DIR
    model = HybridLM(other_cfg)
    with pytest.raises(ValueError, match=r"does not fit this model.*backbone.embeddings.weight: saved \(4096, 64\), "
                                         r"model \(4096, 32\)"):
        load_dcp(model, build_optimizer(model, 1e-3, 0.1), ckpt_dcp)
    run = tmp_path / "run"
    truncate_run(tp_runs["tp_fsdp"], run, 2)
    with pytest.raises(ValueError, match="different model config"):  # resume: the config is compared first
        train(TrainConfig(**tp_train_config(str(other_file), small_shards, run, resume=True)))
    save_model(model, run / STEP2)  # config.json + weights of another model over the DCP shards: their shapes tell
    metrics = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match="does not fit this model"):
        train(TrainConfig(**tp_train_config(str(other_file), small_shards, run, resume=True)))
    assert (run / "metrics.jsonl").read_bytes() == metrics  # no step was taken, nothing written
    assert list_checkpoints(run) == [run / STEP2] and not (run / "final").exists()
