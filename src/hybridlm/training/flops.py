"""Model FLOPs of a training step and MFU (model FLOPs utilization) for a `HybridConfig`.

A multiply-add is 2 FLOPs; a training step costs 3x the forward (backward: 2x, the input
and the weight gradients). *Model* FLOPs, as PaLM's MFU defines them: the work the model
needs, so recomputation by activation checkpointing is not counted, and neither are the
elementwise ops (norms, activations, the scan's decays, softmax) or the embedding lookup.

    train_flops_per_token(cfg, L) = 6 * matmul_params(cfg)
                                  + 3 * (n_attention * attention_flops_per_token(cfg, L)
                                         + n_mamba * ssd_flops_per_token(cfg, L))
    mfu = tokens_per_s * train_flops_per_token / peak_flops

Causal masking is counted as the work it leaves (pairs s <= t only): attention scores and
values over L(L+1)/2 pairs per sequence, the SSD's intra-chunk terms over Q(Q+1)/2 pairs per
chunk (PaLM's and torchtitan's 12 * layers * heads * head_dim * L attention term counts all
L^2 pairs, twice this one).
"""

from __future__ import annotations

from ..config import HybridConfig

# Dense (no sparsity) peak tensor-core TFLOP/s per GPU: (bf16, fp8), from NVIDIA's datasheets.
PEAK_TFLOPS = {"H100 SXM": (989.4, 1978.9), "H200 SXM": (989.4, 1978.9), "A100": (312.0, None)}


def _mixer_matmul_params(cfg: HybridConfig, kind: str) -> int:
    if kind == "mamba":  # in_proj, out_proj, the depthwise conv's taps
        return cfg.d_model * cfg.in_proj_dim + cfg.d_inner * cfg.d_model + cfg.conv_dim * cfg.conv_kernel
    if kind == "attention":  # q, k, v, o
        qkv = cfg.d_model * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        return qkv + cfg.n_heads * cfg.head_dim * cfg.d_model
    return 2 * cfg.d_model * cfg.ffn_dim  # MLP: up, down


def matmul_params(cfg: HybridConfig) -> int:
    """Weights that each multiply every token once: the block projections (Mamba in/out_proj and
    conv1d taps, q/k/v/o, MLP up/down) and lm_head. Not counted: the input embedding (a lookup;
    when tied, its matrix is counted once, as lm_head), norms, biases, A_log, D, dt_bias."""
    return sum(_mixer_matmul_params(cfg, k) for k in cfg.layer_kinds()) + cfg.vocab_size * cfg.d_model


def attention_flops_per_token(cfg: HybridConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one causal attention layer's scores (Q K^T) and values (P V):
    2 GEMMs x 2 * n_heads * head_dim per (query, key) pair, L(L+1)/2 pairs per sequence of L."""
    pairs = seq_len * (seq_len + 1) / 2
    return 2 * 2 * cfg.n_heads * cfg.head_dim * pairs / seq_len


def ssd_flops_per_token(cfg: HybridConfig, seq_len: int) -> float:
    """Forward FLOPs per token of one Mamba-2 layer's chunked SSD scan (chunk Q, heads H of size P,
    state N, groups G), per sequence of L = n_chunks chunks:

    * intra-chunk scores C_t . B_s, s <= t in one chunk: 2N per pair and group;
    * intra-chunk outputs sum_s (decay * score)_ts x_s: 2P per pair and head;
    * chunk states sum_s B_s x_s^T (decayed): 2NP per token and head;
    * state passing from chunk to chunk: 2NP per chunk and head;
    * outputs from the incoming state C_t . h: 2NP per token and head.
    """
    n, p, h, g, q = cfg.ssm_state, cfg.mamba_head_dim, cfg.mamba_heads, cfg.n_groups, cfg.chunk_size
    full, rest = divmod(seq_len, q)
    n_chunks = full + (rest > 0)
    pairs = full * q * (q + 1) / 2 + rest * (rest + 1) / 2
    total = 2 * pairs * (n * g + p * h) + 2 * (2 * n * p * h) * seq_len + 2 * n * p * h * n_chunks
    return total / seq_len


def train_flops_per_token(cfg: HybridConfig, seq_len: int) -> float:
    """Model FLOPs of one training step (forward + backward) per token at sequence length `seq_len`."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    mixers = (cfg.count("attention") * attention_flops_per_token(cfg, seq_len)
              + cfg.count("mamba") * ssd_flops_per_token(cfg, seq_len))
    return 6 * matmul_params(cfg) + 3 * mixers


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """Achieved model FLOP/s over the peak (a fraction)."""
    if not peak_tflops > 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def detect_peak_tflops(device_name: str) -> tuple[float, float | None] | None:
    """(bf16, fp8) dense peak TFLOP/s of a GPU named like ``torch.cuda.get_device_name()``
    ("NVIDIA H100 80GB HBM3", "NVIDIA H200"), or None when unknown: PCIe and NVL variants of
    H100 / H200 run at lower clocks and power, so they are not guessed (pass a peak instead)."""
    name = device_name.upper()
    if "PCIE" in name or "NVL" in name:
        return None
    for key in ("H100", "H200", "A100"):
        if key in name:
            return next(v for k, v in PEAK_TFLOPS.items() if k.startswith(key))
    return None
