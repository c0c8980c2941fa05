"""Which shape to prune to: candidate specs, ranked by retained importance, checked by calibration KL.

:func:`search_spec` finds the shape for a parameter budget: it enumerates candidates on
the chosen axes, ranks those within the budget by retained importance and, given
calibration batches, picks the one with the lowest KL to the unpruned model.
:func:`choose_spec` is what `hybridlm prune` asks for: a search, or an explicit shape.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Iterator

import torch
from torch import Tensor

from ..config import HybridConfig
from ..model.lm import HybridLM
from .importance import Batch, Importance
from .kl import kd_loss
from .pruning import PruneSpec, param_count, prune_model, pruned_config, top_indices

AXES = ("width", "depth", "both", "mixed")


def _grid(full: int, align: int, min_frac: float, steps: int = 16) -> list[int]:
    """Candidate sizes from `full` down to about min_frac * full, multiples of `align` (full itself included)."""
    out = {full}
    for k in range(steps, -1, -1):
        v = int(round(full * (min_frac + (1 - min_frac) * k / steps) / align) * align)
        if 1 <= v <= full:
            out.add(v)
    return sorted(out, reverse=True)


def candidate_specs(cfg: HybridConfig, imp: Importance | None, axes: str = "both",
                    min_width: float = 0.5, max_drop_frac: float = 0.5) -> list[PruneSpec]:
    """Candidate shapes: d_model, ffn_dim, mamba_heads (width) x the k least important layers dropped (depth).

    axes: "width", "depth", "both" (either or both), or "mixed" (both: some width and some depth pruning).

    Attention heads are left whole (the few attention layers are cheap and, in Minitron,
    pruning them hurts most); pass n_heads explicitly to prune them. Without depth scores
    (`imp` None or computed without depth), layers are dropped from the end, attention last.
    """
    if axes not in AXES:
        raise ValueError(f"axes must be one of {AXES}, got {axes!r}")
    if imp is not None:
        imp.check_matches(cfg)
    width = axes != "depth"
    align = 64 if cfg.d_model >= 1024 else 8 if cfg.d_model >= 64 else 1
    d_opts = _grid(cfg.d_model, align, min_width) if width else [cfg.d_model]
    f_opts = _grid(cfg.ffn_dim, align, min_width) if width else [cfg.ffn_dim]
    m_opts = _grid(cfg.mamba_heads, cfg.n_groups, min_width) if width and cfg.count("mamba") else [cfg.mamba_heads]
    order = layer_drop_order(cfg, imp)
    drops = [tuple(sorted(order[:k])) for k in range(max_drop(cfg, axes, max_drop_frac) + 1)]
    specs = [PruneSpec(dm, ff, mh, cfg.n_heads, cfg.n_kv_heads, dr)
             for dm, ff, mh, dr in itertools.product(d_opts, f_opts, m_opts, drops)]
    if axes == "mixed":
        full = (cfg.d_model, cfg.ffn_dim, cfg.mamba_heads)
        specs = [s for s in specs if s.drop_layers and (s.d_model, s.ffn_dim, s.mamba_heads) != full]
    return specs


def max_drop(cfg: HybridConfig, axes: str, max_drop_frac: float = 0.5) -> int:
    """How many layers a search on `axes` may drop: none for width, else up to `max_drop_frac` of them."""
    return 0 if axes == "width" else min(int(cfg.n_layers * max_drop_frac), cfg.n_layers - 1)


def widest_fitting(specs: list[PruneSpec], fits: Callable[[PruneSpec], bool]) -> Iterator[PruneSpec]:
    """For every combination of the other axes, the spec with the largest d_model that `fits`.

    Size and retained importance both grow with d_model, so a narrower spec with the same
    other axes is dominated; this skips evaluating most of a search grid.
    """
    groups: dict[tuple, list[PruneSpec]] = {}
    for s in specs:
        groups.setdefault((s.ffn_dim, s.mamba_heads, s.n_heads, s.n_kv_heads, s.drop_layers), []).append(s)
    for group in groups.values():
        yield from itertools.islice((s for s in sorted(group, key=lambda s: -s.d_model) if fits(s)), 1)


def layer_drop_order(cfg: HybridConfig, imp: Importance | None) -> list[int]:
    """Layers from least to most important (depth KL); without scores, from the last layer back, attention last."""
    if imp is not None and imp.depth_kl is not None:
        return torch.argsort(imp.depth_kl.double(), stable=True).tolist()
    return sorted(range(cfg.n_layers), key=lambda i: (cfg.pattern[i] == "*", -i))


def retained_importance(cfg: HybridConfig, imp: Importance | None, spec: PruneSpec) -> float:
    """Proxy score in [0, 1]: the product over axes of the fraction of importance kept.

    Width axes count the kept share of the summed unit scores (mean over layers); depth
    counts 1 - the dropped layers' share of the summed depth KL. Without scores every
    unit counts the same (the kept fraction).
    """
    def frac(scores: Tensor | None, total: int, keep: int) -> float:
        if scores is None:
            return keep / total
        s = scores.double().clamp(min=0)
        return float(s[top_indices(s, keep)].sum() / s.sum()) if s.sum() > 0 else keep / total

    def layers(d: dict[int, Tensor], total: int, keep: int) -> float:
        kept = [frac(v, total, keep) for i, v in d.items() if i not in spec.drop_layers]
        return sum(kept) / len(kept) if kept else 1.0

    score = frac(None if imp is None else imp.embedding, cfg.d_model, spec.d_model)
    if imp is None:
        score *= (spec.ffn_dim / cfg.ffn_dim) * (spec.mamba_heads / cfg.mamba_heads)
        return score * (1 - len(spec.drop_layers) / cfg.n_layers)
    score *= layers(imp.ffn, cfg.ffn_dim, spec.ffn_dim) * layers(imp.mamba, cfg.mamba_heads, spec.mamba_heads)
    if imp.depth_kl is not None:
        dk = imp.depth_kl.double().clamp(min=0)
        score *= 1 - float(dk[list(spec.drop_layers)].sum() / dk.sum()) if dk.sum() > 0 else 1.0
    return score


@torch.no_grad()
def calibration_kl(teacher: HybridLM, student: HybridLM, batches: list[Batch]) -> float:
    """Mean per-token KL(teacher || student) on the calibration batches."""
    dev = teacher.lm_head.weight.device
    return sum(float(kd_loss(student(x.to(dev)), teacher(x.to(dev)))) for x, _ in batches) / len(batches)


def search_spec(cfg: HybridConfig, imp: Importance | None, target_params: int, axes: str = "both",
                tolerance: float = 0.03, model: HybridLM | None = None, batches: list[Batch] | None = None,
                n_eval: int = 6, n_drop: int | None = None) -> tuple[PruneSpec, list[dict]]:
    """The best shape with `(1 - tolerance) * target <= params <= target` (`n_drop`: exactly that
    many layers dropped, the least important ones, and width searched for the rest).

    Candidates are ranked by :func:`retained_importance`; with `model` and `batches` the
    best `n_eval` are pruned for real and the lowest calibration KL wins. Returns the spec
    and the ranked table (dicts with spec, params, proxy and, when evaluated, kl).
    ValueError if the target is not reachable on these axes.
    """
    full = param_count(cfg)
    if target_params >= full:
        return PruneSpec.identity(cfg), [{"spec": PruneSpec.identity(cfg).to_dict(), "params": full, "proxy": 1.0}]
    rows, seen = [], set()
    candidates = candidate_specs(cfg, imp, axes)
    if n_drop is not None:
        candidates = [s for s in candidates if len(s.drop_layers) == n_drop]
        if not candidates:
            raise ValueError(f"n_drop={n_drop}: axes {axes!r} allow dropping 0 to {max_drop(cfg, axes)} layers")
    for spec in widest_fitting(candidates, lambda s: param_count(pruned_config(cfg, s)) <= target_params):
        small = pruned_config(cfg, spec)
        n = param_count(small)
        key = (small.pattern, small.d_model, small.ffn_dim if "-" in small.pattern else 0,
               small.mamba_heads if "M" in small.pattern else 0)  # widths of absent layer kinds do not matter
        if key not in seen and n >= (1 - tolerance) * target_params:
            seen.add(key)
            rows.append({"spec": spec, "params": n, "proxy": retained_importance(cfg, imp, spec)})
    if not rows:
        smallest = min(param_count(pruned_config(cfg, s)) for s in candidates)
        raise ValueError(f"no {axes} pruning of this {full:,}-parameter model lands within {tolerance:.0%} below "
                         f"{target_params:,} parameters (the smallest candidate has {smallest:,}); "
                         "choose another --target-params or --axes")
    rows.sort(key=lambda r: (-r["proxy"], -r["params"]))
    if model is not None and batches:
        for r in rows[:n_eval]:
            r["kl"] = calibration_kl(model, prune_model(model, imp, r["spec"]).eval(), batches)
        rows[:n_eval] = sorted(rows[:n_eval], key=lambda r: r["kl"])
    best = rows[0]["spec"]
    return best, [{**r, "spec": r["spec"].to_dict()} for r in rows]


def choose_spec(cfg: HybridConfig, imp: Importance, target_params: int | None = None,
                widths: dict[str, int] | None = None, drop_layers: tuple[int, ...] = (), n_drop: int = 0,
                axes: str = "both", tolerance: float = 0.03, model: HybridLM | None = None,
                batches: list[Batch] | None = None) -> tuple[PruneSpec, list[dict] | None]:
    """The shape `hybridlm prune` asks for and, for a search, its ranked table (else None).

    With `target_params`: :func:`search_spec` (`n_drop` > 0: exactly that many layers dropped).
    Otherwise the explicit `widths` (PruneSpec fields; the rest kept) with `drop_layers` plus the
    `n_drop` least important other layers (depth KL), validated against `cfg`.
    """
    imp.check_matches(cfg)
    if target_params is not None:
        return search_spec(cfg, imp, target_params, axes, tolerance, model, batches, n_drop=n_drop or None)
    drop = list(drop_layers)
    if n_drop:
        if imp.depth_kl is None:
            raise ValueError("--n-drop needs depth importance scores (these were computed with depth=False)")
        drop += [i for i in layer_drop_order(cfg, imp) if i not in drop][:n_drop]
    spec = dataclasses.replace(PruneSpec.identity(cfg), **(widths or {}), drop_layers=tuple(sorted(drop)))
    pruned_config(cfg, spec)  # validate before any work
    return spec, None
