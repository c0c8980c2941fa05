"""The hybrid model: decode == forward, padding, cache sizes, parameter counts, input checks."""

import pytest
import torch

from hybridlm.config import PUBLISHED_PARAMS, HybridConfig, preset
from hybridlm.model import HybridLM, count_params

from helpers import left_padded_pair, small_model


@pytest.mark.parametrize("prefill", [1, 5, 8, 13])
def test_prefill_then_decode_equals_full_forward(prefill):
    model = small_model()
    ids = torch.randint(0, 97, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(3, capacity=4)  # forces the KV cache to grow
        steps = [model(ids[:, :prefill], cache)]
        steps += [model(ids[:, t:t + 1], cache) for t in range(prefill, 29)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


def test_chunked_prefill_continuation():
    """Prefill in pieces (several tokens at a time) also continues the state exactly."""
    model = small_model(seed=2)
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2)
        parts = [model(ids[:, a:b], cache) for a, b in [(0, 11), (11, 27), (27, 40)]]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-4


def test_left_padding_does_not_change_real_tokens():
    model = small_model(seed=3, mamba_proj_bias=True)
    a, b, ids, mask = left_padded_pair(17, 9, seed=3)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        assert (batched[0] - model(a)[0]).abs().max() < 1e-4
        assert (batched[1, 8:] - model(b)[0]).abs().max() < 1e-4
        # and decoding after the padded prefill
        cache = model.new_cache(2)
        model(ids, cache, attention_mask=mask)
        nxt = torch.tensor([[5], [6]])
        step = model(nxt, cache)
        ref_b = model(torch.cat([b, nxt[1:]], dim=1))[0, -1]
    assert (step[1, 0] - ref_b).abs().max() < 1e-4


def test_mamba_state_is_constant_size_and_kv_grows():
    model = small_model()
    sizes = []
    for length in (10, 100):
        cache = model.new_cache(1, capacity=8)
        with torch.no_grad():
            model(torch.randint(0, 97, (1, length)), cache)
        sizes.append(cache.nbytes())
    assert sizes[0]["mamba"] == sizes[1]["mamba"] > 0
    assert sizes[1]["attention"] == 10 * sizes[0]["attention"]


def test_backward_gives_finite_grads_everywhere():
    model = small_model().train()
    ids = torch.randint(0, 97, (2, 20))
    loss = model.loss(ids[:, :-1], ids[:, 1:])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_tied_embeddings_share_storage():
    model = HybridLM(preset("tiny", tie_embeddings=True))
    assert model.lm_head.weight is model.backbone.embeddings.weight
    untied = HybridLM(preset("tiny"))
    assert untied.num_params() - model.num_params() == 4096 * 256


def hand_count(cfg: HybridConfig) -> int:
    """Parameter count written out from the architecture description (no biases)."""
    d, v = cfg.d_model, cfg.vocab_size
    di, h, gn = cfg.mamba_heads * cfg.mamba_head_dim, cfg.mamba_heads, cfg.n_groups * cfg.ssm_state
    conv_dim = di + 2 * gn
    mamba = d * (2 * di + 2 * gn + h) + conv_dim * (cfg.conv_kernel + 1) + 3 * h + di + di * d
    attn = d * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 2 * d * cfg.ffn_dim
    per = {"M": mamba, "*": attn, "-": mlp}
    return sum(per[c] + d for c in cfg.pattern) + d + v * d * (1 if cfg.tie_embeddings else 2)


@pytest.mark.parametrize("name", ["tiny", "nemotron-h-8b", "nemotron-h-56b", "nemotron-nano-12b-v2",
                                  "nemotron-nano-9b-v2"])
def test_param_count_matches_hand_formula(name):
    cfg = preset(name)
    assert count_params(cfg) == hand_count(cfg)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_within_2pct_of_published(name):
    n = count_params(preset(name))
    assert abs(n - PUBLISHED_PARAMS[name]) / PUBLISHED_PARAMS[name] < 0.02


def test_preset_layouts_match_papers():
    assert [preset("nemotron-h-8b").count(k) for k in ("mamba", "mlp", "attention")] == [24, 24, 4]
    assert [preset("nemotron-h-56b").count(k) for k in ("mamba", "mlp", "attention")] == [54, 54, 10]
    assert [preset("nemotron-nano-12b-v2").count(k) for k in ("mamba", "mlp", "attention")] == [28, 28, 6]
    assert preset("nemotron-nano-9b-v2").n_layers == 56
    for name in ("nemotron-h-8b", "nemotron-h-56b", "nemotron-nano-12b-v2"):
        assert preset(name).pattern[0] == "M"


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(5, dtype=torch.long), "batch, length"),
    (torch.zeros(1, 5), "integer token ids"),
    (torch.full((1, 5), 97), r"\[0, 97\)"),
    (torch.full((1, 5), -1), r"\[0, 97\)"),
])
def test_bad_input_ids(bad, match):
    with pytest.raises(ValueError, match=match):
        small_model()(bad)


def test_bad_attention_mask_shape():
    with pytest.raises(ValueError, match="attention_mask shape"):
        small_model()(torch.zeros(2, 5, dtype=torch.long), attention_mask=torch.ones(2, 4, dtype=torch.bool))


def test_param_matched_twin():
    from hybridlm.model.info import param_matched_twin
    cfg = preset("tiny")
    twin = param_matched_twin(cfg)
    assert "M" not in twin.pattern and twin.count("attention") == cfg.count("attention") + cfg.count("mamba")
    assert abs(count_params(twin) - count_params(cfg)) / count_params(cfg) < 0.001
    with pytest.raises(ValueError, match="no MLP layer"):
        param_matched_twin(preset("tiny", pattern="M*M*"))
