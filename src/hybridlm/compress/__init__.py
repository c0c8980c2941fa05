"""Compression (Minitron / MiniPuzzle): importance, pruning, distillation, and the memory planner.

    importance.py  activation scores of channels, neurons, heads; layer-drop loss / KL
    pruning.py     `PruneSpec`, `prune_model`: keep the most important units in every tensor
    search.py      which shape to prune to for a parameter budget
    pipeline.py    `prune`: a checkpoint + calibration data -> a written student
    kl.py          the forward-KL distillation loss
    distill.py     `distill`: KD of the student from the teacher with the training loop
    planner.py     inference memory plan (weights, KV cache, Mamba state, activations), fitting shapes
"""

from .distill import DistillConfig, distill
from .importance import Importance, compute_importance
from .pipeline import PruneConfig, PruneResult, prune
from .pruning import PruneSpec, prune_model

__all__ = ["DistillConfig", "Importance", "PruneConfig", "PruneResult", "PruneSpec", "compute_importance",
           "distill", "prune", "prune_model"]
