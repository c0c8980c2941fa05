"""Optimizer and learning-rate schedules for training.

* :func:`param_groups` / :func:`build_optimizer` - decoupled AdamW with weight decay on
  every parameter of two or more dimensions (linear and conv weights, the embedding
  table, an untied lm_head) and none on 1-D parameters (RMSNorm weights, biases and the
  Mamba-2 ``A_log`` / ``D`` / ``dt_bias``, which are per-head scalars that decay would
  pull toward meaningless values).
* :func:`lr_at` - the learning rate for a step: linear warmup, then ``cosine`` (to
  ``min_lr`` at the last step), ``wsd`` (warmup-stable-decay: constant, then a linear
  decay to ``min_lr`` over the last ``decay_frac`` of the steps) or ``constant``.

The schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

SCHEDULES = ("cosine", "wsd", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: ``decay`` (params with dim >= 2) and ``no_decay`` (1-D params)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():  # parameters() already skips tied duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`: fused kernels for plain CUDA parameters, else foreach."""
    groups = param_groups(model, weight_decay)
    if fused is None:
        first = next(iter(model.parameters()))
        fused = first.device.type == "cuda" and type(first) is nn.Parameter  # not for FSDP2 DTensors
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True if fused else None,
                             foreach=None if fused else True)


def lr_at(step: int, *, lr: float, min_lr: float, steps: int, warmup_steps: int = 0,
          schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    """Learning rate for the optimizer step with 0-based index ``step`` of ``steps``.

    Warmup: ``lr * (step + 1) / warmup_steps`` for the first ``warmup_steps`` steps.
    After it, ``cosine`` anneals from ``lr`` to ``min_lr`` (reached at step ``steps - 1``);
    ``wsd`` holds ``lr`` and decays linearly to ``min_lr`` over the last
    ``max(1, round(decay_frac * steps))`` steps (reaching it at the last step);
    ``constant`` holds ``lr``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {SCHEDULES}")
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule == "cosine":
        span = steps - warmup_steps - 1
        t = min(1.0, (step - warmup_steps) / span) if span > 0 else 1.0
        return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))
    n_decay = max(1, round(decay_frac * steps))
    start = steps - n_decay
    if step < start:
        return lr
    t = min(1.0, (step - start + 1) / n_decay)
    return lr + (min_lr - lr) * t


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Global L2 gradient norm (a plain tensor, also for FSDP2 DTensor gradients), measured
    before clipping; when ``max_norm > 0`` the gradients are scaled so their norm is at most it."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
