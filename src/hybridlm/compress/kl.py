"""The distillation loss: forward KL between teacher and student next-token distributions.

Also the measure of how much a pruned or layer-skipped model differs from the original
(importance, calibration KL), so it stands apart from the distillation training run.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over tokens of T^2 * KL(softmax(teacher / T) || softmax(student / T)); logits (..., vocab)."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1)  # (...,) = sum_v p_t (log p_t - log p_s)
    return kl.mean() * temperature ** 2
