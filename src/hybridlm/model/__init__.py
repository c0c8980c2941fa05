"""The model: config-driven layers and the `HybridLM` stack (Nemotron-H family).

    ssd.py        the SSD scan three ways: sequential reference, chunked (training/prefill), one step (decode)
    norms.py      RMSNorm, LayerNorm, the grouped gated RMSNorm of Mamba-2, the optional stability norms
    mamba2.py     the Mamba-2 mixer (M)       attention.py  GQA self-attention, no RoPE (*)
    mlp.py        squared-ReLU MLP (-)        cache.py      constant-size Mamba state + growing KV cache
    lm.py         `HybridLM`: embeddings -> blocks -> norm_f -> lm_head, HF parameter names
    info.py       parameter counts and inference memory of a config
    documents.py  seq_idx (packed documents): cu_seqlens <-> seq_idx, checks, block-diagonal causal mask
    activation_checkpointing.py  per-block activation checkpointing: none / full / selective (mixers), every k-th
"""

from .cache import InferenceCache, KVCache, MambaState
from .lm import Block, HybridLM, count_params

__all__ = ["Block", "HybridLM", "InferenceCache", "KVCache", "MambaState", "count_params"]
