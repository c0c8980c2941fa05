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


def left_padded_pair(len_a: int, len_b: int, seed: int, vocab: int = 97):
    """Two random prompts a (1, len_a), b (1, len_b < len_a) and their left-padded batch + mask."""
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, vocab, (1, len_a), generator=gen), torch.randint(0, vocab, (1, len_b), generator=gen)
    ids = torch.zeros(2, len_a, dtype=torch.long)
    ids[0], ids[1, len_a - len_b:] = a[0], b[0]
    mask = torch.ones(2, len_a, dtype=torch.bool)
    mask[1, :len_a - len_b] = False
    return a, b, ids, mask
