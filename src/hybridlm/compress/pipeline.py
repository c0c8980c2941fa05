"""Pruning end to end: a model (or checkpoint) + calibration data -> a pruned student checkpoint.

    from hybridlm.compress import PruneConfig, prune
    result = prune("runs/x/final", "runs/pruned", PruneConfig(target_params="0.7x"), data="data/")
    result.spec, result.params_after, result.kl

The steps: calibration batches from prepared shards, importance scores (or an
``importance.json`` of an earlier prune), the shape (a search for a parameter budget, or
an explicit one), the pruned weights, and the student directory: ``config.json`` (with
``pruned_from`` and ``prune_spec``) + ``model.safetensors``, ``importance.json``,
``prune_search.json`` (the ranked candidates of a search) and the source's
``tokenizer.json``. Distill it next (`hybridlm.compress.distill`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..interop.checkpoint import save_model
from ..interop.convert import load
from ..model.lm import HybridLM
from ..training.dataset import TokenDataset
from .importance import Batch, Importance, calibration_batches, compute_importance
from .pruning import PruneSpec, param_count, parse_target, prune_model
from .search import AXES, calibration_kl, choose_spec

WIDTH_FIELDS = ("d_model", "ffn_dim", "mamba_heads", "n_heads", "n_kv_heads")


@dataclass
class PruneConfig:
    """What to prune to and how to score it (one `hybridlm prune` flag per field; the comments are the help)."""

    target_params: Optional[str] = None  # parameter budget: 0.7x, 70%, 3.2M, 9B ... (searches the shape)
    axes: str = field(default="both", metadata={"choices": AXES})  # what --target-params may prune (both: either or both; mixed: both at once)
    tolerance: float = 0.03  # accept shapes within this fraction below the target
    d_model: Optional[int] = None  # explicit new d_model (default: keep)
    ffn_dim: Optional[int] = None  # explicit new ffn_dim (default: keep)
    mamba_heads: Optional[int] = None  # explicit new mamba_heads (default: keep)
    n_heads: Optional[int] = None  # explicit new n_heads (default: keep)
    n_kv_heads: Optional[int] = None  # explicit new n_kv_heads (default: keep)
    drop_layers: Optional[str] = None  # explicit comma-separated layer indices to drop, e.g. 3,7
    n_drop: int = 0  # drop the N least important layers (depth KL); with --target-params: exactly N, and width is searched for the rest
    importance: Optional[str] = None  # importance.json of an earlier prune of the same model (skips calibration)
    calib_seqs: int = 256  # calibration sequences
    seq_len: int = 256  # tokens per calibration sequence
    batch_size: int = 16  # calibration sequences per forward pass

    def __post_init__(self) -> None:
        if self.target_params and (self.widths() or self.drop_layers):
            raise ValueError("give either --target-params (optionally with --n-drop) or an explicit --d-model/"
                             "--ffn-dim/--mamba-heads/--n-heads/--n-kv-heads/--drop-layers, not both")
        if not self.target_params and not (self.widths() or self.drop_layers or self.n_drop):
            raise ValueError("nothing to prune: give --target-params or an explicit new shape (see --help)")
        if self.axes not in AXES:
            raise ValueError(f"axes must be one of {AXES}, got {self.axes!r}")
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"tolerance must be in [0, 1), got {self.tolerance}")
        if self.n_drop < 0 or min(self.calib_seqs, self.seq_len, self.batch_size) < 1:
            raise ValueError("n_drop must be >= 0 and calib_seqs, seq_len, batch_size >= 1")
        self.drop()  # a bad --drop-layers list fails here

    def widths(self) -> dict[str, int]:
        """The explicitly given new widths."""
        return {k: getattr(self, k) for k in WIDTH_FIELDS if getattr(self, k) is not None}

    def drop(self) -> tuple[int, ...]:
        """The explicitly dropped layers."""
        try:
            return tuple(int(i) for i in (self.drop_layers or "").split(",") if i.strip())
        except ValueError:
            raise ValueError(f"--drop-layers must be comma-separated layer indices, got {self.drop_layers!r}") from None


@dataclass
class PruneResult:
    out: Path                 # the student checkpoint directory
    model: HybridLM           # the pruned model (eval mode)
    spec: PruneSpec
    params_before: int
    params_after: int
    kl: float | None          # calibration KL(original || pruned), nats/token; None without calibration data
    table: list[dict] | None  # the ranked candidates of a --target-params search


def prune(model: HybridLM | str | Path, out: str | Path, config: PruneConfig, data: str | Path | None = None,
          source: str | None = None, device: str | torch.device = "cpu", progress: bool = True) -> PruneResult:
    """Prune `model` (or the checkpoint directory it names: ours or Hugging Face) into checkpoint `out`.

    `data` is a prepared shard directory for the calibration set (not needed when
    `config.importance` gives the scores and no search is asked for). `source` is recorded
    as ``pruned_from`` and, when it is a directory with a ``tokenizer.json``, that file is
    copied beside the student (default: the checkpoint path `model` names).
    """
    if not isinstance(model, HybridLM):
        source = str(model) if source is None else source
        model = load(model, device=device)
    cfg = model.cfg
    target = parse_target(config.target_params, param_count(cfg)) if config.target_params else None
    batches = _calibration(model, data, config) if data is not None else None
    imp = _importance(model, batches, config, progress)
    spec, table = choose_spec(cfg, imp, target, config.widths(), config.drop(), config.n_drop, config.axes,
                              config.tolerance, model, batches)
    pruned = prune_model(model, imp, spec).eval()
    out = _write_student(Path(out), pruned, imp, spec, table, source)
    kl = None
    if batches:
        kl = table[0].get("kl") if table else None  # the search already measured its winner
        kl = calibration_kl(model, pruned, batches) if kl is None else kl
    return PruneResult(out, pruned, spec, model.num_params(), pruned.num_params(), kl, table)


def _calibration(model: HybridLM, data: str | Path, config: PruneConfig) -> list[Batch]:
    """Calibration batches from the train split of prepared shards, on the model's device."""
    ds = TokenDataset(data, "train")
    ds.check_vocab(model.cfg.vocab_size)
    device = model.lm_head.weight.device
    return [(x.to(device), y) for x, y in calibration_batches(ds, config.calib_seqs, config.seq_len, config.batch_size)]


def _importance(model: HybridLM, batches: list[Batch] | None, config: PruneConfig, progress: bool) -> Importance:
    if config.importance:
        return Importance.load(config.importance)
    if batches is None:
        raise ValueError("--data (a prepared shard directory) is required to compute importance scores")
    return compute_importance(model, batches, depth=True, progress=progress)


def _write_student(out: Path, pruned: HybridLM, imp: Importance, spec: PruneSpec, table: list[dict] | None,
                   source: str | None) -> Path:
    provenance = {"pruned_from": str(source)} if source is not None else {}
    out = save_model(pruned, out, extra={**provenance, "prune_spec": spec.to_dict()})
    imp.save(out / "importance.json")
    if table is not None:
        (out / "prune_search.json").write_text(json.dumps(table[:50], indent=2) + "\n")
    if source is not None and (Path(source) / "tokenizer.json").is_file():
        shutil.copyfile(Path(source) / "tokenizer.json", out / "tokenizer.json")
    return out
