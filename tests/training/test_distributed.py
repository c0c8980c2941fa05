"""Two CPU processes (torchrun, gloo) reproduce single-process training: DDP, FSDP2 and FSDP2 resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hybridlm.interop.checkpoint import WEIGHTS_NAME
from hybridlm.interop.files import load_tensors
from hybridlm.training.checkpoints import latest_checkpoint, load_checkpoint
from hybridlm.training.loop import train
from hybridlm.training.metrics import read_metrics
from hybridlm.training.train_config import TrainConfig

from helpers import torchrun_train

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
MICRO = 2  # per-rank batch; the single-process reference uses WORLD * MICRO
TOL = 1e-5

def _cfg(model: str, data: Path, out: Path, **kw) -> dict:
    base = dict(model=model, data=str(data), out=str(out), steps=4, batch_size=WORLD * MICRO, seq_len=32, lr=3e-3,
                min_lr=3e-4, warmup_steps=1, eval_every=2, eval_batches=2, save_every=2, keep_last=0, log_every=1,
                progress=False, device="cpu", distributed="none")
    return {**base, **kw}


@pytest.fixture(scope="module")
def runs(small_shards: Path, tiny_model_file: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the torchrun workers (OMP_NUM_THREADS=1)
    ref_ddp = _cfg(tiny_model_file, small_shards, root / "ref_ddp")
    ref_fsdp = _cfg(tiny_model_file, small_shards, root / "ref_fsdp", grad_accum=2)
    try:
        for cfg in (ref_ddp, ref_fsdp):
            train(TrainConfig(**cfg))
    finally:
        torch.set_num_threads(threads)
    # an FSDP2 run that resumes the single-process checkpoint at step 2
    shutil.copytree(root / "ref_fsdp", root / "fsdp2_resume")
    shutil.rmtree(root / "fsdp2_resume" / "checkpoints" / "step_00000004")
    (root / "fsdp2_resume" / "checkpoints" / "latest").write_text("step_00000002\n")
    multi = [{**ref_ddp, "out": str(root / "ddp"), "batch_size": MICRO, "distributed": "ddp"},
             {**ref_fsdp, "out": str(root / "fsdp2"), "batch_size": MICRO, "distributed": "fsdp2"},
             {**ref_fsdp, "out": str(root / "fsdp2_resume"), "batch_size": MICRO, "distributed": "fsdp2",
              "resume": True}]
    torchrun_train(multi, root, nproc=WORLD)  # one process group for the three runs
    return {name: root / name for name in ("ref_ddp", "ref_fsdp", "ddp", "fsdp2", "fsdp2_resume")}


def _metric(run: Path, kind: str, key: str) -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run, kind)}


def _assert_close(a: dict[int, float], b: dict[int, float]) -> None:
    assert list(a) == list(b)
    assert all(abs(a[s] - b[s]) <= TOL for s in a), {s: (a[s], b[s]) for s in a}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(latest_checkpoint(run) / WEIGHTS_NAME)


def test_ddp_matches_single_process(runs: dict[str, Path]) -> None:
    losses = _metric(runs["ddp"], "train", "loss")
    assert list(losses) == [1, 2, 3, 4]
    _assert_close(losses, _metric(runs["ref_ddp"], "train", "loss"))
    _assert_close(_metric(runs["ddp"], "train", "grad_norm"), _metric(runs["ref_ddp"], "train", "grad_norm"))
    _assert_close(_metric(runs["ddp"], "val", "val_loss"), _metric(runs["ref_ddp"], "val", "val_loss"))
    # same global batch -> same token count; rank 0 wrote the checkpoints
    assert _metric(runs["ddp"], "train", "tokens") == _metric(runs["ref_ddp"], "train", "tokens")
    state = load_checkpoint(latest_checkpoint(runs["ddp"]))["state"]
    assert state["world_size"] == WORLD and state["step"] == 4
    wd, wr = _weights(runs["ddp"]), _weights(runs["ref_ddp"])
    assert all(torch.allclose(wd[k], wr[k], atol=TOL, rtol=0) for k in wr)


def test_fsdp2_matches_single_process(runs: dict[str, Path]) -> None:
    """FSDP2 (fully_shard per block, then the root) on CPU/gloo, with gradient accumulation."""
    _assert_close(_metric(runs["fsdp2"], "train", "loss"), _metric(runs["ref_fsdp"], "train", "loss"))
    _assert_close(_metric(runs["fsdp2"], "val", "val_loss"), _metric(runs["ref_fsdp"], "val", "val_loss"))
    # the gathered full state dicts (model and optimizer) match the unsharded run
    wf, wr = _weights(runs["fsdp2"]), _weights(runs["ref_fsdp"])
    assert set(wf) == set(wr) and all(torch.allclose(wf[k], wr[k], atol=TOL, rtol=0) for k in wr)
    of = load_checkpoint(latest_checkpoint(runs["fsdp2"]))["optimizer"]["state"]
    orf = load_checkpoint(latest_checkpoint(runs["ref_fsdp"]))["optimizer"]["state"]
    assert set(of) == set(orf)
    assert all(torch.allclose(of[k]["exp_avg"], orf[k]["exp_avg"], atol=TOL, rtol=0) for k in orf)


def test_fsdp2_resumes_a_single_process_checkpoint(runs: dict[str, Path]) -> None:
    resumed = _metric(runs["fsdp2_resume"], "train", "loss")
    assert list(resumed) == [1, 2, 3, 4]  # steps 1-2 kept from the copied run, 3-4 trained under FSDP2
    _assert_close(resumed, _metric(runs["ref_fsdp"], "train", "loss"))
    wf, wr = _weights(runs["fsdp2_resume"]), _weights(runs["ref_fsdp"])
    assert all(torch.allclose(wf[k], wr[k], atol=TOL, rtol=0) for k in wr)
