"""Pre-training loop: `TrainConfig` + `train()`, crash-safe checkpoints, exact resume.

    from hybridlm.training import TrainConfig, train
    summary = train(TrainConfig(model="tiny", data="data/", out="runs/x", steps=2000))

The same code runs in one process or under ``torchrun --nproc_per_node=N`` (DDP, or
FSDP2 with ``distributed="fsdp2"``); the global batch is ``batch_size * world_size *
grad_accum`` windows of ``seq_len`` tokens and batches are a pure function of the step
(:meth:`hybridlm.data.TokenDataset.get_batch`), so resuming from a checkpoint repeats
the uninterrupted run step for step (bit-exactly on CPU).

Run directory ``out/`` (checkpoint files: see `hybridlm.run_checkpoints`)::

    train_config.json          the TrainConfig of the latest invocation
    metrics.jsonl              {"kind": "train"|"val"|"skip", "step": ..., ...} per line
    data/                      token shards, when `data` was raw text
    final/                     the last model: config.json, model.safetensors, tokenizer.json
    checkpoints/latest         the name of the newest complete checkpoint ("step_00000200")
    checkpoints/step_00000200/ config.json + model.safetensors (a `load_model` directory),
                               optimizer.pt, rng.pt, trainer_state.json

metrics.jsonl (rank 0; one JSON object per line; steps count completed optimizer steps):

    {"kind": "train", "step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "time"}
        every `log_every` steps: that step's loss (mean over the global batch), its lr,
        tokens trained on so far, throughput since the previous line, the global gradient
        norm before clipping, and training seconds so far (excluding evaluation and
        checkpointing, cumulative over resumes)
    {"kind": "val", "step", "val_loss", "tokens"}   at step 0, every `eval_every` steps, at the end
    {"kind": "skip", "step", "reason"}              a non-finite loss / gradient norm: no update
    {"kind": "monitor", "step", "rms/QKV", ..., "layer_rms/<module>", "attn_logit_max", ...}
        every `monitor_every` steps: linear-output RMS per layer type and per layer, and the
        largest attention logit, of that step's forward passes (`hybridlm.monitor`; rank 0's batch)
    {"kind": "diverged", "step", "reason", "loss", "min_loss"}   the run stopped as diverged

On resume, lines after the checkpoint's step are dropped, so the file reads like one run.

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
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from tqdm.auto import tqdm

from . import distributed as D
from .checkpoint import (WEIGHTS_NAME, atomic_write, atomic_write_text, load_tensors, load_weights_into,
                         read_config, save_model)
from .config import PRESETS, HybridConfig, preset, read_json
from .data import META_FILE, TokenDataset, default_corpus_path, prepare_shards
from .model import HybridLM
from .monitor import OutputMonitor
from .run_checkpoints import (
    CKPT_DIR,
    LATEST,
    clean_stale,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_for_saving,
    publish_dir,
    rng_state,
    save_checkpoint,
    seed_all,
    set_rng_state,
)
from .optim import SCHEDULES, build_optimizer, clip_grad_norm, lr_at, set_lr
from .low_precision import Recipe, apply_recipe, check_layer_spec



class TrainingDiverged(RuntimeError):
    """`max_bad_steps` consecutive steps had a non-finite loss or gradient norm, or (with
    `diverge_factor` > 0) the loss became non-finite or exceeded that factor times its running minimum."""

    def __init__(self, message: str, step: int, checkpoint: Path | None) -> None:
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class TrainConfig:
    """Everything `train()` needs; one CLI flag per field (the trailing comments are the help)."""

    model: str = "tiny"  # preset name, HybridConfig JSON, or checkpoint dir (its config; weights start fresh)
    data: Optional[str] = None  # prepared shard dir, or raw .txt/.jsonl/dir (tokenized into OUT/data); default: bundled KJV
    out: str = "runs/train"  # run directory (metrics, checkpoints, final model)
    steps: int = 1000  # total optimizer steps (the LR schedule spans them)
    batch_size: int = 16  # micro-batch per rank, in sequences
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * world * grad_accum)
    seq_len: int = 256  # tokens per sequence
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # final learning rate of the cosine / WSD decay
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # WSD: fraction of the steps spent in the final linear decay
    weight_decay: float = 0.1  # decoupled AdamW decay on >=2-D weights (none on norms, biases, A_log, D, dt_bias)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    eval_every: int = 100  # validate every N steps (0 = only at the start and end)
    eval_batches: int = 20  # validation batches per evaluation (0 = no validation)
    save_every: int = 500  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 3  # checkpoints to keep (0 = all)
    seed: int = 0  # seed for the weights and the data order
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    precision: str = "bf16"  # GEMMs of the block linears: bf16 (unquantized) | fp8 | nvfp4 (simulated off-GPU; ablations nvfp4-no-rht / -no-sr / -no-2d)
    high_precision_layers: str = "auto"  # blocks whose GEMMs stay unquantized: auto (fp8: first+last block; nvfp4: ~first 3%, last 13%) | none | first:N,last:M | 0,5,7
    init_from: Optional[str] = None  # start from this checkpoint dir's weights (its config must equal the model's; ignored on resume)
    resume: bool = False  # continue from OUT/checkpoints/latest (starts fresh if there is none)
    stop_at: Optional[int] = None  # end this invocation after this step (checkpointed) without changing the schedule
    max_bad_steps: int = 5  # stop after this many consecutive non-finite steps
    monitor_every: int = 0  # log linear-output RMS per layer type + max attention logit every N steps (0 = off)
    diverge_factor: float = 0.0  # stop as diverged when the loss is non-finite or > this x its running minimum (0 = off)
    distributed: str = "auto"  # auto (ddp under torchrun) | none | ddp | fsdp2
    log_every: int = 10  # write a train metrics line every N steps
    progress: bool = True  # show a progress bar (rank 0)
    val_fraction: float = 0.01  # held-out fraction when tokenizing raw text
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on CUDA too)

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {what}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "max_bad_steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        need(isinstance(self.monitor_every, int) and not isinstance(self.monitor_every, bool)
             and self.monitor_every >= 0, f"monitor_every must be an integer >= 0, got {self.monitor_every!r}")
        need(self.diverge_factor == 0 or 1 < self.diverge_factor < math.inf,
             f"diverge_factor must be 0 (off) or a finite number > 1, got {self.diverge_factor}")
        need(bool(self.model), "model must be a preset name or a config path")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need lr > 0 and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(0 < self.decay_frac <= 1, f"decay_frac must be in (0, 1], got {self.decay_frac}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0 and self.eps > 0,
             "weight_decay and grad_clip must be >= 0 and eps > 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        Recipe.parse(self.precision)  # ValueError naming the bad value
        check_layer_spec(self.high_precision_layers)
        need(self.distributed in D.MODES, f"distributed must be one of {D.MODES}, got {self.distributed!r}")
        need(self.stop_at is None or self.stop_at >= 1, f"stop_at must be >= 1, got {self.stop_at}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- inputs


def resolve_model_config(spec: str) -> HybridConfig:
    """A preset name, a HybridConfig JSON file, or a hybridlm checkpoint directory / its config.json."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.is_dir():
        return read_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                                "nor an existing config file")
    payload = read_json(path)
    if isinstance(payload, dict) and "hybridlm" in payload:  # a checkpoint's config.json
        return read_config(path.parent)
    return HybridConfig.load(path)


def _on_main(env: D.DistEnv, fn):
    """Run `fn` on rank 0 only; its result, or its exception, reaches every rank."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    if env.world_size > 1:
        info = D.broadcast_object(None if error is None else (type(error).__name__, str(error)), env)
        if info is not None:
            if error is not None:
                raise error
            raise {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(info[0], RuntimeError)(info[1])
        return D.broadcast_object(result, env)
    if error is not None:
        raise error
    return result


def resolve_data(tc: TrainConfig, env: D.DistEnv) -> Path:
    """The prepared shard directory for `tc.data` (tokenizing raw text into OUT/data on rank 0)."""
    src = Path(tc.data) if tc.data else default_corpus_path()
    if src.is_dir() and (src / META_FILE).is_file():
        return src
    dest = Path(tc.out) / "data"

    def prepare() -> str:
        if not src.exists():
            raise FileNotFoundError(f"data path not found: {src}")
        meta_path = dest / META_FILE
        if meta_path.is_file():
            with contextlib.suppress(ValueError, OSError):
                meta = read_json(meta_path)
                if meta.get("sources") == [str(src)] and meta.get("val_fraction") == tc.val_fraction:
                    return str(dest)
        from .tokenizer import default_tokenizer
        _say(env, f"tokenizing {src} into {dest}")
        prepare_shards(src, default_tokenizer(), dest, val_fraction=tc.val_fraction, progress=tc.progress)
        return str(dest)

    return Path(_on_main(env, prepare))


def _say(env: D.DistEnv, msg: str) -> None:
    if env.is_main:
        tqdm.write(f"[hybridlm] {msg}", file=sys.stderr)


# -------------------------------------------------------------------------- metrics


class _Metrics:
    """metrics.jsonl writer (rank 0). On resume, lines after the checkpoint's step are dropped."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if keep_until is not None and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError, AttributeError, TypeError):
                    if json.loads(line).get("step", math.inf) <= keep_until:
                        kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            self._file.write(json.dumps(clean, allow_nan=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of ``run_dir/metrics.jsonl`` (optionally only one `kind`); a torn last line is skipped."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
                records.append(record)
    return records


# ----------------------------------------------------------------------------- train


@torch.no_grad()
def evaluate(model: HybridLM, val: TokenDataset, batch_size: int, seq_len: int, max_batches: int,
             env: D.DistEnv, autocast: Any = contextlib.nullcontext) -> float:
    """Mean loss over the first `max_batches` global validation batches (every rank must call)."""
    was_training = model.training
    model.eval()
    total, n = torch.zeros((), device=env.device), 0
    for x, y in val.iter_eval_batches(batch_size, seq_len, max_batches, env.rank, env.world_size):
        with autocast():
            total += model.loss(x.to(env.device), y.to(env.device)).float()
        n += 1
    model.train(was_training)
    return float(D.all_reduce_mean(total / max(n, 1), env))


def _load_init_weights(model: HybridLM, cfg: HybridConfig, ckpt_dir: str) -> None:
    """Copy the weights of checkpoint `ckpt_dir` (same config required) into `model`."""
    theirs = read_config(ckpt_dir)
    if theirs != cfg:
        diff = sorted(k for k, v in cfg.to_dict().items() if theirs.to_dict().get(k) != v)
        raise ValueError(f"init_from {ckpt_dir}: its config differs from the model's (fields {diff}); "
                         f"pass --model {ckpt_dir} to train that architecture")
    weights = Path(ckpt_dir) / WEIGHTS_NAME
    load_weights_into(model, load_tensors(weights), str(weights))


def _autocast_for(tc: TrainConfig, device: torch.device):
    use_bf16 = tc.dtype == "bfloat16" or (tc.dtype == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def train(tc: TrainConfig, objective: D.Objective | None = None) -> dict[str, Any]:
    """Train per `tc` and return a summary.

    `objective(model, x, y) -> loss` replaces the LM loss of the training steps (e.g.
    distillation, :mod:`hybridlm.distill`); validation still reports the LM loss.

    Summary keys: ``run_dir``, ``step``, ``train_loss`` (last step), ``val_loss`` (last
    evaluation), ``tokens`` (trained on, global), ``tokens_per_s``, ``skipped_steps``,
    ``num_params``, ``checkpoint`` (latest), ``elapsed_s`` (training time, cumulative over
    resumes; ``tokens_per_s`` is for this invocation). Raises FileNotFoundError /
    ValueError for bad inputs (missing data, empty or non-UTF-8 corpus, corrupt
    checkpoint, inconsistent config) and :class:`TrainingDiverged` after
    `max_bad_steps` consecutive non-finite steps.
    """
    env = D.setup(tc.distributed, tc.device)
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        if tc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        return _train(tc, env, objective)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        D.teardown(env)


def _train(tc: TrainConfig, env: D.DistEnv, objective: D.Objective | None = None) -> dict[str, Any]:
    out = Path(tc.out)
    main = env.is_main
    seed_all(tc.seed)

    def check_run_dir() -> str | None:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        found = latest_checkpoint(out)
        if found is not None and not tc.resume:
            raise ValueError(f"{out} already holds checkpoints (latest {found.name}); pass resume=True "
                             "(--resume) to continue that run, or choose another out directory")
        return str(found) if found is not None and tc.resume else None

    found = _on_main(env, check_run_dir)
    if tc.resume and found is None:
        _say(env, f"resume requested but {out / CKPT_DIR} holds no checkpoint; starting from scratch")
    data_dir = resolve_data(tc, env)
    train_ds = TokenDataset(data_dir, "train")
    val_ds = TokenDataset(data_dir, "val") if tc.eval_batches > 0 else None
    if val_ds is not None:  # fail now, not at the first evaluation, if one batch does not fit
        next(val_ds.iter_eval_batches(tc.batch_size, tc.seq_len, 1, env.rank, env.world_size))
    cfg = resolve_model_config(tc.model)
    try:
        ckpt = load_checkpoint(found) if found else None
    except ValueError as e:
        older = [p for p in list_checkpoints(out) if int(p.name[5:]) < int(Path(found).name[5:])]
        hint = (f"; to resume from {older[-1].name} instead, delete {found} and {out / CKPT_DIR / LATEST}"
                if older else "")
        raise ValueError(f"{e}{hint}") from None
    if ckpt is not None and ckpt["config"] != cfg:
        diff = sorted(k for k, v in cfg.to_dict().items() if ckpt["config"].to_dict().get(k) != v)
        raise ValueError(f"checkpoint {found} was trained with a different model config (fields {diff}); "
                         "pass the same --model to resume")
    if train_ds.vocab_size is not None and train_ds.vocab_size > cfg.vocab_size:
        raise ValueError(f"data {data_dir} was tokenized with a {train_ds.vocab_size}-token vocabulary but the "
                         f"model has vocab_size={cfg.vocab_size}")

    model = HybridLM(cfg)
    model.init_weights(tc.seed)
    if tc.init_from and ckpt is None:  # on resume the checkpoint has the weights
        _load_init_weights(model, cfg, tc.init_from)
    model.to(env.device)
    if tc.precision != "bf16":  # FP8 / NVFP4 GEMMs; parameters and checkpoints stay plain
        _say(env, apply_recipe(model, tc.precision, tc.high_precision_layers).summary())
    num_params = model.num_params()
    module = D.wrap(model, env, objective)
    opt = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2), tc.eps)
    state = {"step": 0, "tokens": 0, "elapsed_s": 0.0, "bad_steps": 0, "skipped_steps": 0,
             "train_loss": None, "val_loss": None, "min_loss": None}
    if ckpt is not None:
        D.load_full_state(model, opt, ckpt["model"], ckpt["optimizer"], strict=not cfg.tie_embeddings)
        for group in opt.param_groups:  # hyper-parameters come from tc, moments from the checkpoint
            group.update(betas=(tc.beta1, tc.beta2), eps=tc.eps, foreach=opt.defaults["foreach"],
                         fused=opt.defaults["fused"],
                         weight_decay=tc.weight_decay if group.get("name") == "decay" else 0.0)
        set_rng_state(ckpt["rng"])
        state.update({k: ckpt["state"][k] for k in state if k in ckpt["state"]})
        saved = {**ckpt["state"].get("train_config", {}), "world_size": ckpt["state"].get("world_size")}
        now = {**tc.to_dict(), "world_size": env.world_size}
        changed = [k for k in ("batch_size", "grad_accum", "seq_len", "seed", "steps", "lr", "min_lr", "warmup_steps",
                                "schedule", "weight_decay", "beta1", "beta2", "world_size")
                   if saved.get(k) is not None and saved[k] != now[k]]
        if changed:
            _say(env, f"warning: resuming with changed {', '.join(changed)}; the run will not repeat an "
                      "uninterrupted one")
        _say(env, f"resumed from {found} at step {state['step']}")
        del ckpt
    if main:
        atomic_write_text(out / "train_config.json", json.dumps(tc.to_dict(), indent=2) + "\n")
    metrics = _Metrics(out / "metrics.jsonl", main, state["step"] if found else None)
    autocast = _autocast_for(tc, env.device)
    tokens_per_step = tc.batch_size * env.world_size * tc.grad_accum * tc.seq_len
    end = min(tc.steps, tc.stop_at) if tc.stop_at else tc.steps
    last_ckpt = Path(found) if found else None
    start_step, start_elapsed = state["step"], state["elapsed_s"]

    def run_eval(step: int) -> None:
        state["val_loss"] = evaluate(model, val_ds, tc.batch_size, tc.seq_len, tc.eval_batches, env, autocast)
        metrics.write({"kind": "val", "step": step, "val_loss": state["val_loss"], "tokens": state["tokens"]})

    def save(step: int) -> None:
        nonlocal last_ckpt
        model_sd, optim_sd = D.full_state(model, opt) if env.mode == "fsdp2" or main else (None, None)
        st = {**state, "world_size": env.world_size, "train_config": tc.to_dict()}
        last_ckpt = Path(_on_main(env, lambda: str(save_checkpoint(
            out, step, cfg, model_sd, optim_sd, rng_state(), st, tc.keep_last))))

    def stop_diverged(step: int, reason: str, loss: float, message: str) -> TrainingDiverged:
        """Log the `diverged` record and return the exception that ends the run."""
        metrics.write({"kind": "diverged", "step": step, "reason": reason, "loss": loss,
                       "min_loss": state["min_loss"]})
        return TrainingDiverged(message, step, last_ckpt)

    bar = tqdm(total=tc.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not (main and tc.progress), file=sys.stderr)
    try:
        if val_ds is not None and found is None:
            run_eval(0)
        interval_time, interval_tokens = 0.0, 0
        model.train()
        for step in range(start_step, end):
            t0 = time.perf_counter()
            lr = lr_at(step, lr=tc.lr, min_lr=tc.min_lr, steps=tc.steps, warmup_steps=tc.warmup_steps,
                       schedule=tc.schedule, decay_frac=tc.decay_frac)
            set_lr(opt, lr)
            loss_sum = torch.zeros((), device=env.device)
            monitored = main and _due(step + 1, tc.monitor_every)
            with OutputMonitor(model) if monitored else contextlib.nullcontext() as monitor:
                for micro in range(tc.grad_accum):
                    x, y = train_ds.get_batch(step * tc.grad_accum + micro, tc.batch_size, tc.seq_len, tc.seed,
                                              env.rank, env.world_size)
                    x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
                    with D.grad_sync(module, env, sync=micro == tc.grad_accum - 1):
                        with autocast():
                            loss = module(x, y)
                        (loss / tc.grad_accum).backward()
                    loss_sum += loss.detach().float()
            loss_mean = D.all_reduce_mean(loss_sum / tc.grad_accum, env)
            gnorm = clip_grad_norm(model.parameters(), tc.grad_clip)
            loss_v, gnorm_v = torch.stack([loss_mean, gnorm.float().to(loss_mean.device)]).tolist()
            done = step + 1
            if monitor is not None:
                metrics.write({"kind": "monitor", "step": done, "loss": loss_v, **monitor.summary()})
            diverged = _divergence(loss_v, state["min_loss"], tc.diverge_factor)
            if diverged is not None:
                raise stop_diverged(done, diverged, loss_v,
                                    f"training diverged at step {done}: {diverged}. Stopped without updating; "
                                    f"checkpoints are untouched (latest: {last_ckpt or 'none'}); lower the learning "
                                    "rate or add a stability option (qk_norm, qkv_norm, attn_logit_softcap).")
            if math.isfinite(loss_v):
                state["min_loss"] = loss_v if state["min_loss"] is None else min(state["min_loss"], loss_v)
            if math.isfinite(loss_v) and math.isfinite(gnorm_v):
                opt.step()
                state["bad_steps"] = 0
                state["train_loss"] = loss_v
            else:
                state["bad_steps"] += 1
                state["skipped_steps"] += 1
                what = "loss" if not math.isfinite(loss_v) else "gradient norm"
                reason = f"non-finite {what} ({loss_v if what == 'loss' else gnorm_v})"
                metrics.write({"kind": "skip", "step": done, "reason": reason})
                _say(env, f"step {done}: {reason}; skipped the update")
                if state["bad_steps"] >= tc.max_bad_steps:
                    raise stop_diverged(done, reason, loss_v,
                                        f"training diverged: {state['bad_steps']} consecutive steps (up to step "
                                        f"{done}) had a non-finite loss or gradient norm, last: {reason}. Checkpoints "
                                        f"are untouched (latest: {last_ckpt or 'none'}); lower the learning rate or "
                                        "resume from the latest checkpoint.")
            opt.zero_grad(set_to_none=True)
            state["step"] = done
            state["tokens"] += tokens_per_step
            dt = time.perf_counter() - t0
            state["elapsed_s"] += dt
            interval_time += dt
            interval_tokens += tokens_per_step
            if done % tc.log_every == 0 or done == end:
                tps = interval_tokens / max(interval_time, 1e-9)
                if state["bad_steps"] == 0:
                    metrics.write({"kind": "train", "step": done, "loss": loss_v, "lr": lr, "tokens": state["tokens"],
                                   "tokens_per_s": tps, "grad_norm": gnorm_v, "time": state["elapsed_s"]})
                bar.set_postfix(loss=f"{loss_v:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
                interval_time, interval_tokens = 0.0, 0
            bar.update(1)
            if val_ds is not None and (done == end or (tc.eval_every and done % tc.eval_every == 0)):
                run_eval(done)
            if done == end or (tc.save_every and done % tc.save_every == 0):
                save(done)
        if start_step >= end and val_ds is not None:  # nothing left to train: just report
            state["val_loss"] = evaluate(model, val_ds, tc.batch_size, tc.seq_len, tc.eval_batches, env, autocast)
        if end == tc.steps:
            _export_final(tc, env, model, cfg, data_dir)
    finally:
        bar.close()
        metrics.close()
    trained, took = state["step"] - start_step, state["elapsed_s"] - start_elapsed
    return {"run_dir": str(out), "step": state["step"], "train_loss": state["train_loss"],
            "val_loss": state["val_loss"], "tokens": state["tokens"],
            "tokens_per_s": trained * tokens_per_step / took if trained and took > 0 else None,
            "skipped_steps": state["skipped_steps"], "num_params": num_params,
            "checkpoint": str(last_ckpt) if last_ckpt else None, "elapsed_s": state["elapsed_s"]}


def _due(step: int, every: int) -> bool:
    """Whether completed step `step` is one of every `every` (0 = never)."""
    return every > 0 and step % every == 0


def _divergence(loss: float, min_loss: float | None, factor: float) -> str | None:
    """Why `loss` marks the run as diverged (non-finite, or > factor x running minimum), else None.

    factor 0 disables the check (non-finite steps are then handled by `max_bad_steps`).
    """
    if not factor:
        return None
    if not math.isfinite(loss):
        return f"non-finite loss ({loss})"
    if min_loss is not None and min_loss > 0 and loss > factor * min_loss:
        return f"loss {loss:.4g} > {factor:g} x its running minimum {min_loss:.4g}"
    return None


def _export_final(tc: TrainConfig, env: D.DistEnv, model: HybridLM, cfg: HybridConfig, data_dir: Path) -> None:
    """OUT/final: the trained model (a `load_model` directory) plus the data's tokenizer.json."""
    model_sd = D.full_model_state(model) if env.mode == "fsdp2" or env.is_main else None

    def fill(tmp: Path) -> None:
        save_model(model_for_saving(cfg, model_sd), tmp, extra={"step": tc.steps})
        if (data_dir / "tokenizer.json").is_file():
            atomic_write(tmp / "tokenizer.json", lambda p: shutil.copyfile(data_dir / "tokenizer.json", p))

    _on_main(env, lambda: publish_dir(Path(tc.out) / "final", fill))
