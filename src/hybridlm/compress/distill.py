"""Knowledge distillation of a (pruned) student from a teacher: forward KL on the logits.

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, y)

averaged over tokens (T = temperature; the T^2 keeps the gradient scale independent of
T, Hinton et al.). It runs through :func:`hybridlm.training.loop.train` as its `objective`, so
distillation has the training loop's progress bar, metrics, checkpoints, ``--resume``
and DDP. The run directory also holds ``distill_config.json`` (teacher path,
temperature, alpha); the teacher is reloaded on every invocation and a resume with a
different teacher or loss is refused. Validation reports the student's plain LM loss.
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


@dataclass
class DistillConfig:
    """The distillation loss (one CLI flag per field)."""

    teacher: str = ""  # teacher checkpoint directory (same vocabulary as the student)
    temperature: float = 1.0  # softmax temperature T of both logit sets (the KL is scaled by T^2)
    alpha: float = 1.0  # weight of the KL term; 1 - alpha weighs the LM cross-entropy (1 = pure distillation)

    def __post_init__(self) -> None:
        if not self.teacher:
            raise ValueError("DistillConfig: teacher (a checkpoint directory) is required")
        if not self.temperature > 0:
            raise ValueError(f"DistillConfig: temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"DistillConfig: alpha must be in [0, 1], got {self.alpha}")


class DistillObjective:
    """`objective(student, x, y) -> loss` for `hybridlm.training.loop.train`; the frozen teacher follows the student's device."""

    def __init__(self, teacher: HybridLM, temperature: float = 1.0, alpha: float = 1.0) -> None:
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, student: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        if self.teacher.lm_head.weight.device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            t_logits = self.teacher(x)
        s_logits = student(x)
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
        changed = sorted(k for k in now if before.get(k) != now[k])
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
    return train(tc, objective=DistillObjective(teacher, dc.temperature, dc.alpha))
