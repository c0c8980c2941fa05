"""Inference memory planner: does a model serve a context in a GPU memory budget, and which
pruned architecture does (the Nemotron Nano 2 question: 128k tokens in 22 GiB, bf16).

Memory of serving `batch` sequences of `context` tokens (bytes):

    weights      params * bytes(dtype)
    KV cache     batch * context * kv_bytes_per_token       (attention layers, 16-bit)
    Mamba state  batch * mamba_state_bytes                   (conv window 16-bit, SSM state fp32)
    activations  the peak of a chunked prefill of t = batch * min(context, prefill_chunk) tokens:
                 t * (2 * d_model + widest projection output) * 2 bytes      (residual, normed input, mixer)
               + batch * mamba_heads * min(context, prefill_chunk) * chunk_size * 4   (SSD in-chunk decay matrix)
               + batch * vocab * 4                                          (next-token logits, fp32)

The KV cache and Mamba state come from `hybridlm.model.info` (the same figures `hybridlm info`
prints). The activation term is an estimate of the transient working set of one prefill
chunk (serving engines such as vLLM prefill in chunks and keep only last-token logits);
framework overhead (CUDA context, allocator slack) is the `reserve` the caller keeps back.
"""

from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

from ..config import HybridConfig
from ..model.info import dtype_bytes, human_bytes, kv_bytes_per_token, mamba_state_bytes
from .importance import Importance
from .pruning import PruneSpec, param_count, pruned_config
from .search import candidate_specs, retained_importance, widest_fitting

CACHE_BYTES = 2  # KV cache and conv window in 16-bit; SSM state in fp32 (see model.info.mamba_state_bytes)
ACT_BYTES = 2    # activations in 16-bit
_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_bytes(text: str) -> float:
    """'22GiB', '22 GB', '1.5TiB', '512MiB' or a plain number of bytes."""
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):] or "b"
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"memory size {text!r}: use a positive number with a unit such as 22GiB, 80GB or 512MiB")
    return value * _UNITS[unit]


@dataclass
class MemoryPlan:
    params: int
    weights: float
    kv_cache: float
    mamba_state: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.mamba_state + self.activations


def activation_bytes(cfg: HybridConfig, context: int, batch: int = 1, prefill_chunk: int = 2048) -> float:
    """Peak transient memory of one prefill chunk (see the module docstring)."""
    tokens = min(context, prefill_chunk)
    widths = {"mamba": cfg.in_proj_dim, "attention": (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim,
              "mlp": cfg.ffn_dim}
    widest = max(widths[k] for k in set(cfg.layer_kinds()))
    act = batch * tokens * (2 * cfg.d_model + widest) * ACT_BYTES
    ssd = batch * cfg.mamba_heads * tokens * cfg.chunk_size * 4 if cfg.count("mamba") else 0
    return act + ssd + batch * cfg.vocab_size * 4


def memory_plan(cfg: HybridConfig, context: int, batch: int = 1, dtype: str = "bf16",
                prefill_chunk: int = 2048) -> MemoryPlan:
    """Weights + KV cache + Mamba state + activations for `batch` sequences of `context` tokens."""
    if context < 1 or batch < 1 or prefill_chunk < 1:
        raise ValueError(f"context, batch and prefill_chunk must be >= 1, got {context}, {batch}, {prefill_chunk}")
    n = param_count(cfg)
    return MemoryPlan(n, n * dtype_bytes(dtype), batch * context * kv_bytes_per_token(cfg, CACHE_BYTES),
                      batch * mamba_state_bytes(cfg, CACHE_BYTES), activation_bytes(cfg, context, batch, prefill_chunk))


def max_context(cfg: HybridConfig, budget: float, batch: int = 1, dtype: str = "bf16",
                prefill_chunk: int = 2048, limit: int = 2**40) -> int | None:
    """The longest context whose plan fits `budget` bytes: 0 if not even one token fits, None if
    memory does not bound it (no attention layer: the state is constant)."""
    def fits(ctx: int) -> bool:
        return memory_plan(cfg, ctx, batch, dtype, prefill_chunk).total <= budget
    if not fits(1):
        return 0
    if cfg.count("attention") == 0:
        return None
    lo, hi = 1, limit  # fits(lo), total grows with the context
    if fits(hi):
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def search_architecture(cfg: HybridConfig, budget: float, context: int, batch: int = 1, dtype: str = "bf16",
                        imp: Importance | None = None, axes: str = "both", prefill_chunk: int = 2048,
                        top: int = 5, progress: bool = False) -> list[dict]:
    """Pruned candidates of `cfg` (see `search.candidate_specs`) whose plan at `context` fits
    `budget`, best first: highest retained importance (with `imp`; else the kept fraction of
    every axis), then most parameters. Empty if none fits."""
    def fits(spec: PruneSpec) -> bool:
        return memory_plan(pruned_config(cfg, spec), context, batch, dtype, prefill_chunk).total <= budget

    rows = []
    specs = candidate_specs(cfg, imp, axes)
    floor = PruneSpec(min(s.d_model for s in specs), min(s.ffn_dim for s in specs),
                      min(s.mamba_heads for s in specs), cfg.n_heads, cfg.n_kv_heads,
                      max((s.drop_layers for s in specs), key=len))  # smaller than every candidate
    if not fits(floor):
        return []
    for spec in tqdm(widest_fitting(specs, fits), desc="plan: candidates", disable=not progress, leave=False):
        small = pruned_config(cfg, spec)
        rows.append({"spec": spec, "config": small, "plan": memory_plan(small, context, batch, dtype, prefill_chunk),
                     "score": retained_importance(cfg, imp, spec)})
    rows.sort(key=lambda r: (-r["score"], -r["plan"].params))
    return rows[:top]


def format_plan(cfg: HybridConfig, name: str, budget: float, context: int, batch: int, dtype: str,
                prefill_chunk: int = 2048) -> str:
    """The memory table that `hybridlm plan` prints."""
    p = memory_plan(cfg, context, batch, dtype, prefill_chunk)
    longest = max_context(cfg, budget, batch, dtype, prefill_chunk)
    verdict = "fits" if p.total <= budget else f"does NOT fit (over by {human_bytes(p.total - budget)})"
    lines = [f"{name}: {cfg.n_layers} layers (M={cfg.count('mamba')} *={cfg.count('attention')} "
             f"-={cfg.count('mlp')}), d_model {cfg.d_model}, ffn {cfg.ffn_dim}, {p.params / 1e9:.3f} B params",
             f"memory for batch {batch} x {context:,} tokens, {dtype} weights, 16-bit caches:",
             f"  weights      {human_bytes(p.weights):>12}",
             f"  KV cache     {human_bytes(p.kv_cache):>12}",
             f"  Mamba state  {human_bytes(p.mamba_state):>12}",
             f"  activations  {human_bytes(p.activations):>12}   (prefill chunk {prefill_chunk})",
             f"  total        {human_bytes(p.total):>12}   budget {human_bytes(budget)}: {verdict}",
             "longest context that fits: " + ("unbounded by memory (no attention layer)" if longest is None
                                               else f"{longest:,} tokens")]
    return "\n".join(lines)


def describe_spec(cfg: HybridConfig, spec: PruneSpec) -> str:
    small = pruned_config(cfg, spec)
    return (f"{small.n_layers} layers (dropped {list(spec.drop_layers)}), d_model {small.d_model}, "
            f"ffn {small.ffn_dim}, mamba heads {small.mamba_heads}, heads {small.n_heads}/{small.n_kv_heads}")
