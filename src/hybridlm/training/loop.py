"""Pre-training loop: `train()`, crash-safe checkpoints, exact resume.

    from hybridlm import TrainConfig, train
    summary = train(TrainConfig(model="tiny", data="data/", out="runs/x", steps=2000))

The same code runs in one process or under ``torchrun --nproc_per_node=N`` (DDP, or
FSDP2 with ``distributed="fsdp2"``, with tensor parallelism over ``tp`` ranks); the global
batch is ``batch_size * dp * grad_accum`` (``dp = world_size // tp``) windows of ``seq_len``
tokens and batches are a pure function of the step
(:meth:`hybridlm.training.dataset.TokenDataset.get_batch`), so resuming from a checkpoint
repeats the uninterrupted run step for step (bit-exactly on CPU). With ``documents`` (the
default) the model gets the data's document boundaries as ``seq_idx`` (Mamba state and
conv reset, block-diagonal attention); `data` may also be packed SFT data
(`hybridlm.training.packing`), whose untrained targets are -100.

Run directory ``out/`` (checkpoint files: `hybridlm.training.checkpoints`; the log:
`hybridlm.training.metrics`)::

    train_config.json          the TrainConfig of the latest invocation
    metrics.jsonl              {"kind": "train"|"val"|"skip"|"monitor"|"diverged", "step": ..., ...} per line
    data/                      token shards, when `data` was raw text
    final/                     the last model: config.json, model.safetensors, and the data's
                               tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...)
    checkpoints/latest         the name of the newest complete checkpoint ("step_00000200")
    checkpoints/step_00000200/ config.json + model.safetensors (a `load_model` directory),
                               optimizer.pt (sharded FSDP2 / TP runs: dcp/ with model and
                               optimizer shards), rng.pt, trainer_state.json

The model config and every flag are checked before any data is read or tokenized.

Crash safety: every file is written to a temp name and renamed, a checkpoint is built
in ``checkpoints/.tmp-step_*`` and renamed to ``step_*`` only when complete, and
``latest`` is rewritten (atomically) after that; old checkpoints beyond ``keep_last``
are removed last. A kill at any moment leaves the previous checkpoint intact; ``.tmp-*``
leftovers are ignored and cleaned up by the next run. A complete checkpoint that is
nevertheless damaged (edited, truncated by a failing disk) makes resume raise a
ValueError naming the bad file rather than silently falling back to an older one:
delete that ``step_*`` directory (and ``latest``) to resume from the previous one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import HybridConfig
from ..interop.checkpoint import model_from_state, save_model
from ..interop.files import atomic_write_text
from ..interop.tokenizer_files import copy_tokenizer_files
from ..lowp.linear import DataParallelQuant, apply_recipe
from ..model.activation_checkpointing import apply_activation_checkpointing
from ..model.lm import HybridLM
from . import distributed as D
from .checkpoints import CKPT_DIR, checkpoint_temp_dir, publish_dir, rng_state, save_checkpoint, seed_all
from .dcp_checkpoint import DCP_DIR, save_dcp
from .dataset import Batch, DataSplit
from .divergence import TrainingDiverged, divergence_reason, nonfinite_reason
from .inputs import resolve_data, resolve_model_config
from .metrics import METRICS_FILE, MetricsLog
from .monitor import OutputMonitor
from .optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from .packing import open_dataset
from .resume import check_init_from, find_resume_checkpoint, load_init_weights, load_resume_checkpoint, restore
from .tensor_parallel import check_tensor_parallel
from .train_config import TrainConfig


def _on_device(batch: Batch, device: torch.device) -> Batch:
    """``(x, y[, seq_idx])`` on `device`; seq_idx is dropped when no row crosses a document start
    (indices count from 0 in each row, so then its last column is all 0: the model's fast path)."""
    if len(batch) == 3 and not bool(batch[2][:, -1].any()):
        batch = batch[:2]
    return tuple(t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def evaluate(model: HybridLM, val: DataSplit, batch_size: int, seq_len: int, max_batches: int,
             env: D.DistEnv, autocast: Any = contextlib.nullcontext, documents: bool = True) -> float:
    """Mean loss over the first `max_batches` global validation batches (every rank must call).

    `documents`: give the model the data's document boundaries when it records them.
    """
    was_training = model.training
    model.eval()
    total, n = torch.zeros((), device=env.device), 0
    docs = documents and val.has_documents
    for batch in val.iter_eval_batches(batch_size, seq_len, max_batches, env.dp_rank, env.dp_size, documents=docs):
        with autocast():
            total += model.loss(*_on_device(batch, env.device)).float()
        n += 1
    model.train(was_training)
    return float(D.all_reduce_mean(total / max(n, 1), env))


def train(tc: TrainConfig, objective: D.Objective | None = None) -> dict[str, Any]:
    """Train per `tc` and return a summary.

    `objective(model, x, y, seq_idx) -> loss` replaces the LM loss of the training steps (e.g.
    distillation, :mod:`hybridlm.compress.distill`); validation still reports the LM loss.

    Summary keys: ``run_dir``, ``step``, ``train_loss`` (last step), ``val_loss`` (last
    evaluation), ``tokens`` (trained on, global), ``tokens_per_s``, ``skipped_steps``,
    ``num_params``, ``checkpoint`` (latest), ``elapsed_s`` (training time, cumulative over
    resumes; ``tokens_per_s`` is for this invocation). Raises FileNotFoundError /
    ValueError for bad inputs (unknown model, missing data, empty or non-UTF-8 corpus,
    corrupt checkpoint, inconsistent config) and :class:`TrainingDiverged` when the run
    diverges (`hybridlm.training.divergence`).
    """
    env = D.setup(tc.distributed, tc.device, tc.tp)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        return _Run.start(tc, env, objective).fit()
    finally:
        if tc.deterministic:  # (only then: the call imports torch._inductor, 2 s on a small CPU)
            torch.use_deterministic_algorithms(was_deterministic)
        D.teardown(env)


def _uses_bf16(tc: TrainConfig, device: torch.device) -> bool:
    """Whether the run computes in bfloat16: dtype 'bfloat16', or 'auto' on CUDA."""
    return tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda")


def _autocast_for(tc: TrainConfig, env: D.DistEnv):
    """The context of every forward: bf16 autocast (one process, DDP, TP alone) or none (float32, FSDP2).

    Under FSDP2 a bf16 run is mixed precision through ``fully_shard``'s
    ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` (`D.wrap`): the
    float32 sharded parameters (the master weights, and the optimizer state with them) are
    all-gathered in bf16, the layers compute with bf16 weights and gradients are
    reduce-scattered in float32. No autocast on top, as torchtitan does (its
    ``maybe_enable_amp``: "mixed precision training is handled by fully_shard"; autocast only
    for DDP / one device): the model already keeps its sensitive parts in float32 whatever the
    weight dtype (norms, dt / A, the SSD scan, attention softmax, the loss), so autocast would
    only add per-op casts of weights that are bf16 already. The difference to autocast: the
    residual stream and weight gradients before the reduction are bf16 instead of float32.
    """
    fsdp_shards = env.mode == "fsdp2" and (env.tp == 1 or env.dp_size > 1)  # (TP alone has no FSDP2)
    if not _uses_bf16(tc, env.device) or fsdp_shards:
        return contextlib.nullcontext
    return lambda: torch.autocast(env.device.type, dtype=torch.bfloat16)


def _due(step: int, every: int) -> bool:
    """Whether completed step `step` is one of every `every` (0 = never)."""
    return every > 0 and step % every == 0


class _Run:
    """One invocation of the loop: the model, optimizer, data and counters, and the step that uses them."""

    def __init__(self, tc: TrainConfig, env: D.DistEnv, cfg: HybridConfig, model: HybridLM, module: torch.nn.Module,
                 opt: torch.optim.Optimizer, train_ds: DataSplit, val_ds: DataSplit | None, data_dir: Path,
                 found: str | None) -> None:
        self.tc, self.env, self.cfg, self.model, self.module, self.opt = tc, env, cfg, model, module, opt
        self.train_ds, self.val_ds, self.data_dir = train_ds, val_ds, data_dir
        self.out = Path(tc.out)
        self.resumed = found is not None
        self.last_ckpt = Path(found) if found else None
        self.state: dict[str, Any] = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "bad_steps": 0, "skipped_steps": 0,
                                      "train_loss": None, "val_loss": None, "min_loss": None}
        self.autocast = _autocast_for(tc, env)
        self.tokens_per_step = tc.batch_size * env.dp_size * tc.grad_accum * tc.seq_len
        self.end = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
        self.num_params = model.num_params()
        self.metrics: MetricsLog | None = None

    # ---- setting up ---------------------------------------------------------------------------
    @classmethod
    def start(cls, tc: TrainConfig, env: D.DistEnv, objective: D.Objective | None) -> "_Run":
        """Check the inputs (model config first: before any data work), build everything, restore a resume."""
        seed_all(tc.seed)
        cfg = resolve_model_config(tc.model)
        check_tensor_parallel(cfg, tc.tp)
        found = D.on_main(env, lambda: find_resume_checkpoint(Path(tc.out), tc.resume))
        if tc.resume and found is None:
            D.say(env, f"resume requested but {Path(tc.out) / CKPT_DIR} holds no checkpoint; starting from scratch")
        ckpt = load_resume_checkpoint(found, cfg, Path(tc.out)) if found else None
        init_from = tc.init_from if ckpt is None else None  # on resume the checkpoint has the weights
        if init_from:
            check_init_from(cfg, init_from)
        data_dir, train_ds, val_ds = cls._open_data(tc, env, cfg)
        model = HybridLM(cfg)
        model.init_weights(tc.seed)
        if init_from:
            load_init_weights(model, init_from)
        model.to(env.device)
        if tc.precision != "bf16":  # FP8 / NVFP4 GEMMs; parameters and checkpoints stay plain
            dp = DataParallelQuant.default_group() if env.distributed else None  # same scales as one process
            D.say(env, apply_recipe(model, tc.precision, tc.high_precision_layers, dp).summary())
        if tc.activation_checkpointing != "none":  # recompute in backward (before wrapping, as torchtitan)
            n = apply_activation_checkpointing(model, tc.activation_checkpointing, tc.ac_every)
            D.say(env, f"activation checkpointing {tc.activation_checkpointing}: {n} modules recomputed in backward")
        module = D.wrap(model, env, objective, param_dtype=torch.bfloat16 if _uses_bf16(tc, env.device) else None)
        opt = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
        run = cls(tc, env, cfg, model, module, opt, train_ds, val_ds, data_dir, found)
        if ckpt is not None:
            restore(model, opt, ckpt, tc, env, run.state)
        return run

    @staticmethod
    def _open_data(tc: TrainConfig, env: D.DistEnv,
                   cfg: HybridConfig) -> tuple[Path, DataSplit, DataSplit | None]:
        """The train and val splits (tokenizing raw text first), checked against the model and batch shape."""
        data_dir = resolve_data(tc, env)
        train_ds = open_dataset(data_dir, "train")
        val_ds = open_dataset(data_dir, "val") if tc.eval_batches > 0 else None
        if val_ds is not None:  # fail now, not at the first evaluation, if one batch does not fit
            next(val_ds.iter_eval_batches(tc.batch_size, tc.seq_len, 1, env.dp_rank, env.dp_size))
        train_ds.check_vocab(cfg.vocab_size)
        return data_dir, train_ds, val_ds

    # ---- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Steps from the resumed one to `end`, with evaluation, checkpoints and the final export."""
        tc, env, state = self.tc, self.env, self.state
        if env.is_main:
            atomic_write_text(self.out / "train_config.json", json.dumps(tc.to_dict(), indent=2) + "\n")
        self.metrics = MetricsLog(self.out / METRICS_FILE, env.is_main, state["step"] if self.resumed else None)
        start_step, start_elapsed = state["step"], state["elapsed_s"]
        bar = tqdm(total=tc.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (env.is_main and tc.progress), file=sys.stderr)
        try:
            if self.val_ds is not None and not self.resumed:
                self.run_eval(0)
            self._steps(start_step, bar)
            if start_step >= self.end and self.val_ds is not None:  # nothing left to train: just report
                state["val_loss"] = self._val_loss()
            if self.end == tc.steps:
                self._export_final()
        finally:
            bar.close()
            self.metrics.close()
        return self._summary(start_step, start_elapsed)

    def _steps(self, start_step: int, bar: tqdm) -> None:
        tc, state = self.tc, self.state
        interval_time, interval_tokens = 0.0, 0
        self.model.train()
        for step in range(start_step, self.end):
            t0 = time.perf_counter()
            lr = lr_at(step, lr=tc.lr, min_lr=tc.min_lr, steps=tc.steps, warmup_steps=tc.warmup_steps,
                       schedule=tc.schedule, decay_frac=tc.decay_frac)
            set_lr(self.opt, lr)
            loss_v, gnorm_v = self._forward_backward(step)
            done = step + 1
            self._update(done, loss_v, gnorm_v)
            state["step"] = done
            state["tokens"] += self.tokens_per_step
            dt = time.perf_counter() - t0
            state["elapsed_s"] += dt
            interval_time += dt
            interval_tokens += self.tokens_per_step
            if done % tc.log_every == 0 or done == self.end:
                self._log(done, loss_v, gnorm_v, lr, interval_tokens / max(interval_time, 1e-9), bar)
                interval_time, interval_tokens = 0.0, 0
            bar.update(1)
            if self.val_ds is not None and (done == self.end or _due(done, tc.eval_every)):
                self.run_eval(done)
            if done == self.end or _due(done, tc.save_every):
                self.save(done)

    def _forward_backward(self, step: int) -> tuple[float, float]:
        """The micro-batches of one optimizer step: (mean loss over the global batch, gradient norm)."""
        tc, env = self.tc, self.env
        loss_sum = torch.zeros((), device=env.device)
        monitored = env.is_main and _due(step + 1, tc.monitor_every)
        with OutputMonitor(self.model) if monitored else contextlib.nullcontext() as monitor:
            for micro in range(tc.grad_accum):
                batch = self.train_ds.get_batch(step * tc.grad_accum + micro, tc.batch_size, tc.seq_len, tc.seed,
                                                env.dp_rank, env.dp_size,
                                                documents=tc.documents and self.train_ds.has_documents)
                with D.grad_sync(self.module, env, sync=micro == tc.grad_accum - 1):
                    with self.autocast():
                        loss = self.module(*_on_device(batch, env.device))
                    (loss / tc.grad_accum).backward()
                loss_sum += loss.detach().float()
        loss_mean = D.all_reduce_mean(loss_sum / tc.grad_accum, env)
        gnorm = clip_grad_norm(self.model.parameters(), tc.grad_clip)
        loss_v, gnorm_v = torch.stack([loss_mean, gnorm.float().to(loss_mean.device)]).tolist()
        if monitor is not None:
            self.metrics.write({"kind": "monitor", "step": step + 1, "loss": loss_v, **monitor.summary()})
        return loss_v, gnorm_v

    def _update(self, done: int, loss_v: float, gnorm_v: float) -> None:
        """The optimizer step, or a skipped one; TrainingDiverged when the run diverged."""
        state = self.state
        diverged = divergence_reason(loss_v, state["min_loss"], self.tc.diverge_factor)
        if diverged is not None:
            raise self.stop_diverged(done, diverged, loss_v,
                                     f"training diverged at step {done}: {diverged}. Stopped without updating; "
                                     f"checkpoints are untouched (latest: {self.last_ckpt or 'none'}); lower the "
                                     "learning rate or add a stability option (qk_norm, qkv_norm, attn_logit_softcap).")
        if math.isfinite(loss_v):
            state["min_loss"] = loss_v if state["min_loss"] is None else min(state["min_loss"], loss_v)
        skip = nonfinite_reason(loss_v, gnorm_v)
        if skip is None:
            self.opt.step()
            state["bad_steps"] = 0
            state["train_loss"] = loss_v
        else:
            state["bad_steps"] += 1
            state["skipped_steps"] += 1
            self.metrics.write({"kind": "skip", "step": done, "reason": skip})
            D.say(self.env, f"step {done}: {skip}; skipped the update")
            if state["bad_steps"] >= self.tc.max_bad_steps:
                raise self.stop_diverged(done, skip, loss_v,
                                         f"training diverged: {state['bad_steps']} consecutive steps (up to step "
                                         f"{done}) had a non-finite loss or gradient norm, last: {skip}. Checkpoints "
                                         f"are untouched (latest: {self.last_ckpt or 'none'}); lower the learning rate "
                                         "or resume from the latest checkpoint.")
        self.opt.zero_grad(set_to_none=True)

    def _log(self, done: int, loss_v: float, gnorm_v: float, lr: float, tps: float, bar: tqdm) -> None:
        state = self.state
        if state["bad_steps"] == 0:
            self.metrics.write({"kind": "train", "step": done, "loss": loss_v, "lr": lr, "tokens": state["tokens"],
                                "tokens_per_s": tps, "grad_norm": gnorm_v, "time": state["elapsed_s"]})
        bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)

    # ---- evaluation, checkpoints, divergence ----------------------------------------------------
    def _val_loss(self) -> float:
        return evaluate(self.model, self.val_ds, self.tc.batch_size, self.tc.seq_len, self.tc.eval_batches,
                        self.env, self.autocast, self.tc.documents)

    def run_eval(self, step: int) -> None:
        self.state["val_loss"] = self._val_loss()
        self.metrics.write({"kind": "val", "step": step, "val_loss": self.state["val_loss"],
                            "tokens": self.state["tokens"]})

    def save(self, step: int) -> None:
        """Checkpoint `step`: sharded runs (FSDP2 / TP) write model + optimizer as DCP shards from every rank
        plus the gathered weights; others the full state from rank 0 (`hybridlm.training.checkpoints`)."""
        env, tmp = self.env, None
        if env.mode == "fsdp2":
            tmp = Path(D.on_main(env, lambda: str(checkpoint_temp_dir(self.out, step))))
            save_dcp(self.model, self.opt, tmp / DCP_DIR)
            model_sd, optim_sd = D.full_model_state(self.model), None
        else:
            model_sd, optim_sd = D.full_state(self.model, self.opt) if env.is_main else (None, None)
        st = {**self.state, "world_size": env.world_size, "tp": env.tp, "train_config": self.tc.to_dict()}
        self.last_ckpt = Path(D.on_main(env, lambda: str(save_checkpoint(
            self.out, step, self.cfg, model_sd, optim_sd, rng_state(), st, self.tc.keep_last, tmp))))

    def stop_diverged(self, step: int, reason: str, loss: float, message: str) -> TrainingDiverged:
        """Log the `diverged` record and return the exception that ends the run."""
        self.metrics.write({"kind": "diverged", "step": step, "reason": reason, "loss": loss,
                            "min_loss": self.state["min_loss"]})
        return TrainingDiverged(message, step, self.last_ckpt)

    def _export_final(self) -> None:
        """OUT/final: the trained model (a `load_model` directory) plus the data's tokenizer files."""
        env, data_dir = self.env, self.data_dir
        model_sd = D.full_model_state(self.model) if env.mode == "fsdp2" or env.is_main else None

        def fill(tmp: Path) -> None:
            save_model(model_from_state(self.cfg, model_sd), tmp, extra={"step": self.tc.steps})
            copy_tokenizer_files(data_dir, tmp)

        D.on_main(env, lambda: publish_dir(self.out / "final", fill))

    def _summary(self, start_step: int, start_elapsed: float) -> dict[str, Any]:
        state = self.state
        trained, took = state["step"] - start_step, state["elapsed_s"] - start_elapsed
        return {"run_dir": str(self.out), "step": state["step"], "train_loss": state["train_loss"],
                "val_loss": state["val_loss"], "tokens": state["tokens"],
                "tokens_per_s": trained * self.tokens_per_step / took if trained and took > 0 else None,
                "skipped_steps": state["skipped_steps"], "num_params": self.num_params,
                "checkpoint": str(self.last_ckpt) if self.last_ckpt else None, "elapsed_s": state["elapsed_s"]}
