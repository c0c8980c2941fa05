"""Knowledge distillation of a (pruned) student from a teacher: forward KL on the logits.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

averaged over tokens (T = temperature; the T^2 keeps the gradient scale independent of
T, Hinton et al.). It runs through :func:`hybridlm.training.loop.train` as its `objective`, so
distillation has the training loop's progress bar, metrics, checkpoints, ``--resume``
and DDP / FSDP2. The run directory also holds ``distill_config.json`` (teacher path,
temperature, alpha); the teacher is reloaded on every invocation and a resume with a
different teacher or loss is refused. Validation reports the student's plain LM loss.

Where the frozen teacher lives under torchrun (``teacher_sharding``; either works with DDP
and FSDP2 students, and a resume may switch):

* ``replicated`` (default): every rank holds the whole teacher on its device and runs it on
  its own micro-batch; no communication, teacher memory paid on every rank.
* ``fsdp``: ``fully_shard`` on the teacher's blocks and root over all ranks, with no
  optimizer: each rank keeps 1/N of the teacher and the forward all-gathers one block at a
  time (resharded right after), for teachers too big to replicate next to the student.
  Without a process group it is the replicated teacher.

The teacher computes in the student's precision: under autocast (one process, DDP) it runs
inside the same autocast; under FSDP2 bf16 mixed precision (no autocast) a replicated teacher
is cast to bf16 and a sharded one all-gathers its parameters in bf16. Every rank loads the
whole teacher checkpoint into CPU memory first.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import read_json
from ..interop.checkpoint import load_model
from ..interop.files import atomic_write_text
from ..model.lm import HybridLM
from ..training.inputs import resolve_model_config
from ..training.loop import train
from ..training.train_config import TrainConfig
from .kl import kd_loss

DISTILL_FILE = "distill_config.json"
TEACHER_SHARDING = ("replicated", "fsdp")


@dataclass
class DistillConfig:
    """The distillation loss (one CLI flag per field)."""

    teacher: str = ""  # teacher checkpoint directory (same vocabulary as the student)
    temperature: float = 1.0  # softmax temperature T of both logit sets (the KL is scaled by T^2)
    alpha: float = 1.0  # weight of the KL term; 1 - alpha weighs the LM cross-entropy (1 = pure distillation)
    teacher_sharding: str = "replicated"  # replicated (every rank holds the whole frozen teacher) | fsdp (fully_shard it over the ranks: 1/N of its memory each)

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ValueError("DistillConfig: teacher (a checkpoint directory) is required")
        if not self.temperature > 0:
            raise ValueError(f"DistillConfig: temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"DistillConfig: alpha must be in [0, 1], got {self.alpha}")
        if self.teacher_sharding not in TEACHER_SHARDING:
            raise ValueError(f"DistillConfig: teacher_sharding must be one of {TEACHER_SHARDING}, "
                             f"got {self.teacher_sharding!r}")


class DistillObjective:
    """`objective(student, x, y, seq_idx) -> loss` for `hybridlm.training.loop.train`; the frozen
    teacher follows the student's device. Teacher and student both see the document
    boundaries `seq_idx` (None: one stream per row)."""

    def __init__(self, teacher: HybridLM, temperature: float = 1.0, alpha: float = 1.0,
                 teacher_sharding: str = "replicated") -> None:
        if teacher_sharding not in TEACHER_SHARDING:
            raise ValueError(f"teacher_sharding must be one of {TEACHER_SHARDING}, got {teacher_sharding!r}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha, self.teacher_sharding = temperature, alpha, teacher_sharding
        self._placed: tuple[torch.device, torch.dtype] | None = None

    def _place_teacher(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move (replicated) or shard (fsdp) the teacher on `device`, computing in `dtype` (see the module doc)."""
        if self._placed is not None:
            if self._placed != (device, dtype):
                raise ValueError(f"the teacher was placed for {self._placed}, now called with {(device, dtype)}")
            return
        import torch.distributed as dist
        param_dtype = None if torch.is_autocast_enabled(device.type) or dtype == torch.float32 else dtype
        self.teacher.to(device)
        if self.teacher_sharding == "fsdp" and dist.is_available() and dist.is_initialized():
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mesh = init_device_mesh(device.type, (dist.get_world_size(),))
            mp = MixedPrecisionPolicy(param_dtype=param_dtype)
            for block in self.teacher.backbone.layers:
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(self.teacher, mesh=mesh, mp_policy=mp)
        elif param_dtype is not None:
            self.teacher.to(param_dtype)
        self._placed = (device, dtype)

    def __call__(self, student: nn.Module, x: Tensor, y: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        s_logits = student(x, seq_idx=seq_idx)  # first: its dtype is the one the teacher computes in
        self._place_teacher(x.device, s_logits.dtype)
        with torch.no_grad():
            t_logits = self.teacher(x, seq_idx=seq_idx)
        loss = self.alpha * kd_loss(s_logits, t_logits, self.temperature)
        if self.alpha < 1:
            ce = F.cross_entropy(s_logits.float().flatten(0, 1), y.flatten())
            loss = loss + (1 - self.alpha) * ce
        return loss


def load_teacher(path: str, student_vocab: int) -> HybridLM:
    teacher = load_model(path)
    if teacher.cfg.vocab_size != student_vocab:
        raise ValueError(f"teacher {path} has vocab_size {teacher.cfg.vocab_size} but the student "
                         f"{student_vocab}: distillation compares logits token by token")
    return teacher


def _record(tc: TrainConfig, dc: DistillConfig) -> None:
    """Write OUT/distill_config.json; on resume refuse a different teacher / loss than the run used."""
    path = Path(tc.out) / DISTILL_FILE
    now = {**dataclasses.asdict(dc), "teacher": str(Path(dc.teacher).resolve())}
    if tc.resume and path.is_file():
        before = read_json(path)
        changed = sorted(k for k in now if before.get(k) != now[k] and k != "teacher_sharding")  # (placement only)
        if changed:
            raise ValueError(f"{path} records a different {', '.join(changed)} ({ {k: before.get(k) for k in changed} }); "
                             "resume with the same --teacher/--temperature/--alpha, or choose another --out")
    atomic_write_text(path, json.dumps(now, indent=2) + "\n")


def distill(tc: TrainConfig, dc: DistillConfig) -> dict[str, Any]:
    """Distill `dc.teacher` into the student `tc.model` (usually a pruned checkpoint, with
    `tc.init_from` = the same directory so training starts from its weights); `train`'s summary."""
    teacher = load_teacher(dc.teacher, resolve_model_config(tc.model).vocab_size)
    Path(tc.out).mkdir(parents=True, exist_ok=True)
    _record(tc, dc)
    return train(tc, objective=DistillObjective(teacher, dc.temperature, dc.alpha, dc.teacher_sharding))
