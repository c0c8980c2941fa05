"""Compression: importance scores, width/depth pruning, logit distillation, the memory planner, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from hybridlm.cli import main
from hybridlm.compress.distill import DISTILL_FILE, DistillConfig, DistillObjective, distill
from hybridlm.compress.importance import calibration_batches, compute_importance
from hybridlm.compress.kl import kd_loss
from hybridlm.compress.planner import activation_bytes, max_context, memory_plan, parse_bytes, search_architecture
from hybridlm.compress.pruning import PruneSpec, param_count, parse_target, prune_model, pruned_config
from hybridlm.compress.search import calibration_kl, search_spec
from hybridlm.config import HybridConfig, preset
from hybridlm.interop.checkpoint import load_model, save_model
from hybridlm.model import HybridLM, count_params
from hybridlm.training.dataset import TokenDataset
from hybridlm.training.metrics import read_metrics
from hybridlm.training.train_config import TrainConfig

from helpers import TINY_MODEL, small_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(vocab: int = 97, n: int = 2, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (3, 20), generator=g), torch.randint(0, vocab, (3, 20), generator=g))
            for _ in range(n)]


def _decode_matches_forward(model: HybridLM, vocab: int) -> None:
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, capacity=4)
        steps = [model(ids[:, :6], cache)] + [model(ids[:, t:t + 1], cache) for t in range(6, 19)]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize("overrides", [
    {}, dict(mlp_bias=True, attention_bias=True, mamba_proj_bias=True, tie_embeddings=True),
    dict(conv_bias=False, qk_norm="rmsnorm", post_fc2_norm="layernorm", mamba_out_norm="rmsnorm"),
    dict(qkv_norm="layernorm", post_proj_norm="rmsnorm"),
])
def test_param_count_equals_the_model(overrides):
    cfg = small_model(**overrides).cfg
    assert param_count(cfg) == count_params(cfg)
    assert param_count(preset("nemotron-nano-12b-v2")) == count_params(preset("nemotron-nano-12b-v2"))


def test_parse_target():
    assert parse_target("0.7x", 1000) == 700 and parse_target("70%", 1000) == 700
    assert parse_target("3.2M", 1) == 3_200_000 and parse_target("9B", 1) == 9_000_000_000
    assert parse_target("4500", 1) == 4500
    for bad in ("abc", "-1x", "0"):
        with pytest.raises(ValueError, match="target-params"):
            parse_target(bad, 1000)


# ------------------------------------------------------------------ importance


def test_zeroed_units_have_zero_minimal_importance():
    model = small_model()
    cfg = model.cfg
    with torch.no_grad():
        for blk in model.backbone.layers:  # embedding channel 5: zero in every residual-stream norm
            blk.norm.weight[5] = 0
        model.backbone.norm_f.weight[5] = 0
        mlp, attn, mamba = (model.backbone.layers[i].mixer for i in (2, 1, 0))  # pattern M*-M-*M
        mlp.up_proj.weight[17] = 0                                               # FFN neuron 17
        attn.v_proj.weight[cfg.head_dim:2 * cfg.head_dim] = 0                    # KV head 1 = query heads 2, 3
        p = cfg.mamba_head_dim
        mamba.norm.weight[3 * p:4 * p] = 0                                       # Mamba head 3
    imp = compute_importance(model, _batches(), depth=False)
    assert imp.embedding[5] == 0 and int(imp.embedding.argmin()) == 5 and (imp.embedding > 0).sum() == cfg.d_model - 1
    assert imp.ffn[2][17] == 0 and int(imp.ffn[2].argmin()) == 17
    assert imp.attention[1][2] == 0 and imp.attention[1][3] == 0 and imp.attention[1][:2].min() > 0
    assert imp.mamba[0][3] == 0 and (imp.mamba[0] > 0).sum() == cfg.mamba_heads - 1
    assert sorted(imp.ffn) == [2, 4] and sorted(imp.attention) == [1, 5] and sorted(imp.mamba) == [0, 3, 6]


def test_depth_importance_is_the_loss_and_kl_of_skipping():
    model = small_model()
    with torch.no_grad():
        model.backbone.layers[4].mixer.down_proj.weight.zero_()  # an MLP layer that writes nothing
    batches = _batches()
    imp = compute_importance(model, batches)
    assert imp.depth_kl[4] == pytest.approx(0, abs=1e-9) and int(imp.depth_kl.argmin()) == 4
    assert (imp.depth_kl[[0, 1, 2, 3, 5, 6]] > 0).all()
    # an independent reference for one layer: the model rebuilt without layer 0
    ref = HybridLM(pruned_config(model.cfg, PruneSpec(**{**PruneSpec.identity(model.cfg).to_dict(),
                                                          "drop_layers": (0,)})))
    sd = {k.replace(f"layers.{i}.", f"layers.{i - 1}."): v for k, v in model.state_dict().items()
          for i in [int(k.split(".")[2]) if k.startswith("backbone.layers.") else 99] if i != 0}
    ref.load_state_dict(sd)
    with torch.no_grad():
        loss = sum(float(ref.eval().loss(x, y)) for x, y in batches) / len(batches)
        kl = sum(float(kd_loss(ref(x), model(x))) for x, _ in batches) / len(batches)
    assert imp.depth_loss[0] == pytest.approx(loss, rel=1e-5) and imp.depth_kl[0] == pytest.approx(kl, rel=1e-4)
    with torch.no_grad():
        assert imp.base_loss == pytest.approx(sum(float(model.loss(x, y)) for x, y in batches) / 2, rel=1e-6)


def test_importance_json_round_trip(tmp_path):
    imp = compute_importance(small_model(), _batches(n=1))
    imp.save(tmp_path / "imp.json")
    back = type(imp).load(tmp_path / "imp.json")
    assert torch.allclose(back.embedding, imp.embedding) and torch.allclose(back.depth_kl, imp.depth_kl)
    assert back.mamba.keys() == imp.mamba.keys() and back.pattern == imp.pattern


# ------------------------------------------------------------------ pruning


def test_target_equal_to_the_original_size_is_the_identity():
    model = small_model()
    batches = _batches()
    imp = compute_importance(model, batches)
    spec, _ = search_spec(model.cfg, imp, param_count(model.cfg), "both", model=model, batches=batches)
    assert spec == PruneSpec.identity(model.cfg)
    pruned = prune_model(model, imp, spec)
    assert pruned.cfg == model.cfg
    x = batches[0][0]
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))


def test_removing_dead_units_keeps_the_logits():
    """FFN neurons, KV groups and a layer that contribute nothing: importance 0, and pruning
    exactly them leaves the function unchanged (checks the importance ranking and every slice)."""
    model = small_model(seed=1)
    cfg = model.cfg
    with torch.no_grad():
        for i in (2, 4):
            model.backbone.layers[i].mixer.up_proj.weight[[3, 40, 77, 100]] = 0
        for i in (1, 5):
            model.backbone.layers[i].mixer.v_proj.weight[:cfg.head_dim] = 0  # KV head 0 -> query heads 0, 1
        model.backbone.layers[4].mixer.down_proj.weight.zero_()
    batches = _batches()
    imp = compute_importance(model, batches)
    spec = PruneSpec(cfg.d_model, cfg.ffn_dim - 4, cfg.mamba_heads, 2, 1, drop_layers=(4,))
    pruned = prune_model(model, imp, spec)
    assert pruned.cfg.pattern == "M*-M*M" and pruned.cfg.n_heads == 2 and pruned.cfg.ffn_dim == cfg.ffn_dim - 4
    assert torch.equal(pruned.backbone.layers[1].mixer.k_proj.weight, model.backbone.layers[1].mixer.k_proj.weight[16:])
    with torch.no_grad():
        for x, _ in batches:
            assert (pruned(x) - model(x)).abs().max() < 1e-5


def test_mamba_head_pruning_keeps_each_head_path():
    """Group-aware Mamba pruning: the kept heads' SSD outputs and gates (inputs of the gated
    norm) are exactly the original ones, and the kept heads stay in their B/C group."""
    model = small_model(seed=2, n_groups=2)
    cfg = model.cfg  # 8 heads, 2 groups
    imp = compute_importance(model, _batches(), depth=False)
    pruned = prune_model(model, imp, PruneSpec(cfg.d_model, cfg.ffn_dim, 4, cfg.n_heads, cfg.n_kv_heads))
    seen = {}

    def grab(name):
        return lambda mod, args: seen.__setitem__(name, args)
    h1 = model.backbone.layers[0].mixer.norm.register_forward_pre_hook(grab("full"))
    h2 = pruned.backbone.layers[0].mixer.norm.register_forward_pre_hook(grab("pruned"))
    x = _batches(n=1)[0][0]
    with torch.no_grad():
        model(x), pruned(x)
    h1.remove(), h2.remove()
    scores = imp.mamba[0]
    kept = torch.cat([g * 4 + scores[g * 4:(g + 1) * 4].argsort(descending=True)[:2].sort().values for g in range(2)])
    ch = (kept[:, None] * cfg.mamba_head_dim + torch.arange(cfg.mamba_head_dim)).flatten()
    for full_t, pruned_t in zip(seen["full"], seen["pruned"]):  # (y, z)
        assert torch.allclose(pruned_t, full_t[..., ch], atol=1e-6)


@pytest.mark.parametrize("spec_kw,overrides", [
    (dict(d_model=48, ffn_dim=96, mamba_heads=4), {}),                           # width
    (dict(drop_layers=(1, 3)), {}),                                            # depth
    (dict(d_model=40, ffn_dim=64, mamba_heads=4, n_heads=2, n_kv_heads=1, drop_layers=(2,)), {}),  # both + GQA
    (dict(mamba_heads=6, n_heads=2, n_kv_heads=2), dict(n_groups=2)),          # 3 of 4 heads per group; 1 q per kv
    (dict(d_model=48, mamba_heads=4, drop_layers=(0,)), dict(tie_embeddings=True, n_groups=4)),
    (dict(d_model=40, ffn_dim=64, mamba_heads=4, n_heads=2),                   # stability norms + biases
     dict(qkv_norm="layernorm", post_fc2_norm="rmsnorm", mamba_out_norm="layernorm", qk_norm="rmsnorm",
          mlp_bias=True, attention_bias=True, mamba_proj_bias=True)),
])
def test_pruned_models_are_valid(spec_kw, overrides, tmp_path):
    model = small_model(**overrides)
    imp = compute_importance(model, _batches())
    spec = PruneSpec(**{**PruneSpec.identity(model.cfg).to_dict(), **spec_kw})
    pruned = prune_model(model, imp, spec)
    assert pruned.num_params() == count_params(pruned.cfg) == param_count(pruned.cfg) < model.num_params()
    if pruned.cfg.tie_embeddings:
        assert pruned.lm_head.weight is pruned.backbone.embeddings.weight
    _decode_matches_forward(pruned, 97)
    save_model(pruned, tmp_path / "p")
    back = load_model(tmp_path / "p")
    x = _batches(n=1)[0][0]
    with torch.no_grad():
        assert torch.equal(back(x), pruned(x))
    loss = back.train().loss(*_batches(n=1)[0])  # trains like any other model
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in back.parameters())


@pytest.mark.parametrize("kw,match", [
    (dict(d_model=80), "d_model must be an integer in"),
    (dict(mamba_heads=5), "multiple of n_groups"),
    (dict(n_heads=3), "multiple of n_kv_heads"),
    (dict(drop_layers=(9,)), "drop_layers"),
    (dict(drop_layers=tuple(range(7))), "cannot drop all"),
])
def test_impossible_specs_are_rejected(kw, match):
    cfg = small_model().cfg
    with pytest.raises(ValueError, match=match):
        pruned_config(cfg, PruneSpec(**{**PruneSpec.identity(cfg).to_dict(), **kw}))


@pytest.mark.parametrize("axes", ["width", "depth", "both"])
def test_search_meets_the_target(axes):
    model = small_model()
    batches = _batches()
    imp = compute_importance(model, batches)
    target = int(0.75 * param_count(model.cfg))
    spec, table = search_spec(model.cfg, imp, target, axes, tolerance=0.15, model=model, batches=batches, n_eval=3)
    n = param_count(pruned_config(model.cfg, spec))
    assert 0.85 * target <= n <= target
    assert (spec.drop_layers == ()) == (axes == "width")
    assert (spec.d_model == model.cfg.d_model) or axes != "depth"
    evaluated = [r for r in table if "kl" in r]
    assert evaluated and table[0]["kl"] == min(r["kl"] for r in evaluated)
    assert table[0]["kl"] == pytest.approx(calibration_kl(model, prune_model(model, imp, spec), batches))
    with pytest.raises(ValueError, match="no width pruning"):
        search_spec(model.cfg, imp, 1000, "width")


def test_search_mixed_and_fixed_depth():
    model = small_model()
    imp = compute_importance(model, _batches())
    target = int(0.75 * param_count(model.cfg))
    spec, _ = search_spec(model.cfg, imp, target, "mixed", tolerance=0.15)
    assert spec.drop_layers and spec.d_model * spec.ffn_dim * spec.mamba_heads < 64 * 128 * 8
    spec, _ = search_spec(model.cfg, imp, target, "both", tolerance=0.15, n_drop=1)
    assert spec.drop_layers == (int(imp.depth_kl.argmin()),)
    with pytest.raises(ValueError, match="n_drop"):
        search_spec(model.cfg, imp, target, "width", n_drop=1)


# ------------------------------------------------------------------ distillation


def test_kd_loss_matches_reference_and_is_zero_for_the_teacher():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    T = 2.0
    pt, ps = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
    ref = (pt * (pt.log() - ps.log())).sum(-1).mean() * T ** 2
    assert kd_loss(s, t, T) == pytest.approx(float(ref), rel=1e-5)
    teacher = small_model()
    student = copy.deepcopy(teacher).train()
    x, y = _batches(n=1)[0]
    loss = DistillObjective(teacher, temperature=2.0)(student, x, y)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    assert max(float(p.grad.abs().max()) for p in student.parameters()) < 1e-7
    mixed = DistillObjective(teacher, 1.0, alpha=0.25)(student, x, y)
    assert float(mixed.detach()) == pytest.approx(0.75 * float(student.loss(x, y).detach()), rel=1e-5)


@pytest.mark.slow
def test_distill_lowers_the_kl_and_resumes(tmp_path, small_shards):
    torch.manual_seed(0)
    teacher = HybridLM(HybridConfig(**TINY_MODEL)).eval()
    save_model(teacher, tmp_path / "teacher")
    batches = calibration_batches(TokenDataset(small_shards, "val"), 8, 32, 4)
    imp = compute_importance(teacher, batches)
    student = prune_model(teacher, imp, PruneSpec(40, 64, 2, 2, 1))
    save_model(student, tmp_path / "student")
    kl_before = calibration_kl(teacher, student, batches)
    tc = TrainConfig(model=str(tmp_path / "student"), init_from=str(tmp_path / "student"), data=str(small_shards),
                     out=str(tmp_path / "run"), steps=12, batch_size=4, seq_len=32, lr=3e-3, min_lr=3e-4,
                     warmup_steps=2, eval_every=6, eval_batches=2, save_every=6, log_every=1, progress=False,
                     device="cpu", stop_at=6)
    dc = DistillConfig(teacher=str(tmp_path / "teacher"), temperature=1.0)
    distill(tc, dc)
    val0 = read_metrics(tmp_path / "run", "val")[0]
    from hybridlm.training.distributed import DistEnv
    from hybridlm.training.loop import evaluate
    env = DistEnv("none", 0, 1, 0, torch.device("cpu"), False)
    assert val0["val_loss"] == pytest.approx(evaluate(student, TokenDataset(small_shards, "val"), 4, 32, 2, env))
    assert json.loads((tmp_path / "run" / DISTILL_FILE).read_text())["temperature"] == 1.0
    with pytest.raises(ValueError, match="temperature"):
        distill(TrainConfig(**{**tc.to_dict(), "resume": True, "stop_at": None}), DistillConfig(dc.teacher, 2.0))
    s = distill(TrainConfig(**{**tc.to_dict(), "resume": True, "stop_at": None}), dc)
    assert s["step"] == 12
    kl_after = calibration_kl(teacher, load_model(tmp_path / "run" / "final"), batches)
    assert kl_after < 0.8 * kl_before


def test_init_from_needs_the_same_config(tmp_path, small_shards):
    save_model(small_model(), tmp_path / "ck")
    from hybridlm.training.loop import train
    with pytest.raises(ValueError, match="init_from"):
        train(TrainConfig(model="tiny", init_from=str(tmp_path / "ck"), data=str(small_shards), out=str(tmp_path / "r"),
                          steps=1, batch_size=2, seq_len=16, eval_batches=0, progress=False, device="cpu"))


# ------------------------------------------------------------------ planner


def test_planner_matches_hand_computation_for_nemotron_h_8b():
    cfg = preset("nemotron-h-8b")
    V, d, F_, hq, hkv, hd = 131072, 4096, 21504, 32, 8, 128
    H, P, N, G, K = 128, 64, 128, 8, 4
    d_inner, conv_dim = H * P, H * P + 2 * G * N                 # 8192, 10240
    in_proj = d_inner + conv_dim + H                              # 18560
    mamba = d + d * in_proj + conv_dim * K + conv_dim + 3 * H + d_inner + d_inner * d
    attn = d + d * (hq + 2 * hkv) * hd + hq * hd * d
    mlp = d + 2 * d * F_
    params = 2 * V * d + d + 24 * mamba + 4 * attn + 24 * mlp
    assert params == 8_100_852_736
    ctx, chunk = 131072, 2048
    kv = 4 * 2 * hkv * hd * 2 * ctx                               # K and V, 4 layers, bf16: 2 GiB
    state = 24 * (conv_dim * (K - 1) * 2 + H * P * N * 4)
    act = chunk * (2 * d + F_) * 2 + H * chunk * 128 * 4 + V * 4
    plan = memory_plan(cfg, ctx, batch=1, dtype="bf16", prefill_chunk=chunk)
    assert (plan.params, plan.weights, plan.kv_cache, plan.mamba_state, plan.activations) == (
        params, 2 * params, kv, state, act)
    assert kv == 2 * 2**30
    budget = 22 * 2**30
    assert max_context(cfg, budget) == (budget - 2 * params - state - act) // (4 * 2 * hkv * hd * 2)
    assert memory_plan(cfg, ctx, batch=2).kv_cache == 2 * kv
    assert activation_bytes(cfg, 100) == 100 * (2 * d + F_) * 2 + H * 100 * 128 * 4 + V * 4


def test_planner_edge_cases_and_search():
    mamba_only = preset("tiny", pattern="M-M-")
    assert max_context(mamba_only, parse_bytes("1GiB")) is None        # constant state: no context bound
    assert max_context(preset("nemotron-nano-12b-v2"), parse_bytes("22GiB")) == 0   # weights alone do not fit
    assert parse_bytes("22GiB") == 22 * 2**30 and parse_bytes("80GB") == 80e9
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("lots")
    budget = parse_bytes("22GiB")
    assert memory_plan(preset("nemotron-nano-9b-v2"), 131072).total <= budget   # the published answer fits
    cfg = preset("tiny")
    budget = 0.7 * memory_plan(cfg, 8192).total
    rows = search_architecture(cfg, budget, 8192, top=50)
    assert rows and all(r["plan"].total <= budget for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and scores[0] < 1
    assert search_architecture(cfg, 0.05 * budget, 8192) == []


# ------------------------------------------------------------------ CLI


@pytest.mark.slow
def test_cli_prune_generate_and_plan(tmp_path, small_shards, capsys):
    torch.manual_seed(0)
    save_model(HybridLM(HybridConfig(**TINY_MODEL)), tmp_path / "ck")
    out = tmp_path / "pruned"
    assert main(["prune", "--ckpt", str(tmp_path / "ck"), "--data", str(small_shards), "--target-params", "0.7x",
                 "--calib-seqs", "4", "--seq-len", "32", "--out", str(out), "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "pruned" in text and "calibration KL" in text
    pruned = load_model(out)
    assert 0.67 * count_params(HybridConfig(**TINY_MODEL)) <= pruned.num_params() <= 0.7 * count_params(
        HybridConfig(**TINY_MODEL))
    assert (out / "importance.json").is_file()
    assert main(["prune", "--ckpt", str(tmp_path / "ck"), "--importance", str(out / "importance.json"),
                 "--d-model", "48", "--n-drop", "1", "--out", str(tmp_path / "p2"), "--device", "cpu"]) == 0
    assert load_model(tmp_path / "p2").cfg.n_layers == 3
    assert main(["generate", "--ckpt", str(out), "--prompt", "In the", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    assert main(["plan", "--preset", "nemotron-nano-9b-v2", "--gpu-mem", "22GiB"]) == 0
    assert "fits" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["prune", "--ckpt", "/nonexistent/ck", "--target-params", "0.5x", "--out", "/tmp/x"], "not found"),
    (["prune", "--preset", "tiny", "--out", "/tmp/x"], "nothing to prune"),
    (["prune", "--preset", "tiny", "--target-params", "0.5x", "--d-model", "8", "--out", "/tmp/x"], "either"),
    (["prune", "--preset", "tiny", "--target-params", "0.5x", "--drop-layers", "1", "--out", "/tmp/x"], "either"),
    (["prune", "--preset", "tiny", "--target-params", "0.5x", "--out", "/tmp/x"], "--data"),
    (["distill", "--student", "/nonexistent/s", "--teacher", "/nonexistent/t"], "not found"),
    (["plan", "--preset", "tiny", "--gpu-mem", "lots"], "memory size"),
    (["plan", "--preset", "nemotron-h-8b", "--gpu-mem", "1GiB", "--search"], "no pruned shape"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.split("\r")[-1]  # after any progress bar
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_impossible_target(tmp_path, small_shards, capsys):
    save_model(small_model(vocab_size=4096), tmp_path / "ck")
    assert main(["prune", "--ckpt", str(tmp_path / "ck"), "--data", str(small_shards), "--target-params", "0.01x",
                 "--calib-seqs", "2", "--seq-len", "16", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 1
    assert "no both pruning" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_objective_under_ddp_equals_single_process(tmp_path, small_shards):
    """The objective goes through distributed.wrap: a one-process DDP group trains exactly like no wrapping."""
    torch.manual_seed(0)
    teacher = HybridLM(HybridConfig(**TINY_MODEL))
    save_model(teacher, tmp_path / "teacher")
    student = prune_model(teacher, compute_importance(teacher, _batches(4096, n=1), depth=False),
                          PruneSpec(48, 96, 2, 2, 1))
    save_model(student, tmp_path / "student")
    finals = []
    for mode in ("none", "ddp"):
        tc = TrainConfig(model=str(tmp_path / "student"), init_from=str(tmp_path / "student"), data=str(small_shards),
                         out=str(tmp_path / mode), steps=3, batch_size=2, seq_len=16, eval_batches=0, warmup_steps=1,
                         progress=False, device="cpu", distributed=mode)
        distill(tc, DistillConfig(teacher=str(tmp_path / "teacher"), temperature=2.0, alpha=0.5))
        finals.append(load_model(tmp_path / mode / "final").state_dict())
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    assert not torch.equal(finals[0]["backbone.embeddings.weight"], student.state_dict()["backbone.embeddings.weight"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prune_and_distill_on_cuda():
    model = small_model().cuda()
    batches = [(x.cuda(), y.cuda()) for x, y in _batches()]
    imp = compute_importance(model, batches)
    pruned = prune_model(model, imp, PruneSpec(48, 96, 4, 2, 1, (2,)))
    assert pruned.lm_head.weight.is_cuda
    ids = torch.randint(0, 97, (2, 19), device="cuda")
    with torch.no_grad():
        full = pruned(ids)
        cache = pruned.new_cache(2)
        steps = [pruned(ids[:, :6], cache)] + [pruned(ids[:, t:t + 1], cache) for t in range(6, 19)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-3
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = DistillObjective(model, 2.0, 0.5)(pruned.train(), *batches[0])
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in pruned.parameters())
