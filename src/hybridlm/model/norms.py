"""RMSNorm, LayerNorm and the grouped, gated RMSNorm used inside the Mamba-2 mixer.

All normalise in float32 (a float64 model in float64) and multiply by the weight in
that precision before casting back, as the Nemotron-H reference does (Megatron-LM and
mamba_ssm's fused gated-norm kernel, which transformers also calls on CUDA).
transformers' pure-PyTorch gated norm casts back first and multiplies after; in
float32 the two agree exactly, in bfloat16 they differ by one rounding. `make_norm`
builds the optional training-stability norms (QK, QKV, post-Proj, post-FC2,
post-out_proj) from their config kind.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .rowwise import local


def wide(t: Tensor) -> Tensor:
    """t in at least float32 (float64 stays float64, so a float64 model is exact to float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x / rms(x) over the last dim, computed in (at least) float32."""
    xf = wide(x)
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return (wide(self.weight) * rms_normalize(x, self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """y = weight * (x - mean) / sqrt(var + eps) + bias over the last dim, in float32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(wide(x), self.weight.shape, wide(self.weight), wide(self.bias), self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float) -> nn.Module | None:
    """The norm a stability option names: "rmsnorm", "layernorm", or None for "none"."""
    if kind == "none":
        return None
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps)
    raise ValueError(f"unknown norm kind {kind!r}; choose none, rmsnorm or layernorm")


def maybe_norm(norm: nn.Module | None, x: Tensor) -> Tensor:
    """`norm(x)`, or x unchanged when the option is off (norm is None)."""
    return x if norm is None else norm(x)


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
        h = wide(x) * F.silu(wide(z))
        shape = h.shape
        h = rms_normalize(h.view(*shape[:-1], -1, self.group_size), self.eps).view(shape)
        return (wide(local(self.weight)) * h).to(x.dtype)
