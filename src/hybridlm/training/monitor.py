"""Output-norm monitoring (Rybakov et al. 2024): growth of linear-layer outputs precedes divergence.

`OutputMonitor` hooks every `nn.Linear` of a model (subclasses included) and every
attention layer for the duration of a ``with`` block, accumulating the root mean square
of each linear layer's output over all tokens seen and the largest raw attention logit
(q . k / sqrt(head_dim), before any capping) of each attention layer::

    with OutputMonitor(model) as mon:
        model.loss(x, y)
    mon.layer_rms()   # {"backbone.layers.3.mixer.q_proj": 0.41, ...}
    mon.summary()     # flat record for metrics.jsonl: "rms/QKV", "rms/FC2", "attn_logit_max", ...

Layers are grouped by type as in the paper: QKV (q/k/v_proj), Proj (o_proj), FC1
(up_proj), FC2 (down_proj), and the Mamba-2 in_proj / out_proj, plus lm_head. RMS is the
per-element norm, ``||y||_2 / sqrt(numel)``; a token's L2 norm is about RMS * sqrt(width).
Outside the ``with`` block nothing is hooked and attention keeps its fused SDPA path.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..model.attention import Attention

LINEAR_GROUPS = {"q_proj": "QKV", "k_proj": "QKV", "v_proj": "QKV", "o_proj": "Proj", "up_proj": "FC1",
                 "down_proj": "FC2", "in_proj": "in_proj", "out_proj": "out_proj", "lm_head": "lm_head"}
GROUPS = ("QKV", "Proj", "FC1", "FC2", "in_proj", "out_proj", "lm_head", "other")


def layer_group(name: str) -> str:
    """The layer type of a linear module from its qualified name ("...mixer.q_proj" -> "QKV")."""
    return LINEAR_GROUPS.get(name.rsplit(".", 1)[-1], "other")


class OutputMonitor:
    """Context manager recording linear-output RMS and attention-logit maxima of `model`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._handles: list[Any] = []
        self._attention: list[Attention] = []
        self._sq: dict[str, Tensor] = {}      # sum of squares of each linear output
        self._count: dict[str, int] = {}      # elements summed
        self._logit: dict[str, Tensor] = {}   # largest raw attention logit per attention layer

    def __enter__(self) -> "OutputMonitor":
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_hook(partial(self._linear_hook, name)))
            elif isinstance(module, Attention):
                module.record_logits = True
                self._attention.append(module)
                self._handles.append(module.register_forward_hook(partial(self._attention_hook, name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        for module in self._attention:
            module.record_logits, module.last_logit_max = False, None
        self._handles, self._attention = [], []

    def _linear_hook(self, name: str, module: nn.Module, inputs: Any, output: Tensor) -> None:
        sq = output.detach().float().pow(2).sum()
        self._sq[name] = self._sq[name] + sq if name in self._sq else sq
        self._count[name] = self._count.get(name, 0) + output.numel()

    def _attention_hook(self, name: str, module: Attention, inputs: Any, output: Tensor) -> None:
        m = module.last_logit_max
        if m is not None:
            self._logit[name] = torch.maximum(self._logit[name], m) if name in self._logit else m

    # ---- results -----------------------------------------------------------
    def layer_rms(self) -> dict[str, float]:
        """RMS of every hooked linear layer's output over everything it produced, by module name."""
        if not self._sq:
            return {}
        names = list(self._sq)
        sums = torch.stack([self._sq[n] for n in names]).tolist()  # one device sync
        return {n: math.sqrt(s / max(self._count[n], 1)) for n, s in zip(names, sums)}

    def logit_max(self) -> dict[str, float]:
        """Largest raw attention logit seen by each attention layer, by module name."""
        return {n: float(v) for n, v in self._logit.items()}

    def summary(self) -> dict[str, float]:
        """A flat record: ``rms/<group>`` (largest layer RMS of each type), ``layer_rms/<layer>``,
        ``attn_logit_max`` (over all attention layers) and ``attn_logit_max/<layer>``."""
        per_layer, logits = self.layer_rms(), self.logit_max()
        out: dict[str, float] = {}
        for group in GROUPS:
            values = [v for n, v in per_layer.items() if layer_group(n) == group]
            if values:
                out[f"rms/{group}"] = max(values)
        out.update({f"layer_rms/{n}": v for n, v in per_layer.items()})
        if logits:
            out["attn_logit_max"] = max(logits.values())
            out.update({f"attn_logit_max/{n}": v for n, v in logits.items()})
        return out
