"""`project(linear, x)`: a linear layer that compiles well for a single row; `local(t)`: a
parameter's own shard under tensor parallelism.

Under `torch.compile` on CPU, a projection of one row is written as a multiply-sum,
``(x * W).sum(-1)``, which inductor fuses into one pass over W and splits over the output
rows across threads; MKL's one-row GEMV (what `F.linear` calls) does not use a second
thread. Everywhere else (eager, more rows, CUDA, low-precision layers) it is `linear(x)`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def project(linear: nn.Module, x: Tensor) -> Tensor:
    """linear(x) for x (..., in_features)."""
    if (torch.compiler.is_compiling() and type(linear) is nn.Linear and x.device.type == "cpu"
            and x.numel() == x.shape[-1]):  # one row in all
        y = (x[..., None, :] * linear.weight).sum(-1)
        return y if linear.bias is None else y + linear.bias
    return linear(x)


def local(t: Tensor | None) -> Tensor | None:
    """The process's shard of a DTensor parameter (tensor parallelism: the layer computes on its own
    heads, differentiably), else `t` itself. Duck-typed, so plain runs never import DTensor."""
    to_local = getattr(t, "to_local", None)
    return t if to_local is None else to_local()
