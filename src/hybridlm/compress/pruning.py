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

Which shape to prune to for a parameter budget is `hybridlm.compress.search`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..config import HybridConfig
from ..interop.checkpoint import load_weights_into, model_state
from ..model.lm import Block, HybridLM
from .importance import Importance


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
