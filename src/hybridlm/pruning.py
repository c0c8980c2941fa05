"""Width and depth pruning of a `HybridLM` from importance scores (Minitron / MiniPuzzle).

A :class:`PruneSpec` is the target shape: d_model, ffn_dim, mamba_heads, n_heads,
n_kv_heads (the same in every layer, as the config demands) and the layers to drop.
:func:`prune_model` keeps, in every tensor, the most important units in their original
order, so the result is an ordinary valid `HybridConfig` + weights:

* embedding channels: columns of the embedding, lm_head and every input projection,
  rows of every output projection, every RMSNorm weight;
* FFN neurons per MLP layer: up_proj rows, down_proj columns;
* attention: whole KV groups by importance (a KV head and its query heads), then the
  best query heads inside every kept group (q/k/v rows, o_proj columns), so
  n_heads / n_kv_heads stays an integer;
* Mamba-2 heads per layer, group-aware: the same number of heads is kept inside every
  one of the n_groups groups, so each head keeps its B/C group and its gated-norm group;
  a head is its P channels of z and x in in_proj, its x channels of conv1d, its dt
  column of in_proj, its dt_bias, A_log and D entries, its gated-norm weights and its
  out_proj columns (B and C are shared per group and kept whole);
* depth: whole layers, the rest renumbered in order.

:func:`search_spec` finds the shape for a parameter budget: it enumerates candidates
on the chosen axes, ranks those within the budget by retained importance and, given
calibration batches, picks the one with the lowest KL to the unpruned model.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from .checkpoint import load_weights_into, model_state
from .config import HybridConfig
from .distill import kd_loss
from .importance import Batch, Importance
from .model import Block, HybridLM

AXES = ("width", "depth", "both", "mixed")


@dataclass(frozen=True)
class PruneSpec:
    d_model: int
    ffn_dim: int
    mamba_heads: int
    n_heads: int
    n_kv_heads: int
    drop_layers: tuple[int, ...] = field(default=())

    @classmethod
    def identity(cls, cfg: HybridConfig) -> "PruneSpec":
        return cls(cfg.d_model, cfg.ffn_dim, cfg.mamba_heads, cfg.n_heads, cfg.n_kv_heads)

    def to_dict(self) -> dict:
        return {**asdict(self), "drop_layers": list(self.drop_layers)}


# ------------------------------------------------------------------ shapes and sizes


def pruned_config(cfg: HybridConfig, spec: PruneSpec) -> HybridConfig:
    """The config of `cfg` pruned to `spec`; ValueError naming the first impossible field."""
    for name in ("d_model", "ffn_dim", "mamba_heads", "n_heads", "n_kv_heads"):
        new, old = getattr(spec, name), getattr(cfg, name)
        if not isinstance(new, int) or not 1 <= new <= old:
            raise ValueError(f"{name} must be an integer in [1, {old}] (pruning only removes units), got {new!r}")
    if spec.mamba_heads % cfg.n_groups:
        raise ValueError(f"mamba_heads ({spec.mamba_heads}) must be a multiple of n_groups ({cfg.n_groups}): "
                         "the same number of heads is kept in every B/C group")
    if spec.n_heads % spec.n_kv_heads or spec.n_heads // spec.n_kv_heads > cfg.n_heads // cfg.n_kv_heads:
        raise ValueError(f"n_heads ({spec.n_heads}) must be a multiple of n_kv_heads ({spec.n_kv_heads}) with at "
                         f"most {cfg.n_heads // cfg.n_kv_heads} query heads per KV head")
    bad = [i for i in spec.drop_layers if not 0 <= i < cfg.n_layers]
    if bad or len(set(spec.drop_layers)) != len(spec.drop_layers):
        raise ValueError(f"drop_layers {list(spec.drop_layers)} must be distinct layer indices in [0, {cfg.n_layers})")
    pattern = "".join(c for i, c in enumerate(cfg.pattern) if i not in set(spec.drop_layers))
    if not pattern:
        raise ValueError(f"cannot drop all {cfg.n_layers} layers")
    return cfg.replace(d_model=spec.d_model, ffn_dim=spec.ffn_dim, mamba_heads=spec.mamba_heads,
                       n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, pattern=pattern)


_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(HybridConfig) if f.name not in ("pattern", "extra"))


@functools.lru_cache(maxsize=8192)
def _block_params(kind: str, shape: tuple) -> int:
    cfg = HybridConfig(**dict(zip(_SHAPE_FIELDS, shape)))
    with torch.device("meta"):
        return sum(p.numel() for p in Block(cfg, kind).parameters())


# widths a layer kind does not use, set to fixed valid values so the cache key ignores them
_UNUSED = {"mlp": lambda c: dict(n_heads=1, n_kv_heads=1, mamba_heads=c.n_groups),
           "attention": lambda c: dict(ffn_dim=1, mamba_heads=c.n_groups),
           "mamba": lambda c: dict(ffn_dim=1, n_heads=1, n_kv_heads=1)}


def layer_params(cfg: HybridConfig, kind: str) -> int:
    """Parameters of one layer of `kind` (its pre-norm and optional norms included); cached per shape."""
    values = {name: getattr(cfg, name) for name in _SHAPE_FIELDS} | _UNUSED[kind](cfg)
    return _block_params(kind, tuple(values[name] for name in _SHAPE_FIELDS))


def param_count(cfg: HybridConfig) -> int:
    """Total parameters of `cfg` (equals `model.count_params`; layers are counted once per shape, so
    searches over thousands of candidates stay fast)."""
    emb = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    return emb + cfg.d_model + sum(cfg.count(k) * layer_params(cfg, k) for k in set(cfg.layer_kinds()))


_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}


def parse_target(text: str, total: int) -> int:
    """'0.7x' (fraction of `total`), '70%', '3.2M', '9B' or '4500000' -> a parameter count."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*(x|%|k|m|b|g)?", t)
    if not m:
        raise ValueError(f"--target-params {text!r}: use a fraction like 0.7x, a percentage like 70%, "
                         "or a count like 3.2M / 9B / 4500000")
    value, unit = float(m.group(1)), m.group(2)
    n = value * total if unit == "x" else value / 100 * total if unit == "%" else value * _SUFFIX.get(unit, 1)
    if n <= 0:
        raise ValueError(f"--target-params {text!r} must be positive")
    return int(round(n))


# ------------------------------------------------------------------ which units to keep


def top_indices(scores: Tensor, k: int) -> Tensor:
    """Indices of the k highest scores, in increasing index order (ties: lower index first)."""
    order = torch.argsort(-scores.double(), stable=True)[:k]
    return order.sort().values


def attention_keep(scores: Tensor, n_kv: int, spec: PruneSpec) -> tuple[Tensor, Tensor]:
    """Kept query heads and KV heads: the best KV groups (L2 of their query-head scores), then the
    best `spec.n_heads // spec.n_kv_heads` query heads inside each kept group."""
    r = scores.numel() // n_kv                                  # query heads per KV head
    groups = scores.view(n_kv, r)
    kv = top_indices(groups.norm(dim=1), spec.n_kv_heads)
    q = [g * r + top_indices(groups[g], spec.n_heads // spec.n_kv_heads) for g in kv.tolist()]
    return torch.cat(q), kv


def mamba_keep(scores: Tensor, n_groups: int, keep: int) -> Tensor:
    """Kept Mamba heads: the best `keep // n_groups` heads inside every group."""
    per = scores.numel() // n_groups
    return torch.cat([g * per + top_indices(scores[g * per:(g + 1) * per], keep // n_groups)
                      for g in range(n_groups)])


def _channels(units: Tensor, width: int) -> Tensor:
    """Channel indices of whole units of `width` channels: unit u -> [u*width, (u+1)*width)."""
    return (units[:, None] * width + torch.arange(width)).flatten()


# ------------------------------------------------------------------ apply


def _select(t: Tensor, rows: Tensor | None = None, cols: Tensor | None = None) -> Tensor:
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None and t.dim() > 1:
        t = t.index_select(1, cols.to(t.device))
    return t


def _layer_index_map(cfg: HybridConfig, kind: str, spec: PruneSpec, imp: Importance,
                     layer: int) -> dict[str, tuple[Tensor | str | None, Tensor | str | None]]:
    """(rows, cols) to keep for each tensor of one layer's mixer: indices, "d" (the kept
    embedding channels, resolved by the caller) or None (all)."""
    if kind == "mlp":
        f = top_indices(imp.ffn[layer], spec.ffn_dim)
        return {"up_proj.weight": (f, "d"), "up_proj.bias": (f, None), "down_proj.weight": ("d", f),
                "down_proj.bias": ("d", None), "post_fc2_norm.weight": ("d", None), "post_fc2_norm.bias": ("d", None)}
    if kind == "attention":
        q_heads, kv_heads = attention_keep(imp.attention[layer], cfg.n_kv_heads, spec)
        q, kv = _channels(q_heads, cfg.head_dim), _channels(kv_heads, cfg.head_dim)
        qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        qkv = torch.cat([q, qd + kv, qd + kvd + kv])           # rows of the concatenated [q, k, v]
        out = {"o_proj.weight": ("d", q), "o_proj.bias": ("d", None)}
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out[f"{name}.weight"], out[f"{name}.bias"] = (rows, "d"), (rows, None)
        for name, rows in (("qkv_norm", qkv), ("post_proj_norm", "d")):  # q_norm / k_norm: per head_dim, kept
            out[f"{name}.weight"], out[f"{name}.bias"] = (rows, None), (rows, None)
        return out
    heads = mamba_keep(imp.mamba[layer], cfg.n_groups, spec.mamba_heads)
    x = _channels(heads, cfg.mamba_head_dim)                 # z / x / gated-norm channels
    di, bc = cfg.d_inner, torch.arange(2 * cfg.n_groups * cfg.ssm_state)
    conv = torch.cat([x, di + bc])                           # [x, B, C] channels of the conv
    in_rows = torch.cat([x, di + conv, di + cfg.conv_dim + heads])  # [z, xBC, dt] rows of in_proj
    return {"in_proj.weight": (in_rows, "d"), "in_proj.bias": (in_rows, None),
            "conv1d.weight": (conv, None), "conv1d.bias": (conv, None),
            "dt_bias": (heads, None), "A_log": (heads, None), "D": (heads, None),
            "norm.weight": (x, None), "out_proj.weight": ("d", x), "out_proj.bias": ("d", None),
            "out_norm.weight": ("d", None), "out_norm.bias": ("d", None)}


def prune_state_dict(cfg: HybridConfig, sd: dict[str, Tensor], imp: Importance,
                     spec: PruneSpec) -> dict[str, Tensor]:
    """The weights of `cfg` (state dict `sd`) pruned to `spec` using the scores `imp`."""
    imp.check_matches(cfg)
    d = top_indices(imp.embedding, spec.d_model)

    def resolve(idx: Tensor | str | None) -> Tensor | None:
        return d if isinstance(idx, str) else idx  # "d": the kept embedding channels
    out = {"backbone.embeddings.weight": _select(sd["backbone.embeddings.weight"], cols=d),
           "backbone.norm_f.weight": _select(sd["backbone.norm_f.weight"], d)}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = _select(sd["lm_head.weight"], cols=d)
    kept = [i for i in range(cfg.n_layers) if i not in set(spec.drop_layers)]
    for new, old in enumerate(kept):
        src, dst = f"backbone.layers.{old}.", f"backbone.layers.{new}."
        index = {"norm.weight": ("d", None), **{"mixer." + k: v for k, v in
                                                 _layer_index_map(cfg, cfg.layer_kinds()[old], spec, imp, old).items()}}
        for key in [k for k in sd if k.startswith(src)]:
            rows, cols = index.get(key[len(src):], (None, None))  # unlisted tensors (q_norm, k_norm) stay whole
            out[dst + key[len(src):]] = _select(sd[key], resolve(rows), resolve(cols))
    return out


def prune_model(model: HybridLM, imp: Importance, spec: PruneSpec) -> HybridLM:
    """A new, independent `HybridLM` of `pruned_config(model.cfg, spec)` holding the kept weights."""
    cfg = pruned_config(model.cfg, spec)
    tensors = prune_state_dict(model.cfg, model_state(model), imp, spec)
    p = model.lm_head.weight
    with torch.device("meta"):
        pruned = HybridLM(cfg)
    pruned = pruned.to_empty(device=p.device).to(p.dtype)
    load_weights_into(pruned, {k: v.clone() for k, v in tensors.items()}, "pruned weights")
    if cfg.tie_embeddings:
        pruned.lm_head.weight = pruned.backbone.embeddings.weight
    return pruned.train(model.training)


# ------------------------------------------------------------------ search


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
