"""Stopping a diverged run (Rybakov et al. 2024): a loss that explodes, or keeps coming out non-finite.

Two rules, both ending the run with `TrainingDiverged` and a ``diverged`` metrics record
while the checkpoints stay untouched:

* with ``diverge_factor`` k > 0: a non-finite loss, or one above k times the running
  minimum of the finite losses, stops at once (`divergence_reason`);
* always: ``max_bad_steps`` consecutive steps with a non-finite loss or gradient norm
  (each such step is skipped without an update, and logged as ``skip``).
"""

from __future__ import annotations

import math
from pathlib import Path


class TrainingDiverged(RuntimeError):
    """`max_bad_steps` consecutive steps had a non-finite loss or gradient norm, or (with
    `diverge_factor` > 0) the loss became non-finite or exceeded that factor times its running minimum."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


def divergence_reason(loss: float, min_loss: float | None, factor: float) -> str | None:
    """Why `loss` marks the run as diverged (non-finite, or > factor x running minimum), else None.

    factor 0 disables the check (non-finite steps are then handled by `max_bad_steps`).
    """
    if not factor:
        return None
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if min_loss is not None and min_loss > 0 and loss > factor * min_loss:
        return f"loss {loss:.4g} > {factor:g} x its running minimum {min_loss:.4g}"
    return None


def nonfinite_reason(loss: float, grad_norm: float) -> str | None:
    """Why a step must be skipped (a non-finite loss or gradient norm), else None."""
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if not math.isfinite(grad_norm):
        return f"non-finite gradient norm ({grad_norm})"
    return None
