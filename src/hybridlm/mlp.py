"""The MLP layer of the hybrid stack: up-projection, squared ReLU, down-projection (no gate)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import HybridConfig


def relu2(x: Tensor) -> Tensor:
    return torch.relu(x).square()


class MLP(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(relu2(self.up_proj(x)))
