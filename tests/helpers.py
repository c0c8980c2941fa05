"""Small shared builders for the tests."""

import torch

from hybridlm.config import HybridConfig, preset
from hybridlm.model import HybridLM


def small_config(**overrides) -> HybridConfig:
    """All three layer kinds, GQA, 2 groups, chunk smaller than the test sequences."""
    base = dict(vocab_size=97, d_model=64, pattern="M*-M-*M", n_heads=4, n_kv_heads=2, head_dim=16,
                ffn_dim=128, ssm_state=8, mamba_head_dim=16, n_groups=2, chunk_size=8)
    return preset("tiny", **{**base, **overrides})


def small_model(seed: int = 0, **overrides) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(small_config(**overrides))
    with torch.no_grad():  # move the SSM/norm parameters away from their init so tests see them
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "D")):
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
