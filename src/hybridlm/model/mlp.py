"""The MLP layer of the hybrid stack: up-projection, squared ReLU, down-projection (no gate).

Optional (`post_fc2_norm`, off by default): a norm after the down projection.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import HybridConfig
from .norms import make_norm, maybe_norm
from .rowwise import project


def relu2(x: Tensor) -> Tensor:
    return torch.relu(x).square()


class MLP(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.mlp_bias)
        self.post_fc2_norm = make_norm(cfg.post_fc2_norm, cfg.d_model, cfg.norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return maybe_norm(self.post_fc2_norm, project(self.down_proj, relu2(project(self.up_proj, x))))
