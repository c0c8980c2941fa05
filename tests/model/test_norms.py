"""The norms against hand computations: RMSNorm, LayerNorm, and the grouped gated RMSNorm of Mamba-2
(normalised and weighted in float32, cast back once, as mamba_ssm's fused kernel does)."""

import pytest
import torch
import torch.nn.functional as F

from hybridlm.model.norms import GatedRMSNorm, LayerNorm, RMSNorm


def gated_by_hand(x, z, weight, group, eps=1e-5):
    """float64: rmsnorm over each group of `group` channels of x * silu(z), times the weight."""
    h = x.double() * F.silu(z.double())
    g = h.view(*h.shape[:-1], -1, group)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return weight.double() * g.view(h.shape)


def test_gated_norm_matches_hand_computation_in_float64():
    gen = torch.Generator().manual_seed(0)
    norm = GatedRMSNorm(32, group_size=8).double()
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=gen, dtype=torch.float64))
    x, z = torch.randn(2, 5, 32, generator=gen, dtype=torch.float64), torch.randn(2, 5, 32, generator=gen,
                                                                                   dtype=torch.float64)
    assert (norm(x, z) - gated_by_hand(x, z, norm.weight, 8)).abs().max() < 1e-6  # float32 inside


def test_gated_norm_multiplies_the_weight_in_float32_then_casts_once():
    gen = torch.Generator().manual_seed(1)
    norm = GatedRMSNorm(64, group_size=16).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(64, generator=gen))
    x = torch.randn(4, 9, 64, generator=gen).to(torch.bfloat16)
    z = torch.randn(4, 9, 64, generator=gen).to(torch.bfloat16)
    h = (x.float() * F.silu(z.float())).view(4, 9, 4, 16)
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).view(4, 9, 64)   # float32
    fp32_multiply = (norm.weight.float() * normed).to(torch.bfloat16)                  # one rounding
    cast_first = norm.weight * normed.to(torch.bfloat16)                               # two roundings
    assert not torch.equal(fp32_multiply, cast_first)  # the two orders really differ in bf16
    assert torch.equal(norm(x, z), fp32_multiply)


@pytest.mark.parametrize("cls", [RMSNorm, LayerNorm])
def test_norm_weight_multiply_in_float32(cls):
    gen = torch.Generator().manual_seed(2)
    norm = cls(48).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=gen))
    x = torch.randn(3, 7, 48, generator=gen).to(torch.bfloat16)
    xf = x.float()
    if cls is RMSNorm:
        want = norm.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
    else:
        want = F.layer_norm(xf, (48,), norm.weight.float(), norm.bias.float(), 1e-5)
    assert torch.equal(norm(x), want.to(torch.bfloat16))
