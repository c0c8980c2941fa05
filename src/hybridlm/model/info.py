"""Size accounting for a config: parameters by layer kind, weight bytes, and inference
cache memory (KV cache of the attention layers vs constant Mamba state) per context.

Everything is computed from the config (the parameter count builds the model on the
meta device), so it works for 56B-parameter presets on a laptop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PUBLISHED_PARAMS, HybridConfig, transformer_twin
from .lm import HybridLM, count_params

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "fp8": 1, "nvfp4": 0.5625}


def dtype_bytes(name: str) -> float:
    """Bytes per element; nvfp4 counts 4-bit values plus one E4M3 scale per 16 (= 4.5 bits)."""
    if name not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def params_by_kind(cfg: HybridConfig) -> dict[str, int]:
    """Parameters of embeddings/head, Mamba, attention, MLP layers (each layer's norm included)."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    out = {"embeddings+head": 0, "mamba": 0, "attention": 0, "mlp": 0, "final norm": 0}
    for block in model.backbone.layers:
        out[block.kind] += sum(p.numel() for p in block.parameters())
    out["final norm"] = model.backbone.norm_f.weight.numel()
    out["embeddings+head"] = model.num_params() - sum(v for k, v in out.items() if k != "embeddings+head")
    return out


def kv_bytes_per_token(cfg: HybridConfig, bytes_per_el: float) -> float:
    """K and V of every attention layer for one token of one sequence."""
    return cfg.count("attention") * 2 * cfg.n_kv_heads * cfg.head_dim * bytes_per_el


def mamba_state_bytes(cfg: HybridConfig, bytes_per_el: float, ssm_bytes: float = 4) -> float:
    """Conv window + SSM state of every Mamba layer for one sequence (SSM state kept in fp32)."""
    conv = cfg.conv_dim * (cfg.conv_kernel - 1) * bytes_per_el
    ssm = cfg.mamba_heads * cfg.mamba_head_dim * cfg.ssm_state * ssm_bytes
    return cfg.count("mamba") * (conv + ssm)


@dataclass
class MemoryReport:
    params: int
    weights: float
    kv_cache: float
    mamba_state: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.mamba_state


def memory_report(cfg: HybridConfig, context: int, batch: int = 1, dtype: str = "bf16") -> MemoryReport:
    """Weights + inference caches (bytes) for `batch` sequences of `context` tokens."""
    b = dtype_bytes(dtype)
    n = sum(params_by_kind(cfg).values())
    kv_b = 2 if dtype in ("fp8", "nvfp4") else b  # caches stay in 16-bit
    return MemoryReport(n, n * b, batch * context * kv_bytes_per_token(cfg, kv_b),
                        batch * mamba_state_bytes(cfg, kv_b))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_info(cfg: HybridConfig, name: str | None = None, contexts: tuple[int, ...] = (4096, 32768, 131072),
                batch: int = 1, dtype: str = "bf16") -> str:
    """The text that `hybridlm info` prints."""
    kinds = params_by_kind(cfg)
    total = sum(kinds.values())
    lines = [f"model {name or 'custom'}: {cfg.n_layers} layers {cfg.pattern}",
             f"  M={cfg.count('mamba')}  *={cfg.count('attention')}  -={cfg.count('mlp')}   "
             f"d_model={cfg.d_model} ffn={cfg.ffn_dim} heads={cfg.n_heads}/{cfg.n_kv_heads}x{cfg.head_dim} "
             f"mamba={cfg.mamba_heads}x{cfg.mamba_head_dim} state={cfg.ssm_state} groups={cfg.n_groups}",
             f"parameters: {total:,} ({total / 1e9:.3f} B)"]
    if name in PUBLISHED_PARAMS:
        pub = PUBLISHED_PARAMS[name]
        lines.append(f"  published: {pub / 1e9:.2f} B  (difference {100 * (total - pub) / pub:+.2f}%)")
    for k, v in kinds.items():
        lines.append(f"  {k:<16}{v:>16,}  {100 * v / total:5.1f}%")
    lines.append(f"weights in {dtype}: {human_bytes(total * dtype_bytes(dtype))}")
    lines.append(f"inference cache per sequence (batch {batch}, 16-bit KV, fp32 SSM state):")
    lines.append(f"  {'context':>8}  {'KV cache':>12}  {'Mamba state':>12}  {'total':>12}")
    for ctx in contexts:
        r = memory_report(cfg, ctx, batch, dtype)
        lines.append(f"  {ctx:>8}  {human_bytes(r.kv_cache):>12}  {human_bytes(r.mamba_state):>12}  "
                     f"{human_bytes(r.kv_cache + r.mamba_state):>12}")
    return "\n".join(lines)


def param_matched_twin(cfg: HybridConfig, tol: float = 0.02) -> HybridConfig:
    """`transformer_twin(cfg)` (every M -> *) with `ffn_dim` chosen so its parameter count is closest to `cfg`'s.

    Parameters are linear in ffn_dim, so the MLP layers absorb the difference. ValueError
    if the pattern has no MLP layer or the best match is more than `tol` apart.
    """
    target = count_params(cfg)
    twin = transformer_twin(cfg)
    if twin.count("mlp") == 0:
        raise ValueError(f"pattern {cfg.pattern!r} has no MLP layer to absorb the parameter difference")
    base = count_params(twin)
    per_unit = count_params(twin.replace(ffn_dim=twin.ffn_dim + 1)) - base  # params per unit of ffn_dim
    twin = twin.replace(ffn_dim=max(1, round(twin.ffn_dim + (target - base) / per_unit)))
    got = count_params(twin)
    if abs(got - target) > tol * target:
        raise ValueError(f"closest twin has {got:,} parameters vs {target:,} (> {tol:.0%} apart)")
    return twin
