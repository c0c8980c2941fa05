"""RMSNorm and the grouped, gated RMSNorm used inside the Mamba-2 mixer.

Both normalise in float32 and multiply by the weight in float32 before casting back,
as the Nemotron-H reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim, computed in float32."""
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return (self.weight.float() * rms_normalize(x, self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class GatedRMSNorm(nn.Module):
    """y = weight * rmsnorm_per_group(x * silu(z)); groups of `group_size` channels (norm after gate)."""

    def __init__(self, dim: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        if dim % group_size:
            raise ValueError(f"GatedRMSNorm: dim {dim} is not a multiple of group_size {group_size}")
        self.weight = nn.Parameter(torch.ones(dim))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        h = x.float() * F.silu(z.float())
        shape = h.shape
        h = rms_normalize(h.view(*shape[:-1], -1, self.group_size), self.eps).view(shape)
        return self.weight * h.to(x.dtype)
