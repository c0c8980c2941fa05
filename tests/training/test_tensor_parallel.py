"""Tensor parallelism on DTensor (hybridlm.training.tensor_parallel): 2 CPU processes (torchrun, gloo)
give one process's logits and gradients; TP=2 x FSDP2=2 on 4 processes trains like one process."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hybridlm.interop.checkpoint import WEIGHTS_NAME
from hybridlm.interop.files import load_tensors
from hybridlm.training.distributed import DistEnv, build_mesh, check_mesh
from hybridlm.training.metrics import read_metrics
from hybridlm.training.tensor_parallel import (check_tensor_parallel, optim_to_canonical, optim_to_segmented,
                                               state_to_canonical, state_to_segmented)
from hybridlm.training.train_config import TrainConfig

from helpers import TESTS_DIR, small_config, small_model, torchrun

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")
TOL = 1e-5
OPTIONS = dict(qk_norm="layernorm", post_proj_norm="rmsnorm", post_fc2_norm="rmsnorm", mamba_out_norm="layernorm",
               attn_logit_softcap=3.0, attention_bias=True, mlp_bias=True, mamba_proj_bias=True, tie_embeddings=True)

# Each rank builds the same model, computes the one-process reference, then splits a copy with
# apply_tensor_parallel and computes again; rank 0 saves both (gradients gathered, canonical names).
_SCRIPT = textwrap.dedent(f"""
    import copy, json, sys
    sys.path.insert(0, {TESTS_DIR!r})
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from helpers import small_model
    from hybridlm.training import TrainConfig, train
    from hybridlm.training import distributed as D
    from hybridlm.training.tensor_parallel import apply_tensor_parallel, state_to_canonical
    dist.init_process_group("gloo")
    out = {{}}
    for name, options in json.loads(sys.argv[1]).items():
        ref = small_model(seed=0, pattern="M*-M", **options).train()
        tp = apply_tensor_parallel(copy.deepcopy(ref), init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))["tp"])
        ids = torch.randint(0, ref.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
        case = {{}}
        for key, model in (("ref", ref), ("tp", tp)):
            logits = model(ids)
            (logits.square().mean() + model.loss(ids[:, :-1], ids[:, 1:])).backward()
            grads = {{n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                     for n, p in model.named_parameters()}}
            case[key] = {{"logits": logits.detach(), "grads": state_to_canonical(grads, ref.cfg)}}
        case["exported"] = D.full_model_state(tp)  # the canonical state dict, gathered on rank 0
        case["weights"] = ref.state_dict()
        out[name] = case
    try:  # a model that does not split: refused before any data work (the data path does not exist)
        train(TrainConfig(model=sys.argv[2], data="/nonexistent/data", out=sys.argv[3] + "/bad", tp=2,
                          device="cpu", progress=False))
    except ValueError as e:
        out["bad_tp_error"] = str(e)
    if dist.get_rank() == 0:
        torch.save(out, sys.argv[3] + "/tp.pt")
    dist.destroy_process_group()
""")


@pytest.fixture(scope="module")
def tp_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import json
    root = tmp_path_factory.mktemp("tp_pair")
    bad = root / "bad.json"
    small_config(pattern="M*-M", n_heads=3, n_kv_heads=1, ffn_dim=99).save(bad)
    torchrun(_SCRIPT, root, [json.dumps({"plain": {}, "options": OPTIONS}), bad, root], nproc=2)
    return torch.load(root / "tp.pt", weights_only=False)


@pytest.mark.parametrize("case", ["plain", "options"])
def test_tp2_logits_and_gradients_equal_one_process(tp_pair: dict, case: str) -> None:
    """M, *, - layers, GQA, 2 Mamba groups; "options": every stability norm (qk_norm per head on local
    heads), softcap, biases everywhere, tied embeddings."""
    ref, tp = tp_pair[case]["ref"], tp_pair[case]["tp"]
    assert ref["logits"].dtype == torch.float32
    assert torch.allclose(tp["logits"], ref["logits"], atol=TOL, rtol=0)
    assert set(tp["grads"]) == set(ref["grads"])  # every parameter, by its canonical name
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, name  # (a real gradient reaches every parameter)
        assert torch.allclose(tp["grads"][name], g, atol=TOL, rtol=0), name


@pytest.mark.parametrize("case", ["plain", "options"])
def test_tp_model_exports_canonical_state(tp_pair: dict, case: str) -> None:
    exported, weights = tp_pair[case]["exported"], tp_pair[case]["weights"]
    assert set(exported) == set(weights)
    assert all(torch.equal(exported[k], weights[k]) for k in weights)


def test_model_that_does_not_split_is_refused_before_data(tp_pair: dict) -> None:
    msg = tp_pair["bad_tp_error"]
    assert "tp=2" in msg and "n_heads=3" in msg and "n_kv_heads=1" in msg and "ffn_dim=99" in msg
    assert "data" not in msg


def test_check_tensor_parallel_messages() -> None:
    cfg = small_config(pattern="M*-M")  # 4 heads, 2 KV heads, 8 Mamba heads in 2 groups, FFN 128
    check_tensor_parallel(cfg, 2)
    with pytest.raises(ValueError, match=r"n_kv_heads=2 is not divisible by tp=4.*n_groups=2 is not divisible"):
        check_tensor_parallel(cfg, 4)
    with pytest.raises(ValueError, match="qkv_norm"):
        check_tensor_parallel(small_config(pattern="M*-M", qkv_norm="rmsnorm"), 2)
    check_tensor_parallel(small_config(pattern="M-", n_heads=3, n_kv_heads=1), 2)  # no attention layer to split
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="tp"):
            check_tensor_parallel(cfg, bad)


def test_bad_tp_in_train_config_and_mesh() -> None:
    for kw, match in ((dict(tp=0), "tp must be"), (dict(tp=2, distributed="ddp"), "fsdp2"),
                      (dict(tp=2, precision="fp8"), "bf16")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kw)
    for world, tp in ((3, 2), (2, 4)):
        with pytest.raises(ValueError, match=f"tp={tp} must divide the world size {world}"):
            check_mesh(world, tp)
        with pytest.raises(ValueError, match=f"world size {world}"):  # before any process group is touched
            build_mesh(DistEnv("fsdp2", 0, world, 0, torch.device("cpu"), False, tp), tp)


def test_canonical_segmented_round_trip() -> None:
    model = small_model(pattern="M*-M", mamba_proj_bias=True)
    sd = model.state_dict()
    seg = state_to_segmented(sd, model.cfg)
    assert "backbone.layers.0.mixer.in_proj.weight" not in seg
    cfg = model.cfg
    assert seg["backbone.layers.0.mixer.in_proj.weight_dt"].shape == (cfg.mamba_heads, cfg.d_model)
    assert seg["backbone.layers.3.mixer.conv1d.bias_B"].shape == (cfg.n_groups * cfg.ssm_state,)
    back = state_to_canonical(seg, cfg)
    assert list(back) == list(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    osd = {"state": {k: {"step": torch.tensor(3.0), "exp_avg": v + 1} for k, v in sd.items()},
           "param_groups": [{"lr": 0.1, "params": list(sd)}]}
    oback = optim_to_canonical(optim_to_segmented(osd, cfg), cfg)
    assert oback["param_groups"] == osd["param_groups"]
    assert all(torch.equal(oback["state"][k]["exp_avg"], osd["state"][k]["exp_avg"]) for k in sd)
    with pytest.raises(ValueError, match="not a segmented state"):
        state_to_canonical({k: v for k, v in seg.items() if not k.endswith("weight_C")}, cfg)


@pytest.mark.slow
def test_tp2_x_fsdp2_training_matches_one_process(tp_runs: dict[str, Path]) -> None:
    """4 processes (dp = 2 x tp = 2) through train(): same losses, validation and final weights (float32)."""
    ref, run = tp_runs["ref"], tp_runs["tp_fsdp"]
    # the gradient norm within 1e-5 relative: torch's float32 CPU norm of a 262k-element tensor (lm_head) is
    # itself off by ~1e-5 relative, and the sharded run sums the squares of four shards instead
    for kind, key, rel in (("train", "loss", 0), ("train", "grad_norm", 1), ("val", "val_loss", 0)):
        a = {r["step"]: r[key] for r in read_metrics(run, kind)}
        b = {r["step"]: r[key] for r in read_metrics(ref, kind)}
        assert list(a) == list(b) and all(abs(a[s] - b[s]) <= TOL * (abs(b[s]) if rel else 1) for s in a), (key, a, b)
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2, 3, 4]
    w, wr = load_tensors(run / "final" / WEIGHTS_NAME), load_tensors(ref / "final" / WEIGHTS_NAME)
    assert set(w) == set(wr)  # canonical names in the export
    assert all(torch.allclose(w[k], wr[k], atol=TOL, rtol=0) for k in wr)
    assert any(not torch.equal(w[k], load_tensors(ref / "checkpoints" / "step_00000002" / WEIGHTS_NAME)[k])
               for k in wr)  # (the last steps did train)


def test_segmented_model_continues_from_a_canonical_state() -> None:
    """load_full_state translates a one-process (canonical) model + AdamW state onto segmented Mamba
    projections (as FSDP2 / TP models have them), and the next steps are those of the canonical model."""
    import copy

    from hybridlm.training.distributed import full_state, load_full_state
    from hybridlm.training.optim import build_optimizer
    from hybridlm.training.tensor_parallel import segment_mamba

    ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(2))
    plain = small_model(pattern="M*-M").train()
    seg = copy.deepcopy(plain)
    segment_mamba(seg)
    opts = [build_optimizer(m, 1e-2, 0.1) for m in (plain, seg)]
    plain.loss(ids[:, :-1], ids[:, 1:]).backward()
    opts[0].step()
    opts[0].zero_grad()
    load_full_state(seg, opts[1], *copy.deepcopy(full_state(plain, opts[0])))  # (as if read from files)
    for _ in range(2):
        for model, opt in zip((plain, seg), opts):
            model.loss(ids[:, :-1], ids[:, 1:]).backward()
            opt.step()
            opt.zero_grad()
    a, b = full_state(plain, opts[0]), full_state(seg, opts[1])
    assert set(a[0]) == set(b[0]) and all(torch.allclose(a[0][k], b[0][k], atol=1e-6, rtol=0) for k in a[0])
    assert all(torch.equal(a[1]["state"][k]["step"], b[1]["state"][k]["step"]) for k in a[1]["state"])


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_segmenting_keeps_the_math_and_the_recipe(precision: str) -> None:
    """segment_mamba (FSDP2 / TP models) leaves the logits bit-identical: the projections run their own
    forward (a low-precision in_proj keeps quantizing its GEMMs) on the concatenated segments."""
    import copy

    from hybridlm.lowp.linear import apply_recipe
    from hybridlm.training.tensor_parallel import is_segmented, segment_mamba

    model = small_model(pattern="M*-M", mamba_proj_bias=True)
    apply_recipe(model, precision, "none")
    seg = copy.deepcopy(model)
    segment_mamba(seg)
    assert is_segmented(seg) and not is_segmented(model)
    in_proj, seg_in_proj = model.backbone.layers[0].mixer.in_proj, seg.backbone.layers[0].mixer.in_proj
    assert isinstance(seg_in_proj, type(in_proj)) and torch.equal(seg_in_proj.weight, in_proj.weight)
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(seg(ids), model(ids))
