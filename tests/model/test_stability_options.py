"""Training-stability options of the model: the norm placements and logit capping against hand
computations, the explicit attention path against SDPA, decode == forward and left padding with the
options on, and config / checkpoint / HF-export handling."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import load_model, save_model
from hybridlm.interop.hf_config import hybrid_to_hf_config
from hybridlm.model import HybridLM
from hybridlm.model.attention import attention_mask, explicit_attention

from helpers import ALL_ON, head_out, ids_for, left_padded_pair, norm_of, one_layer, rms, small_config


def attention_by_hand(model, ids):
    """Logits of a one-layer `*` model: every option applied step by step with plain tensor ops."""
    cfg, blk = model.cfg, model.backbone.layers[0]
    att = blk.mixer
    x = model.backbone.embeddings.weight[ids]                             # (b, l, d)
    h = x if cfg.qkv_norm != "none" else rms(x, blk.norm.weight)          # qkv_norm removes the pre-norm
    q, k, v = (F.linear(h, m.weight) for m in (att.q_proj, att.k_proj, att.v_proj))
    if cfg.qkv_norm != "none":
        qkv = norm_of(att.qkv_norm, torch.cat([q, k, v], -1))
        q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], -1)
    b, l, _ = x.shape
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    q, k, v = q.view(b, l, nh, hd), k.view(b, l, nkv, hd), v.view(b, l, nkv, hd)
    if cfg.qk_norm != "none":
        q, k = norm_of(att.q_norm, q), norm_of(att.k_norm, k)
    out = torch.zeros(b, l, nh, hd, dtype=x.dtype)
    for head in range(nh):
        kv = head // (nh // nkv)
        s = torch.einsum("bid,bjd->bij", q[:, :, head], k[:, :, kv]) / math.sqrt(hd)
        if cfg.attn_logit_softcap:
            s = cfg.attn_logit_softcap * torch.tanh(s / cfg.attn_logit_softcap)
        s = s.masked_fill(torch.ones(l, l).triu(1).bool(), -math.inf)
        out[:, :, head] = torch.einsum("bij,bjd->bid", s.softmax(-1), v[:, :, kv])
    y = F.linear(out.reshape(b, l, -1), att.o_proj.weight)
    if cfg.post_proj_norm != "none":
        y = norm_of(att.post_proj_norm, y)
    return head_out(model, x + y)


def mlp_by_hand(model, ids):
    blk = model.backbone.layers[0]
    x = model.backbone.embeddings.weight[ids]
    y = F.linear(torch.relu(F.linear(rms(x, blk.norm.weight), blk.mixer.up_proj.weight)).square(),
                 blk.mixer.down_proj.weight)
    if model.cfg.post_fc2_norm != "none":
        y = norm_of(blk.mixer.post_fc2_norm, y)
    return head_out(model, x + y)


@pytest.mark.parametrize("options", [
    {},
    {"qk_norm": "layernorm"},
    {"qk_norm": "rmsnorm"},
    {"qkv_norm": "layernorm"},
    {"qkv_norm": "rmsnorm", "qk_norm": "layernorm"},
    {"post_proj_norm": "layernorm"},
    {"attn_logit_softcap": 0.7},
    {"qk_norm": "layernorm", "attn_logit_softcap": 1.5, "post_proj_norm": "rmsnorm"},
])
def test_attention_options_match_hand_computation(options):
    model = one_layer("*", **options)
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - attention_by_hand(model, ids)).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["none", "rmsnorm", "layernorm"])
def test_post_fc2_norm_matches_hand_computation(kind):
    model = one_layer("-", post_fc2_norm=kind)
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - mlp_by_hand(model, ids)).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["rmsnorm", "layernorm"])
def test_mamba_out_norm_is_a_norm_after_out_proj(kind):
    """Same weights without the option: the residual update becomes norm(out_proj output)."""
    model = one_layer("M", mamba_out_norm=kind)
    plain = HybridLM(model.cfg.replace(mamba_out_norm="none")).double().eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "out_norm" not in k})
    seen = {}
    plain.backbone.layers[0].mixer.out_proj.register_forward_hook(lambda m, i, o: seen.update(y=o))
    ids = ids_for(model)
    with torch.no_grad():
        plain(ids)
        x = model.backbone.embeddings.weight[ids]
        want = head_out(model, x + norm_of(model.backbone.layers[0].mixer.out_norm, seen["y"]))
        assert (model(ids) - want).abs().max() < 1e-6


def test_qkv_norm_removes_the_attention_pre_norm_only():
    model = HybridLM(small_config(qkv_norm="layernorm"))
    for i, (kind, blk) in enumerate(zip(model.cfg.layer_kinds(), model.backbone.layers)):
        assert (blk.norm is None) == (kind == "attention")
        assert (f"backbone.layers.{i}.norm.weight" in model.state_dict()) == (kind != "attention")
    n_qkv = (model.cfg.n_heads + 2 * model.cfg.n_kv_heads) * model.cfg.head_dim
    assert model.backbone.layers[1].mixer.qkv_norm.weight.shape == (n_qkv,)


def test_options_off_keep_parameter_names_and_count():
    base = HybridLM(small_config())
    names = set(base.state_dict())
    assert not any("q_norm" in n or "post_" in n or "out_norm" in n for n in names)
    on = HybridLM(small_config(**ALL_ON))
    assert names <= set(on.state_dict())  # existing weights keep their names
    new = sorted(set(on.state_dict()) - names)
    assert new and all(n.rsplit(".", 2)[-2] in ("q_norm", "k_norm", "post_proj_norm", "post_fc2_norm", "out_norm")
                       for n in new)


# ---- softcap / explicit attention vs SDPA ------------------------------------------------
@pytest.mark.parametrize("case", ["causal", "padded", "cached", "decode"])
def test_explicit_attention_equals_sdpa(case):
    gen = torch.Generator().manual_seed(0)
    b, h, hk, d = 2, 4, 2, 8
    lq, lk = {"causal": (7, 7), "padded": (7, 7), "cached": (3, 10), "decode": (1, 9)}[case]
    q = torch.randn(b, h, lq, d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, hk, lk, d, generator=gen, dtype=torch.float64) for _ in range(2))
    valid = torch.ones(b, lk, dtype=torch.bool)
    if case == "padded":
        valid[1, :3] = False
    mask = attention_mask(lq, valid)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out, max_logit = explicit_attention(q, k, v, mask)
    assert (out - ref).abs().max() < 1e-12
    scores = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(2, 1)) / math.sqrt(d)
    assert abs(float(max_logit) - float(scores.masked_fill(~mask, -math.inf).max())) < 1e-12
    huge, _ = explicit_attention(q, k, v, mask, cap=1e7)
    assert (huge - ref).abs().max() < 1e-6
    capped, _ = explicit_attention(q, k, v, mask, cap=0.5)
    assert (capped - ref).abs().max() > 1e-3  # a small cap really changes the attention


def test_huge_softcap_equals_no_cap_in_the_model():
    model = one_layer("M*-", attn_logit_softcap=1e7)
    plain = HybridLM(model.cfg.replace(attn_logit_softcap=0.0)).double().eval()
    plain.load_state_dict(model.state_dict())
    ids = ids_for(model)
    with torch.no_grad():
        assert (model(ids) - plain(ids)).abs().max() < 1e-6


@pytest.mark.parametrize("options", [ALL_ON, {"qkv_norm": "rmsnorm", "attn_logit_softcap": 1.0}])
def test_decode_equals_forward_with_options_on(options):
    model = one_layer("M*-M-*M", seed=3, **options)
    ids = ids_for(model, b=2, l=21, seed=4)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, capacity=4)  # the KV cache has to grow
        steps = [model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache) for t in range(6, 21)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-6


def test_left_padding_with_options_on():
    model = one_layer("M*-M-*M", seed=5, **ALL_ON)
    a, b, ids, mask = left_padded_pair(13, 8, seed=5)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask)
        assert (batched[1, 5:] - model(b)[0]).abs().max() < 1e-6
        assert (batched[0] - model(a)[0]).abs().max() < 1e-6


# ---- config, checkpoints, HF ----------------------------------------------------------
def test_config_defaults_validation_and_round_trip(tmp_path):
    assert HybridConfig().stability_options() == {}
    for bad, match in [({"qk_norm": "batchnorm"}, "qk_norm"), ({"post_fc2_norm": True}, "post_fc2_norm"),
                       ({"attn_logit_softcap": -1.0}, "attn_logit_softcap"),
                       ({"attn_logit_softcap": math.inf}, "attn_logit_softcap")]:
        with pytest.raises(ValueError, match=match):
            HybridConfig(**bad)
    cfg = small_config(**ALL_ON, qkv_norm="rmsnorm")
    assert HybridConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = cfg.to_dict()
    for name in ("qk_norm", "qkv_norm", "post_proj_norm", "post_fc2_norm", "mamba_out_norm", "attn_logit_softcap"):
        del old[name]  # a config.json written before these fields existed
    assert HybridConfig.from_dict(old).stability_options() == {}
    model = one_layer("M*-", **ALL_ON).float()
    save_model(model, tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt")
    ids = ids_for(model)
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_hf_export_refuses_stability_options():
    hybrid_to_hf_config(small_config())  # still fine with everything off
    for name, value in [("qk_norm", "layernorm"), ("qkv_norm", "rmsnorm"), ("mamba_out_norm", "layernorm"),
                        ("attn_logit_softcap", 30.0)]:
        with pytest.raises(ValueError, match=name):
            hybrid_to_hf_config(small_config(**{name: value}))
