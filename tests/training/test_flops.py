"""The model-FLOP count behind MFU: a hand computation, the model's own weights and PyTorch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hybridlm.config import HybridConfig
from hybridlm.model.lm import HybridLM
from hybridlm.training.flops import detect_peak_tflops, matmul_params, mfu, train_flops_per_token

# d_inner = 2 * 8 = 16, mamba_heads = 16 / 4 = 4, conv_dim = 16 + 2 * 1 * 4 = 24, in_proj = 16 + 24 + 4 = 44
CFG = HybridConfig(vocab_size=100, d_model=8, pattern="M*-", n_heads=2, n_kv_heads=1, head_dim=4, ffn_dim=16,
                   ssm_state=4, mamba_head_dim=4, n_groups=1, expand=2, conv_kernel=4, chunk_size=4)


def test_train_flops_of_a_known_config_by_hand() -> None:
    mamba = 8 * 44 + 16 * 8 + 24 * 4                 # in_proj, out_proj, conv taps = 576
    attention = 8 * (2 + 2 * 1) * 4 + 2 * 4 * 8      # q, k, v, o = 192
    mlp = 2 * 8 * 16                                 # up, down = 256
    head = 100 * 8                                   # lm_head = 800
    assert matmul_params(CFG) == mamba + attention + mlp + head == 1824
    L = 6  # one full chunk of 4 and a chunk of 2
    attn_fwd = 2 * (2 * 2 * 4) * (L * (L + 1) // 2)  # QK^T and PV over the 21 causal pairs = 672 per sequence
    pairs = 4 * 5 // 2 + 2 * 3 // 2                  # intra-chunk causal pairs = 13
    n, p, h, g = 4, 4, 4, 1
    ssd_fwd = (2 * n * g * pairs                     # C.B scores per group
               + 2 * p * h * pairs                   # outputs from the scores, per head
               + 2 * n * p * h * L                   # chunk states
               + 2 * n * p * h * 2                   # state passing, 2 chunks
               + 2 * n * p * h * L)                  # outputs from the incoming states = 2312 per sequence
    expected = 6 * 1824 + 3 * (attn_fwd + ssd_fwd) / L
    assert expected == 12436
    assert train_flops_per_token(CFG, L) == pytest.approx(expected, rel=1e-12)


def test_matmul_params_are_the_models_projection_weights() -> None:
    cfg = CFG.replace(pattern="M-*-M")
    model = HybridLM(cfg)
    counted = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
    assert matmul_params(cfg) == counted
    tied = cfg.replace(tie_embeddings=True)
    assert matmul_params(tied) == matmul_params(cfg)  # the shared matrix counts once, as lm_head


@pytest.mark.slow  # (FlopCounterMode imports torch._dynamo on first use: seconds)
def test_six_n_matches_pytorchs_flop_counter() -> None:
    """Without attention or Mamba layers every counted FLOP is a projection: fwd + bwd = 6 N per token."""
    cfg = CFG.replace(pattern="--")
    model = HybridLM(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 5))
    with FlopCounterMode(display=False) as counter:
        model.loss(x, x).backward()
    assert counter.get_total_flops() == train_flops_per_token(cfg, 5) * x.numel()


def test_mfu_and_peaks() -> None:
    assert mfu(20_000, 12436, 1e-3) == pytest.approx(20_000 * 12436 / 1e9)
    assert detect_peak_tflops("NVIDIA H100 80GB HBM3") == (989.4, 1978.9)
    assert detect_peak_tflops("NVIDIA H200") == (989.4, 1978.9)
    assert detect_peak_tflops("NVIDIA H100 PCIe") is None   # lower clocks: not guessed
    assert detect_peak_tflops("Tesla V100-SXM2-16GB") is None
    with pytest.raises(ValueError, match="peak_tflops"):
        mfu(1.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="seq_len"):
        train_flops_per_token(CFG, 0)
