"""Mamba numerics at the mechanism: pads are identity steps (dt = 0) and leave the conv window
for any padding (right, holes, on a non-empty cache); the dt path stays float32 under bf16."""

import pytest
import torch

from hybridlm.model.cache import MambaState

from helpers import small_model


def states(cache, row):
    return [(s.conv[row].clone(), s.ssm[row].clone()) for s in cache.layers if isinstance(s, MambaState)]


def assert_same_states(got, want, tol=1e-5):
    for (c1, s1), (c2, s2) in zip(got, want):
        assert (c1 - c2).abs().max() < tol and (s1 - s2).abs().max() < tol


def test_right_padding_leaves_state_and_continuation_unchanged():
    model = small_model(seed=11, mamba_proj_bias=True)
    gen = torch.Generator().manual_seed(11)
    a, b = torch.randint(0, 97, (1, 12), generator=gen), torch.randint(0, 97, (1, 7), generator=gen)
    ids = torch.zeros(2, 12, dtype=torch.long)
    ids[0], ids[1, :7] = a[0], b[0]
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 7:] = False  # right padding
    with torch.inference_mode():
        batched = model.new_cache(2)
        out = model(ids, batched, attention_mask=mask)
        alone = model.new_cache(1)
        ref = model(b, alone)
        assert (out[1, :7] - ref[0]).abs().max() < 1e-4
        assert_same_states(states(batched, 1), states(alone, 0))
        nxt = torch.tensor([[8], [9]])
        assert (model(nxt, batched)[1, 0] - model(nxt[1:], alone)[0, 0]).abs().max() < 1e-4


@pytest.mark.parametrize("chunk_mask", [[False, False, True, True, True],   # left pads
                                        [True, False, True, False, True],   # holes
                                        [True, True, True, False, False]])  # right pads
def test_masked_call_on_a_non_empty_cache(chunk_mask):
    """Prefix, then a chunk with pads: the same as the prefix followed by the chunk's real tokens alone."""
    model = small_model(seed=12, mamba_proj_bias=True)
    gen = torch.Generator().manual_seed(12)
    prefix, chunk = torch.randint(0, 97, (1, 9), generator=gen), torch.randint(0, 97, (1, 5), generator=gen)
    mask = torch.tensor([chunk_mask])
    with torch.inference_mode():
        padded = model.new_cache(1)
        model(prefix, padded)
        out = model(chunk, padded, attention_mask=mask)
        plain = model.new_cache(1)
        model(prefix, plain)
        ref = model(chunk[mask][None], plain)
        assert (out[0][mask[0]] - ref[0]).abs().max() < 1e-4
        assert_same_states(states(padded, 0), states(plain, 0))
        nxt = torch.tensor([[4]])
        assert (model(nxt, padded) - model(nxt, plain)).abs().max() < 1e-4


def test_pads_are_identity_steps_of_the_ssm():
    """All-pad calls: the SSM state and the conv window do not move at all (dt = 0, no conv input)."""
    model = small_model(seed=13)
    with torch.inference_mode():
        cache = model.new_cache(1)
        model(torch.randint(0, 97, (1, 6)), cache)
        before = states(cache, 0)
        for length in (1, 3, 20):  # a decode-sized call, a short and a multi-chunk one
            model(torch.randint(0, 97, (1, length)), cache, attention_mask=torch.zeros(1, length, dtype=torch.bool))
        assert_same_states(states(cache, 0), before, tol=1e-30)


def test_dt_is_float32_under_bf16_autocast():
    """dt + dt_bias in bf16 would round the bias (up to ~1.6 % dt error): the dt path stays float32."""
    model = small_model(seed=14)
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        mixer.dt_bias.copy_(torch.linspace(-3.0, 1.0, mixer.dt_bias.numel()) + 1e-3)
        raw = torch.randn(3, 5, model.cfg.mamba_heads)
        ref = torch.nn.functional.softplus(raw + mixer.dt_bias).clamp(*model.cfg.time_step_limit)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mixer._dt(raw.bfloat16())
    assert got.dtype == torch.float32
    assert ((got - ref).abs() / ref).max() < 1e-2 * 0.5  # only raw's own bf16 rounding is left
    assert ((got - torch.nn.functional.softplus(raw.bfloat16().float() + mixer.dt_bias)
             .clamp(*model.cfg.time_step_limit)).abs()).max() == 0


def test_bf16_decode_equals_bf16_forward_and_tracks_fp32():
    model = small_model(seed=15)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(15))
    with torch.inference_mode():
        fp32 = model(ids)
        bf16 = small_model(seed=15).to(torch.bfloat16)
        full = bf16(ids).float()
        cache = bf16.new_cache(2)
        steps = [bf16(ids[:, :8], cache)] + [bf16(ids[:, t:t + 1], cache) for t in range(8, 20)]
        decoded = torch.cat(steps, dim=1).float()
    scale = fp32.abs().max()
    assert (decoded - full).abs().max() < 0.02 * scale    # same bf16 model, two algorithms
    assert (full - fp32).abs().max() < 0.05 * scale       # bf16 vs fp32
    assert (decoded.argmax(-1) == full.argmax(-1)).float().mean() > 0.9
