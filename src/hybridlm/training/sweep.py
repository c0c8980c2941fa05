"""`hybridlm sweep-lr`: the same model with each training-stability variant over a grid of learning rates.

Each (variant, lr) pair is one ordinary `hybridlm.training.loop.train` run in its own directory
``OUT/<variant>/lr_<lr>/`` (metrics.jsonl, checkpoints, final model, ``result.json``), with
divergence detection on (`TrainConfig.diverge_factor`) and output-norm monitoring
(`TrainConfig.monitor_every`). A finished run (its ``result.json`` exists) is not redone
when the sweep is started again, and an interrupted one resumes from its checkpoint.

Outputs in ``OUT/``: ``results.csv`` (one row per run), ``results.md`` (perplexity table,
learning rate x variant, diverged runs marked, plus the largest surviving LR per
variant) and ``loss_vs_lr.png`` (final validation loss vs LR, diverged runs as x marks).

Variants (Rybakov et al. 2024, "Methods of improving LLM training stability"):
``none``; ``qk_norm`` (LayerNorm on Q and K per head, the paper's baseline);
``qk_post_norm`` (also after Proj, FC2 and, for the hybrid, Mamba's out_proj);
``qkv_norm`` (LayerNorm after the QKV projection, attention pre-norm removed);
``qk_norm_softcap`` (QK-norm plus tanh capping of the attention logits).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..config import STABILITY_OFF, HybridConfig
from ..plotting import pyplot, save_figure
from .checkpoints import latest_checkpoint
from .distributed import DistEnv
from .divergence import TrainingDiverged
from .inputs import resolve_data, resolve_model_config
from .loop import train
from .metrics import read_metrics
from .train_config import TrainConfig

SOFTCAP = "softcap"  # placeholder in VARIANTS, replaced by the sweep's cap value
VARIANTS: dict[str, dict[str, Any]] = {
    "none": {},
    "qk_norm": {"qk_norm": "layernorm"},
    "qk_post_norm": {"qk_norm": "layernorm", "post_proj_norm": "layernorm", "post_fc2_norm": "layernorm",
                     "mamba_out_norm": "layernorm"},
    "qkv_norm": {"qkv_norm": "layernorm"},
    "qk_norm_softcap": {"qk_norm": "layernorm", "attn_logit_softcap": SOFTCAP},
}
RESULT_FILE = "result.json"


def variant_config(base: HybridConfig, variant: str, softcap: float) -> HybridConfig:
    """`base` with its stability fields set to exactly those of `variant` (the others off)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown stability variant {variant!r}; choose from {', '.join(VARIANTS)}")
    fields = {k: softcap if v == SOFTCAP else v for k, v in VARIANTS[variant].items()}
    return base.replace(**{**STABILITY_OFF, **fields})


def parse_list(text: str, what: str, cast=str) -> list:
    """Comma-separated values; ValueError naming `what` when empty or unparsable."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError(f"{what} is empty: give a comma-separated list")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise ValueError(f"{what} {text!r} is not a comma-separated list of {cast.__name__}") from None


def run_dir_name(lr: float) -> str:
    return f"lr_{lr:.3g}"


def sweep_lr(base: TrainConfig, out: str | Path, variants: list[str], lrs: list[float],
             softcap: float = 30.0, min_lr_ratio: float = 0.1, progress: bool = True) -> list[dict[str, Any]]:
    """Train every (variant, lr) pair (skipping finished ones); write the table and plot; return the rows.

    `base` gives everything but the model's stability fields, ``out``, ``lr`` and ``min_lr``
    (``min_lr_ratio * lr``).
    """
    for v in variants:
        variant_config(HybridConfig(), v, softcap)  # unknown names fail before any training
    if any(not lr > 0 for lr in lrs):
        raise ValueError(f"learning rates must be > 0, got {lrs}")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if softcap <= 0 and "qk_norm_softcap" in variants:
        raise ValueError(f"softcap must be > 0 for the qk_norm_softcap variant, got {softcap}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = DistEnv.single("cpu")
    data = str(resolve_data(dataclasses.replace(base, out=str(out)), env))
    model = resolve_model_config(base.model)
    rows = []
    bar = tqdm([(v, lr) for v in variants for lr in lrs], desc="sweep-lr", unit="run", disable=not progress)
    for variant, lr in bar:
        bar.set_postfix(variant=variant, lr=f"{lr:.3g}", refresh=True)
        rows.append(_run_one(base, model, data, out / variant, variant, lr, softcap, min_lr_ratio))
    bar.close()
    write_outputs(rows, out)
    return rows


def _run_one(base: TrainConfig, model: HybridConfig, data: str, vdir: Path, variant: str, lr: float,
             softcap: float, min_lr_ratio: float) -> dict[str, Any]:
    run = vdir / run_dir_name(lr)
    if (run / RESULT_FILE).is_file():
        return json.loads((run / RESULT_FILE).read_text())
    vdir.mkdir(parents=True, exist_ok=True)
    cfg_path = vdir / "model.json"
    variant_config(model, variant, softcap).save(cfg_path)
    tc = dataclasses.replace(base, model=str(cfg_path), data=data, out=str(run), lr=lr,
                             min_lr=lr * min_lr_ratio, resume=latest_checkpoint(run) is not None, progress=False)
    row: dict[str, Any] = {"variant": variant, "lr": lr}
    try:
        s = train(tc)
        row.update(status="ok", step=s["step"], train_loss=s["train_loss"], val_loss=s["val_loss"])
    except TrainingDiverged as e:
        row.update(status="diverged", step=e.step, train_loss=None, val_loss=None)
    row.update(_monitor_peaks(run))
    row["val_ppl"] = math.exp(min(row["val_loss"], 50)) if row["val_loss"] is not None else None
    (run / RESULT_FILE).write_text(json.dumps(row, indent=2) + "\n")
    return row


def _monitor_peaks(run: Path) -> dict[str, Any]:
    """Largest monitored RMS of QKV / Proj / FC2 and the largest attention logit over the run."""
    records = read_metrics(run)
    mon = [r for r in records if r.get("kind") == "monitor"]
    peaks: dict[str, Any] = {}
    for key in ("rms/QKV", "rms/Proj", "rms/FC2", "attn_logit_max"):
        values = [r[key] for r in mon if r.get(key) is not None]
        peaks[f"peak_{key.replace('rms/', 'rms_')}"] = max(values) if values else None
    reasons = [r for r in records if r.get("kind") == "diverged"]
    peaks["reason"] = reasons[-1].get("reason") if reasons else None
    return peaks


# ---------------------------------------------------------------------------- outputs

COLUMNS = ("variant", "lr", "status", "step", "train_loss", "val_loss", "val_ppl", "peak_rms_QKV",
           "peak_rms_Proj", "peak_rms_FC2", "peak_attn_logit_max", "reason")


def write_outputs(rows: list[dict[str, Any]], out: Path) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (out / "results.md").write_text(markdown_table(rows))
    plot_loss_vs_lr(rows, out / "loss_vs_lr.png")


def _ordered(rows: list[dict[str, Any]]) -> tuple[list[str], list[float]]:
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    return variants, sorted({r["lr"] for r in rows})


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """LR x variant table of final validation perplexity ("diverged @ step N" where it diverged)."""
    variants, lrs = _ordered(rows)
    cell = {(r["variant"], r["lr"]): r for r in rows}
    lines = ["| LR | " + " | ".join(variants) + " |", "|---:|" + "---:|" * len(variants)]
    for lr in lrs:
        cells = []
        for v in variants:
            r = cell.get((v, lr))
            if r is None:
                cells.append("")
            elif r["status"] == "diverged":
                cells.append(f"diverged @ step {r['step']}")
            else:
                cells.append(f"{r['val_ppl']:.2f}" if r["val_ppl"] is not None else "ok")
        lines.append(f"| {lr:.3g} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: final validation perplexity. Largest learning rate without divergence:", ""]
    for v in variants:
        ok = [r["lr"] for r in rows if r["variant"] == v and r["status"] == "ok"]
        lines.append(f"- {v}: {max(ok):.3g}" if ok else f"- {v}: none (every LR diverged)")
    return "\n".join(lines) + "\n"


def plot_loss_vs_lr(rows: list[dict[str, Any]], path: Path) -> Path:
    """Final validation loss vs LR per variant; diverged runs as x marks above the curves."""
    variants, _ = _ordered(rows)
    fig, ax = pyplot().subplots(figsize=(7, 4))
    finite = [r["val_loss"] for r in rows if r["val_loss"] is not None]
    top = max(finite) * 1.05 if finite else 1.0
    for i, v in enumerate(variants):
        mine = sorted((r for r in rows if r["variant"] == v), key=lambda r: r["lr"])
        ok = [(r["lr"], r["val_loss"]) for r in mine if r["status"] == "ok" and r["val_loss"] is not None]
        line = ax.plot(*zip(*ok), "o-", label=v)[0] if ok else None
        bad = [r["lr"] for r in mine if r["status"] == "diverged"]
        if bad:
            ax.plot(bad, [top * (1 + 0.01 * i)] * len(bad), "x", ms=9, mew=2,
                    color=line.get_color() if line else "r", label=f"{v} diverged")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final validation loss (nats/token)",
           title="Final loss vs learning rate (x, drawn above the curves = diverged)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
