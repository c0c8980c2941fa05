"""Where a run starts: from scratch, from `init_from` weights, or resumed from its latest checkpoint.

Resuming restores the weights, the optimizer moments, the RNG states and the counters
(step, tokens, time, ...); a sharded run's checkpoint from its DCP directory, into any layout
(one process, DDP, FSDP2, TP, TP x FSDP2). The hyper-parameters come from the new
`TrainConfig`, so a changed learning rate or weight decay takes effect (with a warning that
the run then no longer repeats an uninterrupted one). A checkpoint of another model config
(or whose DCP shapes do not fit the model) is refused, and so are `init_from` weights of
another architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import HybridConfig
from ..interop.checkpoint import WEIGHTS_NAME, load_weights_into, read_config
from ..interop.files import load_tensors
from ..model.lm import HybridLM
from . import distributed as D
from .checkpoints import (CKPT_DIR, LATEST, clean_stale, latest_checkpoint, list_checkpoints, load_checkpoint,
                          set_rng_state)
from .dcp_checkpoint import load_dcp
from .train_config import TrainConfig

# Fields whose change makes a resumed run differ from an uninterrupted one (warned about).
REPEAT_FIELDS = ("batch_size", "grad_accum", "seq_len", "seed", "steps", "lr", "min_lr", "warmup_steps",
                 "schedule", "weight_decay", "beta1", "beta2", "world_size", "tp", "documents")


def config_diff(ours: HybridConfig, theirs: HybridConfig) -> list[str]:
    """Names of the fields in which two model configs differ."""
    other = theirs.to_dict()
    return sorted(k for k, v in ours.to_dict().items() if other.get(k) != v)


def find_resume_checkpoint(out: Path, resume: bool) -> str | None:
    """The checkpoint to resume from (None: start fresh); creates `out` and removes leftovers of a crash.

    ValueError when `out` already holds checkpoints but `resume` is off.
    """
    out.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    found = latest_checkpoint(out)
    if found is not None and not resume:
        raise ValueError(f"{out} already holds checkpoints (latest {found.name}); pass resume=True "
                         "(--resume) to continue that run, or choose another out directory")
    return str(found) if found is not None and resume else None


def load_resume_checkpoint(found: str, cfg: HybridConfig, out: Path) -> dict[str, Any]:
    """`load_checkpoint(found)`, checked to be of model `cfg`; a damaged one names the older one to use.
    (A sharded run's DCP model and optimizer are left to `restore`, which loads them in this run's layout.)"""
    try:
        ckpt = load_checkpoint(found, tensors=False)
    except ValueError as e:
        older = [p for p in list_checkpoints(out) if int(p.name[5:]) < int(Path(found).name[5:])]
        hint = (f"; to resume from {older[-1].name} instead, delete {found} and {out / CKPT_DIR / LATEST}"
                if older else "")
        raise ValueError(f"{e}{hint}") from None
    if ckpt["config"] != cfg:
        raise ValueError(f"checkpoint {found} was trained with a different model config (fields "
                         f"{config_diff(cfg, ckpt['config'])}); pass the same --model to resume")
    return ckpt


def check_init_from(cfg: HybridConfig, ckpt_dir: str) -> None:
    """ValueError unless checkpoint `ckpt_dir` holds a model of config `cfg`."""
    theirs = read_config(ckpt_dir)
    if theirs != cfg:
        raise ValueError(f"init_from {ckpt_dir}: its config differs from the model's (fields "
                         f"{config_diff(cfg, theirs)}); pass --model {ckpt_dir} to train that architecture")


def load_init_weights(model: HybridLM, ckpt_dir: str) -> None:
    """Copy the weights of checkpoint `ckpt_dir` (checked by `check_init_from`) into `model`."""
    weights = Path(ckpt_dir) / WEIGHTS_NAME
    load_weights_into(model, load_tensors(weights), str(weights))


def restore(model: HybridLM, opt: torch.optim.Optimizer, ckpt: dict[str, Any], tc: TrainConfig,
            env: D.DistEnv, state: dict[str, Any]) -> None:
    """Weights, optimizer moments, RNG and the counters of `state` from `ckpt`; hyper-parameters from `tc`.

    A checkpoint with a DCP directory (a sharded run's) is loaded from it, resharded to this run's
    layout (ValueError first if its shapes do not fit the model); others from the full state dicts.
    """
    if ckpt.get("dcp") is not None:
        load_dcp(model, opt, ckpt["dcp"])
    else:
        D.load_full_state(model, opt, ckpt["model"], ckpt["optimizer"], strict=not model.cfg.tie_embeddings)
    for group in opt.param_groups:  # hyper-parameters come from tc, moments from the checkpoint
        group.update(betas=(tc.beta1, tc.beta2), eps=tc.eps, foreach=opt.defaults["foreach"],
                     fused=opt.defaults["fused"],
                     weight_decay=tc.weight_decay if group.get("name") == "decay" else 0.0)
    set_rng_state(ckpt["rng"])
    state.update({k: ckpt["state"][k] for k in state if k in ckpt["state"]})
    saved = {**ckpt["state"].get("train_config", {}), "world_size": ckpt["state"].get("world_size")}
    now = {**tc.to_dict(), "world_size": env.world_size}
    changed = [k for k in REPEAT_FIELDS if saved.get(k) is not None and saved[k] != now[k]]
    if changed:
        D.say(env, f"warning: resuming with changed {', '.join(changed)}; the run will not repeat an "
                   "uninterrupted one")
    D.say(env, f"resumed from {ckpt['path']} at step {state['step']}")
