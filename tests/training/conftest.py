"""Runs shared by the tensor-parallel and DCP-resume tests (each is a few torchrun launches: run them once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hybridlm.config import HybridConfig

from helpers import TP_MICRO, TP_MODEL, run_train_actions, torchrun_actions, tp_train_config


@pytest.fixture(scope="session")
def tp_model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tp_model") / "tp.json"
    HybridConfig(**TP_MODEL).save(path)
    return str(path)


@pytest.fixture(scope="session")
def tp_runs(small_shards: Path, tp_model_file: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``ref``: one process; ``tp_fsdp``: 4 processes, TP=2 x FSDP2=2 (dp = 2), the same 4 steps and global
    batch; ``same_mesh``: ``tp_fsdp`` resumed from its step-2 checkpoint on the same mesh, its state right
    after the resume in ``same_mesh.pt``."""
    root = tmp_path_factory.mktemp("tp_runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the torchrun workers (OMP_NUM_THREADS=1)
    try:
        run_train_actions([{"train": tp_train_config(tp_model_file, small_shards, root / "ref")}])
    finally:
        torch.set_num_threads(threads)
    mesh = dict(batch_size=TP_MICRO, tp=2, distributed="fsdp2")
    torchrun_actions([{"train": tp_train_config(tp_model_file, small_shards, root / "tp_fsdp", **mesh)},
                      {"truncate": [str(root / "tp_fsdp"), str(root / "same_mesh"), 2]},
                      {"train": tp_train_config(tp_model_file, small_shards, root / "same_mesh", resume=True, **mesh),
                       "dump": str(root / "same_mesh.pt")}], root, nproc=4)
    return {name: root / name for name in ("ref", "tp_fsdp", "same_mesh")}
