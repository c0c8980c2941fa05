"""FP8 / NVFP4 recipes, bf16 mixed precision, activation checkpointing and distillation under DDP and
FSDP2 (2 CPU processes, torchrun + gloo) against one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hybridlm.compress.distill import DistillConfig, distill
from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import WEIGHTS_NAME, save_model
from hybridlm.interop.files import load_tensors
from hybridlm.lowp import nvfp4
from hybridlm.model.lm import HybridLM
from hybridlm.training.checkpoints import latest_checkpoint, load_checkpoint
from hybridlm.training.loop import train
from hybridlm.training.metrics import read_metrics
from hybridlm.training.train_config import TrainConfig

from helpers import TINY_MODEL, torchrun

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WORLD, MICRO = 2, 2          # 2 ranks x 2 sequences; the one-process reference takes all 4 sequences
TOL = 1e-5                   # float32: only the order of the gradient sums differs
# bf16 mixed precision: FSDP2 computes with bf16 weights and a bf16 residual stream, one process
# with autocast (float32 weights, bf16 matmul inputs): bf16 rounding (2^-8 relative) in different
# places. Losses (~8.3) agree to 1e-3, about 2^-13 relative (measured: 7e-5). The weight updates
# W_final - W_init agree to 15% in norm (measured: 3.5%): AdamW divides each gradient by its own
# magnitude, so the bf16-rounded gradients of near-zero entries can flip a step's sign; no weight
# moves further apart than two full updates.
BF16_LOSS_ATOL, BF16_UPDATE_RTOL = 1e-3, 0.15

# Every job of one launch shares one process group (see helpers.TRAIN_CONFIGS_SCRIPT). A "probe"
# job also records, on rank 0, the dtypes FSDP2 mixed precision leaves on the model and optimizer.
_SCRIPT = """
import json, sys
from pathlib import Path
import torch, torch.distributed as dist
import hybridlm.training.loop as loop
from hybridlm.compress.distill import DistillConfig, distill
from hybridlm.training import TrainConfig, train

def probe(tc):
    seen = {}
    build = loop.build_optimizer
    def capture(model, *args, **kwargs):  # the sharded model and its optimizer, as train() builds them
        opt = build(model, *args, **kwargs)
        def on_forward(m, i, o):  # (a hook returning a value would replace the output)
            seen.setdefault("forward", [str(m.weight.dtype), str(o.dtype)])
        def on_step(o, a, k):
            seen.setdefault("grad", sorted({str(p.grad.dtype) for g in o.param_groups for p in g["params"]
                                            if p.grad is not None}))
        model.lm_head.register_forward_hook(on_forward)
        opt.register_step_pre_hook(on_step)
        seen.update(model=model, opt=opt)
        return opt
    loop.build_optimizer = capture
    try:
        train(tc)
    finally:
        loop.build_optimizer = build
    params = list(seen["model"].parameters())
    out = {"forward": seen["forward"], "grad": seen["grad"],
           "param_types": sorted({type(p).__name__ for p in params}),
           "param_dtypes": sorted({str(p.dtype) for p in params}),
           "local_dtypes": sorted({str(p.to_local().dtype) for p in params}),
           "exp_avg_dtypes": sorted({str(s[k].dtype) for s in seen["opt"].state.values()
                                     for k in ("exp_avg", "exp_avg_sq")})}
    if dist.get_rank() == 0:
        (Path(tc.out) / "probe.json").write_text(json.dumps(out))

dist.init_process_group("gloo")
for job in json.loads(open(sys.argv[1]).read()):
    tc = TrainConfig(**job["train"])
    if "distill" in job:
        distill(tc, DistillConfig(**job["distill"]))
    elif job.get("probe"):
        probe(tc)
    else:
        train(tc)
dist.destroy_process_group()
"""


def _cfg(model: str, data: Path, out: Path, **kw) -> dict:
    base = dict(model=model, data=str(data), out=str(out), steps=3, batch_size=WORLD * MICRO, seq_len=32, lr=3e-3,
                min_lr=3e-4, warmup_steps=1, eval_every=0, eval_batches=0, save_every=0, keep_last=0, log_every=1,
                progress=False, device="cpu", distributed="none", high_precision_layers="none")
    return {**base, **kw}


def _multi(ref: dict, root: Path, name: str, mode: str, **kw) -> dict:
    return {**ref, "out": str(root / name), "batch_size": MICRO, "distributed": mode, **kw}


@pytest.fixture(scope="module")
def runs(small_shards: Path, tiny_model_file: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fsdp_recipes")
    teacher = HybridLM(HybridConfig(**TINY_MODEL))
    teacher.init_weights(seed=7)
    save_model(teacher, root / "teacher")
    refs = {"fp8": _cfg(tiny_model_file, small_shards, root / "ref_fp8", precision="fp8"),
            "nvfp4": _cfg(tiny_model_file, small_shards, root / "ref_nvfp4", precision="nvfp4"),
            "bf16": _cfg(tiny_model_file, small_shards, root / "ref_bf16", dtype="bfloat16", lr=3e-4, min_lr=3e-5),
            "fp32": _cfg(tiny_model_file, small_shards, root / "ref_fp32"),
            "distill": _cfg(tiny_model_file, small_shards, root / "ref_distill")}
    dc = {"teacher": str(root / "teacher"), "temperature": 2.0, "alpha": 0.5}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like the torchrun workers (OMP_NUM_THREADS=1)
    try:
        for name, cfg in refs.items():
            if name == "distill":
                distill(TrainConfig(**cfg), DistillConfig(**dc))
            else:
                train(TrainConfig(**cfg))
    finally:
        torch.set_num_threads(threads)
    jobs = [{"train": _multi(refs["fp8"], root, "ddp_fp8", "ddp")},
            {"train": _multi(refs["fp8"], root, "fsdp2_fp8", "fsdp2")},
            {"train": _multi(refs["nvfp4"], root, "ddp_nvfp4", "ddp")},
            {"train": _multi(refs["nvfp4"], root, "fsdp2_nvfp4", "fsdp2")},
            {"train": _multi(refs["nvfp4"], root, "fsdp2_nvfp4_ac", "fsdp2", activation_checkpointing="full")},
            {"train": _multi(refs["bf16"], root, "fsdp2_bf16", "fsdp2"), "probe": True},
            {"train": _multi(refs["distill"], root, "fsdp2_distill_replicated", "fsdp2"),
             "distill": {**dc, "teacher_sharding": "replicated"}},
            {"train": _multi(refs["distill"], root, "fsdp2_distill_fsdp", "fsdp2"),
             "distill": {**dc, "teacher_sharding": "fsdp"}}]
    (root / "jobs.json").write_text(json.dumps(jobs))
    torchrun(_SCRIPT, root, [root / "jobs.json"], nproc=WORLD, timeout=300)
    return {p.name: p for p in root.iterdir() if p.is_dir()}


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run, "train")}


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_tensors(run / "final" / WEIGHTS_NAME)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _assert_same_run(run: Path, ref: Path, tol: float = TOL) -> None:
    """Losses of every step and the final weights within `tol` (absolute)."""
    la, lb = _losses(run), _losses(ref)
    assert list(la) == list(lb) == [1, 2, 3]
    assert all(abs(la[s] - lb[s]) <= tol for s in la), (la, lb)
    assert _max_diff(_weights(run), _weights(ref)) <= tol


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_low_precision_recipe_matches_one_process(runs: dict[str, Path], recipe: str, mode: str) -> None:
    """The amax all-reduce and the position-keyed stochastic rounding make 2 ranks x 2 sequences
    quantize exactly as 1 process x 4 sequences (fp32; only summation order differs)."""
    _assert_same_run(runs[f"{mode}_{recipe}"], runs[f"ref_{recipe}"])
    # the AdamW moments of the gathered checkpoint too
    ref_opt = load_checkpoint(latest_checkpoint(runs[f"ref_{recipe}"]))["optimizer"]["state"]
    opt = load_checkpoint(latest_checkpoint(runs[f"{mode}_{recipe}"]))["optimizer"]["state"]
    assert all(torch.allclose(opt[k]["exp_avg"], ref_opt[k]["exp_avg"], atol=TOL, rtol=0) for k in ref_opt)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp8", "nvfp4"])
def test_recipes_change_the_run(runs: dict[str, Path], recipe: str) -> None:
    """The recipe really quantizes: every loss differs from the float32 run's by more than 5 x TOL."""
    a, b = _losses(runs[f"ref_{recipe}"]), _losses(runs["ref_fp32"])
    assert all(abs(a[s] - b[s]) > 5 * TOL for s in b), (a, b)


@pytest.mark.slow
def test_full_activation_checkpointing_changes_nothing_under_fsdp2(runs: dict[str, Path]) -> None:
    """Recomputing every block in backward (NVFP4, stochastic rounding included) gives the same run."""
    _assert_same_run(runs["fsdp2_nvfp4_ac"], runs["fsdp2_nvfp4"], tol=1e-6)


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision(runs: dict[str, Path]) -> None:
    """bf16 compute and float32 master weights / optimizer state, close to one-process autocast."""
    probe = json.loads((runs["fsdp2_bf16"] / "probe.json").read_text())
    assert probe["forward"] == ["torch.bfloat16", "torch.bfloat16"]   # all-gathered weight, output
    assert probe["param_types"] == ["DTensor"]                       # sharded ...
    assert probe["param_dtypes"] == probe["local_dtypes"] == ["torch.float32"]  # ... float32 master weights
    assert probe["grad"] == ["torch.float32"]                        # reduced gradients
    assert probe["exp_avg_dtypes"] == ["torch.float32"]
    la, lb = _losses(runs["fsdp2_bf16"]), _losses(runs["ref_bf16"])
    assert list(la) == list(lb) == [1, 2, 3]
    assert all(abs(la[s] - lb[s]) <= BF16_LOSS_ATOL for s in la), (la, lb)
    wf, wr = _weights(runs["fsdp2_bf16"]), _weights(runs["ref_bf16"])
    assert all(w.dtype == torch.float32 for w in wf.values())
    init = HybridLM(HybridConfig(**TINY_MODEL))
    init.init_weights(seed=0)  # the runs' starting point (TrainConfig.seed)
    w0 = init.state_dict()
    du = torch.cat([((wf[k] - w0[k]) - (wr[k] - w0[k])).flatten() for k in wr])
    ur = torch.cat([(wr[k] - w0[k]).flatten() for k in wr])
    assert float(ur.abs().max()) > 0 and float(du.norm() / ur.norm()) <= BF16_UPDATE_RTOL
    assert float(du.abs().max()) <= 2 * float(ur.abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_distillation_under_fsdp2(runs: dict[str, Path], sharding: str) -> None:
    _assert_same_run(runs[f"fsdp2_distill_{sharding}"], runs["ref_distill"])


def test_hashed_uniform_is_position_keyed() -> None:
    """Noise of a row range equals those rows of the whole tensor's noise; uniform moments; unbiased SR."""
    key, rows, cols = 12345, torch.arange(64), torch.arange(48)
    whole = nvfp4.hashed_uniform(key, rows, cols)
    assert torch.equal(nvfp4.hashed_uniform(key, rows[32:], cols), whole[32:])
    assert not torch.equal(nvfp4.hashed_uniform(key + 1, rows, cols), whole)
    big = nvfp4.hashed_uniform(7, torch.arange(2048), torch.arange(256))
    assert 0 <= float(big.min()) and float(big.max()) < 1
    assert abs(float(big.mean()) - 0.5) < 2e-3 and abs(float(big.var()) - 1 / 12) < 1e-3
    # stochastic rounding with this noise is unbiased: E[q(x)] = x over many independent keys
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    n = 400
    mean = sum(nvfp4.fake_quantize(x, stochastic=True, noise=nvfp4.hashed_uniform(k, torch.arange(4),
                                                                                  torch.arange(32)))
               for k in range(n)) / n
    rne_err = float((nvfp4.fake_quantize(x) - x).abs().mean())
    assert float((mean - x).abs().mean()) < rne_err / 4


def test_bad_placement_options_are_refused() -> None:
    with pytest.raises(ValueError, match="teacher_sharding"):
        DistillConfig(teacher="t", teacher_sharding="zero3")
    with pytest.raises(ValueError, match="activation checkpointing mode 'some'"):
        TrainConfig(activation_checkpointing="some")
    with pytest.raises(ValueError, match="every"):
        TrainConfig(activation_checkpointing="full", ac_every=0)
