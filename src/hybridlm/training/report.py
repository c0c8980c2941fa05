"""`hybridlm report RUN_DIR`: a self-contained `report.html` (plots embedded) plus PNGs.

Reads the run's `metrics.jsonl` (train / val / skip records written by the trainer),
plots train and validation loss against tokens, the learning rate and throughput,
the monitored linear-output norms and attention logits when the run logged them
(`plot_monitor`), and shows sample generations from the latest checkpoint.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

from ..interop.checkpoint import CONFIG_NAME, load_model
from ..plotting import pyplot, save_figure
from ..serve.generation import generate_text
from ..serve.sampling import SamplingParams
from .checkpoints import latest_checkpoint
from .metrics import METRICS_FILE, read_metrics
from .monitor import GROUPS
from .tokenizer import Tokenizer, default_tokenizer

plt = pyplot()


def read_run_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All metrics records of a run; FileNotFoundError / ValueError when there are none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}: is this a training run directory?")
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{path} is empty: the run logged nothing yet")
    return records


def sample_run(run_dir: str | Path, prompts: list[str], max_new_tokens: int = 60,
               seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, continuation) pairs from the run's final model, else its latest checkpoint."""
    run = Path(run_dir)
    ckpt = run / "final" if (run / "final" / CONFIG_NAME).is_file() else latest_checkpoint(run)
    if ckpt is None:
        return []
    model = load_model(ckpt)
    tok_file = next((p for p in (ckpt / "tokenizer.json", run / "data" / "tokenizer.json") if p.is_file()), None)
    tok = Tokenizer.from_file(tok_file) if tok_file else default_tokenizer()
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.8, top_k=40, seed=seed)
    return list(zip(prompts, generate_text(model, tok, prompts, params)))


def _series(records: list[dict], kind: str, x: str, y: str) -> tuple[list, list]:
    rows = [r for r in records if r.get("kind") == kind and y in r and x in r]
    return [r[x] for r in rows], [r[y] for r in rows]


def plot_curves(records: list[dict], out_dir: Path) -> dict[str, Path]:
    """loss.png (train + val vs tokens), lr.png, throughput.png; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    fig, ax = plt.subplots(figsize=(7, 4))
    tx, ty = _series(records, "train", "tokens", "loss")
    vx, vy = _series(records, "val", "tokens", "val_loss")
    ax.plot(tx, ty, label="train", alpha=0.7)
    ax.plot(vx, vy, "o-", label="validation")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    paths["loss"] = save_figure(fig, out_dir / "loss.png")
    for key, label in (("lr", "learning rate"), ("tokens_per_s", "tokens / s")):
        fig, ax = plt.subplots(figsize=(7, 2.6))
        xs, ys = _series(records, "train", "step", key)
        ax.plot(xs, ys)
        ax.set(xlabel="step", ylabel=label)
        ax.grid(alpha=0.3)
        paths[key] = save_figure(fig, out_dir / f"{'lr' if key == 'lr' else 'throughput'}.png")
    return paths


def plot_monitor(records: list[dict], path: Path, title: str = "Linear-layer output RMS") -> Path | None:
    """Monitored output RMS per layer type (left) and the max attention logit (right) vs step.

    Reads the ``monitor`` records (`TrainConfig.monitor_every`); a ``diverged`` record is
    drawn as a red line. Returns None when the run has no monitor records.
    """
    mon = [r for r in records if r.get("kind") == "monitor"]
    if not mon:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    for group in GROUPS:
        xs, ys = _series(mon, "monitor", "step", f"rms/{group}")
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            ax.plot(*zip(*pts), ".-", ms=3, label=group)
    xs, ys = _series(mon, "monitor", "step", "attn_logit_max")
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if pts:
        bx.plot(*zip(*pts), ".-", ms=3, color="k")
    ax.set(xlabel="step", ylabel="largest layer RMS of the type", title=title, yscale="log")
    bx.set(xlabel="step", ylabel="max raw attention logit", title="Attention logits")
    for r in records:
        if r.get("kind") == "diverged":
            for a in (ax, bx):
                a.axvline(r["step"], color="r", ls="--", lw=1)
    ax.legend(fontsize=7, ncol=2)
    for a in (ax, bx):
        a.grid(alpha=0.3)
    return save_figure(fig, path)


def summary(records: list[dict]) -> dict[str, Any]:
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "val"]
    out: dict[str, Any] = {"steps": train[-1]["step"] if train else 0,
                           "tokens": train[-1].get("tokens", 0) if train else 0,
                           "skipped_steps": sum(r.get("kind") == "skip" for r in records)}
    diverged = [r for r in records if r.get("kind") == "diverged"]
    if diverged:
        out["diverged"] = f"step {diverged[-1]['step']}: {diverged[-1].get('reason')}"
    if train:
        out["final_train_loss"] = train[-1]["loss"]
        rates = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
        out["median_tokens_per_s"] = sorted(rates)[len(rates) // 2] if rates else None
    if val:
        out["first_val_loss"] = val[0]["val_loss"]
        out["final_val_loss"] = val[-1]["val_loss"]
        out["final_val_ppl"] = math.exp(min(val[-1]["val_loss"], 50))
    return out


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{path.stem}">'


def write_report(run_dir: str | Path, samples: list[tuple[str, str]] | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write report.html (+ PNGs, report.json) into run_dir; `samples` are (prompt, continuation)."""
    run = Path(run_dir)
    records = read_run_metrics(run)
    pngs = plot_curves(records, run / "plots")
    monitor_png = plot_monitor(records, run / "plots" / "monitor.png")
    monitor_html = f"<h2>Output norms (monitoring)</h2>{_img(monitor_png)}" if monitor_png else ""
    facts = {**summary(records), **(extra or {})}
    (run / "report.json").write_text(json.dumps({"summary": facts, "samples": samples or []}, indent=2))
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in facts.items())
    sample_html = "".join(
        f"<div class=s><b>{html.escape(p)}</b>{html.escape(c)}</div>" for p, c in (samples or []))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>hybridlm report: {html.escape(run.name)}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}}
table{{border-collapse:collapse}}th,td{{padding:2px 12px;text-align:left;border-bottom:1px solid #ddd}}
.s{{white-space:pre-wrap;background:#f6f6f6;padding:8px;margin:8px 0;font-family:monospace}}img{{max-width:100%}}</style>
</head><body><h1>Training report: {html.escape(run.name)}</h1>
<h2>Summary</h2><table>{rows}</table>
<h2>Loss</h2>{_img(pngs['loss'])}
<h2>Learning rate</h2>{_img(pngs['lr'])}
<h2>Throughput</h2>{_img(pngs['tokens_per_s'])}
{monitor_html}
<h2>Samples</h2>{sample_html or '<p>(no checkpoint to sample from)</p>'}
</body></html>"""
    out = run / "report.html"
    out.write_text(page)
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))
