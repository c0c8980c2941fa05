"""Importance of every prunable unit of a `HybridLM`, from activations on a calibration set
(Minitron / MiniPuzzle).

Width scores come from one forward pass with hooks (no gradients). Every score is the
root-mean-square over all calibration tokens of the unit's activation (its L2 norm for a
multi-channel unit such as a head), so a unit whose activation is zero scores exactly 0:

    embedding channel  every RMSNorm output of the residual stream (each block's pre-norm
                       and norm_f), per channel, summed over the norms          (d_model,)
    FFN neuron         the squared-ReLU activation (input of down_proj)          (ffn_dim,) per MLP layer
    attention head     each query head's attention output (input of o_proj)      (n_heads,) per * layer
    Mamba-2 head       each head's gated-norm output (input of out_proj)         (mamba_heads,) per M layer

Depth scores: for each layer, the calibration LM loss and the KL(full || skipped) of the
model with that single layer skipped (the residual passes through unchanged). The bigger
the increase, the more important the layer.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import HybridConfig, read_json
from ..model.lm import HybridLM
from ..training.dataset import TokenDataset
from .kl import kd_loss

Batch = tuple[Tensor, Tensor]  # (input ids, targets), each (b, l)


def calibration_batches(data: TokenDataset, n_seqs: int = 256, seq_len: int = 256, batch_size: int = 16,
                        seed: int = 1234) -> list[Batch]:
    """`n_seqs` random windows of `seq_len` tokens from `data`, in batches (a fixed function of `seed`)."""
    if n_seqs < 1 or batch_size < 1:
        raise ValueError(f"need n_seqs >= 1 and batch_size >= 1, got {n_seqs}, {batch_size}")
    batches, done = [], 0
    while done < n_seqs:
        b = min(batch_size, n_seqs - done)
        batches.append(data.get_batch(len(batches), b, seq_len, seed))
        done += b
    return batches


@dataclass
class Importance:
    """Scores of one model (layer-indexed dicts use the layer's position in `pattern`)."""

    pattern: str
    embedding: Tensor                                    # (d_model,)
    ffn: dict[int, Tensor] = field(default_factory=dict)        # layer -> (ffn_dim,)
    attention: dict[int, Tensor] = field(default_factory=dict)  # layer -> (n_heads,)
    mamba: dict[int, Tensor] = field(default_factory=dict)      # layer -> (mamba_heads,)
    base_loss: float | None = None                       # calibration LM loss of the full model
    depth_loss: Tensor | None = None                     # (n_layers,) LM loss with layer i skipped
    depth_kl: Tensor | None = None                       # (n_layers,) KL(full || layer i skipped)

    def to_dict(self) -> dict:
        def layers(d: dict[int, Tensor]) -> dict[str, list[float]]:
            return {str(k): v.tolist() for k, v in d.items()}
        return {"pattern": self.pattern, "embedding": self.embedding.tolist(), "ffn": layers(self.ffn),
                "attention": layers(self.attention), "mamba": layers(self.mamba), "base_loss": self.base_loss,
                "depth_loss": None if self.depth_loss is None else self.depth_loss.tolist(),
                "depth_kl": None if self.depth_kl is None else self.depth_kl.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Importance":
        try:
            def layers(x: dict) -> dict[int, Tensor]:
                return {int(k): torch.tensor(v) for k, v in x.items()}
            opt = {k: None if d.get(k) is None else torch.tensor(d[k]) for k in ("depth_loss", "depth_kl")}
            return cls(d["pattern"], torch.tensor(d["embedding"]), layers(d["ffn"]), layers(d["attention"]),
                       layers(d["mamba"]), d.get("base_loss"), **opt)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"not an importance record: {e!r}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Importance":
        if not Path(path).is_file():
            raise FileNotFoundError(f"importance file not found: {path}")
        return cls.from_dict(read_json(Path(path)))

    def check_matches(self, cfg: HybridConfig) -> None:
        """ValueError unless these scores were computed for a model of `cfg`'s pattern and d_model."""
        if self.pattern != cfg.pattern or self.embedding.numel() != cfg.d_model:
            raise ValueError(f"importance scores were computed for pattern {self.pattern!r} / d_model "
                             f"{self.embedding.numel()}, not for this model ({cfg.pattern!r} / {cfg.d_model})")

    def depth(self, metric: str = "kl") -> Tensor:
        """Per-layer importance: the increase of KL (or of LM loss) when the layer is skipped."""
        if metric == "kl" and self.depth_kl is not None:
            return self.depth_kl
        if metric == "loss" and self.depth_loss is not None:
            return self.depth_loss - self.base_loss
        raise ValueError(f"no depth scores for metric {metric!r} (computed with depth=False?)")


class _SumSquares:
    """Accumulates sum over tokens of squared activations per unit: act (..., units, unit_dim) -> (units,)."""

    def __init__(self) -> None:
        self.total: Tensor | None = None
        self.tokens = 0

    def add(self, act: Tensor, unit_dim: int = 1) -> None:
        a = act.detach().float().reshape(-1, act.shape[-1] // unit_dim, unit_dim)  # (tokens, units, unit_dim)
        s = a.square().sum(dim=(0, 2))
        self.total = s if self.total is None else self.total + s
        self.tokens += a.shape[0]

    def rms(self) -> Tensor:
        return (self.total / max(self.tokens, 1)).sqrt().cpu()


Accumulators = tuple[list[_SumSquares], dict[int, _SumSquares]]  # per norm, per layer


def _residual_norms(model: HybridLM) -> list[nn.Module]:
    """The RMSNorms that read the residual stream: each block's pre-norm (when it has one) and norm_f."""
    return [blk.norm for blk in model.backbone.layers if blk.norm is not None] + [model.backbone.norm_f]


def _accumulators(model: HybridLM) -> Accumulators:
    return ([_SumSquares() for _ in _residual_norms(model)], {i: _SumSquares() for i in range(model.cfg.n_layers)})


@contextlib.contextmanager
def _activation_hooks(model: HybridLM, acc: Accumulators) -> Iterator[None]:
    """Forward hooks adding every norm output and every mixer's unit activations to `acc`."""
    cfg = model.cfg
    norms, units = acc
    unit_input = {"mlp": ("down_proj", 1), "attention": ("o_proj", cfg.head_dim),
                  "mamba": ("out_proj", cfg.mamba_head_dim)}
    handles = []
    for j, norm in enumerate(_residual_norms(model)):
        handles.append(norm.register_forward_hook(lambda mod, inp, out, a=norms[j]: a.add(out)))
    for i, blk in enumerate(model.backbone.layers):
        proj, unit_dim = unit_input[blk.kind]
        handles.append(getattr(blk.mixer, proj).register_forward_pre_hook(
            lambda mod, inp, a=units[i], d=unit_dim: a.add(inp[0], d)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _Skip(nn.Module):
    """Stands in for a block: the residual stream passes through unchanged."""

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return x


@contextlib.contextmanager
def skip_layers(model: HybridLM, layers: set[int] | list[int]) -> Iterator[HybridLM]:
    """The model with the given blocks replaced by the identity (restored on exit)."""
    saved = {i: model.backbone.layers[i] for i in layers}
    try:
        for i in saved:
            model.backbone.layers[i] = _Skip()
        yield model
    finally:
        for i, blk in saved.items():
            model.backbone.layers[i] = blk


@torch.no_grad()
def compute_importance(model: HybridLM, batches: list[Batch], depth: bool = True,
                       progress: bool = False) -> Importance:
    """Width scores (always) and depth scores (`depth=True`: one extra pass per layer) on `batches`."""
    if not batches:
        raise ValueError("the calibration set is empty")
    was_training = model.training
    model.eval()
    device = model.lm_head.weight.device
    n = model.cfg.n_layers
    base = 0.0
    losses, kls = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    acc = _accumulators(model)
    for x, y in tqdm(batches, desc="importance", disable=not progress, leave=False):
        x, y = x.to(device), y.to(device)
        with _activation_hooks(model, acc):
            ref = model(x).float()  # (b, l, vocab)
        base += float(F.cross_entropy(ref.flatten(0, 1), y.flatten()))
        for i in range(n) if depth else ():
            with skip_layers(model, [i]):
                logits = model(x).float()
            losses[i] += float(F.cross_entropy(logits.flatten(0, 1), y.flatten()))
            kls[i] += float(kd_loss(logits, ref))
    norms, units = acc
    kinds = model.cfg.layer_kinds()
    by_kind = [{i: a.rms() for i, a in units.items() if kinds[i] == k} for k in ("mlp", "attention", "mamba")]
    imp = Importance(model.cfg.pattern, torch.stack([a.rms() for a in norms]).sum(0), *by_kind,
                     base_loss=base / len(batches))
    if depth:
        imp.depth_loss, imp.depth_kl = (losses / len(batches)).float(), (kls / len(batches)).float()
    model.train(was_training)
    return imp
