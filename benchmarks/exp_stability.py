"""Stability experiment (Rybakov et al. 2024) on a small hybrid model on CPU.

1. Baseline (QK-norm only) over a learning-rate grid with ratio 1.5 between points:
   the first LR where it diverges is LR_div (the last one before it, LR_ok = LR_div / 1.5).
2. QKV-norm, QK-norm + softcap and QK + post-Proj/FC2 norms at LR_ok, LR_div and 1.5 x LR_div.
3. Table (final validation perplexity, or the step where a run diverged), the final-loss-vs-LR
   plot, the output norms of the diverging baseline next to QKV-norm at LR_div (first 40 steps
   again, monitored at every step), the baseline's norms over a whole run at LR_ok, and the
   train-loss curves at LR_div, written under docs/img/.
4. The boundary (LR_ok / 1.5, LR_ok, LR_div) again for the baseline, QKV-norm and softcap with
   more seeds (--seeds): divergence here is a random spike in the first ~15 steps.

Every run is an ordinary `hybridlm.training.sweep` run directory under --out, so re-running the script
skips finished runs (and resumes interrupted ones).

    python benchmarks/exp_stability.py --threads 1            # ~15-25 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from hybridlm.config import HybridConfig  # noqa: E402
from hybridlm.plotting import save_figure  # noqa: E402
from hybridlm.training.metrics import read_metrics  # noqa: E402
from hybridlm.training.report import plot_monitor  # noqa: E402
from hybridlm.training.sweep import markdown_table, plot_loss_vs_lr, run_dir_name, sweep_lr  # noqa: E402
from hybridlm.training.train_config import TrainConfig  # noqa: E402

# A small hybrid with two attention layers (the stability options act on attention and MLP layers).
MODEL = dict(vocab_size=4096, d_model=128, pattern="*-M-*-", n_heads=4, n_kv_heads=2, head_dim=32,
             ffn_dim=512, ssm_state=16, mamba_head_dim=32, n_groups=1, chunk_size=32)
BASELINE = "qk_norm"
OTHERS = ["qkv_norm", "qk_norm_softcap", "qk_post_norm"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/exp_stability")
    ap.add_argument("--img", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--lr-start", type=float, default=0.01, help="first LR of the baseline grid")
    ap.add_argument("--grid", type=int, default=12, help="baseline grid points (ratio 1.5)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--softcap", type=float, default=10.0, help="cap of qk_norm_softcap (healthy runs peak at 5-9)")
    ap.add_argument("--moderate-lr", type=float, default=0.0338, help="an LR well below divergence, for perplexity")
    ap.add_argument("--diverge-factor", type=float, default=1.5)
    ap.add_argument("--seeds", default="0,1,2", help="seeds for the repeat of the divergence boundary")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out, img = Path(a.out), Path(a.img)
    out.mkdir(parents=True, exist_ok=True)
    img.mkdir(parents=True, exist_ok=True)
    HybridConfig(**MODEL).save(out / "model.json")
    base = TrainConfig(model=str(out / "model.json"), steps=a.steps, batch_size=8, seq_len=128, warmup_steps=20,
                       eval_every=0, eval_batches=10, save_every=0, monitor_every=5, diverge_factor=a.diverge_factor)
    t0 = time.time()
    grid = [float(f"{a.lr_start * 1.5 ** i:.3g}") for i in range(a.grid)]
    rows = sweep_lr(base, out, [BASELINE], grid, a.softcap)
    bad = [r["lr"] for r in rows if r["status"] == "diverged"]
    if not bad:  # no divergence on the grid: compare the variants at its top instead
        lr_div = grid[-1]
        print(f"baseline did not diverge on {grid}; comparing at the top of the grid")
    else:
        lr_div = min(bad)
        print(f"baseline ({BASELINE}) diverges first at lr {lr_div:g}")
    lr_ok = max([lr for lr in grid if lr < lr_div], default=lr_div / 1.5)
    lrs = sorted({a.moderate_lr, lr_ok, lr_div, float(f"{1.5 * lr_div:.3g}")})
    print(f"testing {OTHERS} at {lrs}")
    rows2 = sweep_lr(base, out, [BASELINE, *OTHERS], lrs, a.softcap)
    everything = rows + [r for r in rows2 if r["lr"] not in grid or r["variant"] != BASELINE]
    table = markdown_table(rows2)
    (out / "experiment.md").write_text(
        f"baseline grid:\n\n{markdown_table(rows)}\nvariants:\n\n{table}")
    print(markdown_table(rows), "\n", table)
    plot_loss_vs_lr(everything, img / "stability_loss_vs_lr.png")
    # the first 40 steps at LR_div again, monitored at every step (the divergence comes early)
    per_step = dataclasses.replace(base, data=str(out / "data"), monitor_every=1, stop_at=40)
    sweep_lr(per_step, out / "per_step", [BASELINE, "qkv_norm"], [lr_div], a.softcap)
    for v in (BASELINE, "qkv_norm"):
        plot_monitor(read_metrics(out / "per_step" / v / run_dir_name(lr_div)), img / f"stability_norms_{v}.png",
                     title=f"{v} at lr {lr_div:g}, first 40 steps")
    plot_monitor(read_metrics(out / BASELINE / run_dir_name(lr_ok)), img / "stability_norms_qk_norm_lr_ok.png",
                 title=f"{BASELINE} at lr {lr_ok:g} (survives), 200 steps")
    plot_loss_curves(out, [BASELINE, *OTHERS], lr_div, img / "stability_loss_curves.png")
    # divergence at this scale is a random early spike: repeat the boundary with more seeds
    seed_lrs = [float(f"{lr_ok / 1.5:.3g}"), lr_ok, lr_div]
    variants = [BASELINE, "qkv_norm", "qk_norm_softcap"]
    by_seed = {0: sweep_lr(base, out, variants, seed_lrs, a.softcap)}
    for seed in [int(s) for s in a.seeds.split(",") if s.strip() and int(s) != 0]:
        by_seed[seed] = sweep_lr(dataclasses.replace(base, seed=seed, data=str(out / "data")), out / f"seed{seed}",
                                 variants, seed_lrs, a.softcap)
    seeds_md = seed_table(by_seed)
    with open(out / "experiment.md", "a") as f:
        f.write(f"\nseeds {sorted(by_seed)}:\n\n{seeds_md}")
    print(seeds_md)
    print(f"wrote {img}/stability_*.png and {out / 'experiment.md'} in {time.time() - t0:.0f} s")


def seed_table(by_seed: dict[int, list[dict]]) -> str:
    """variant x LR: how many seeds diverged, and the mean final perplexity of the others."""
    rows = [r for rs in by_seed.values() for r in rs]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    lrs = sorted({r["lr"] for r in rows})
    lines = ["| LR | " + " | ".join(variants) + " |", "|---:|" + "---:|" * len(variants)]
    for lr in lrs:
        cells = []
        for v in variants:
            mine = [r for r in rows if r["variant"] == v and r["lr"] == lr]
            ok = [r["val_ppl"] for r in mine if r["status"] == "ok"]
            cell = f"{len(mine) - len(ok)}/{len(mine)} diverged"
            cells.append(cell + (f", ppl {sum(ok) / len(ok):.0f}" if ok else ""))
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_loss_curves(out: Path, variants: list[str], lr: float, path: Path) -> None:
    """Train loss vs step (train + monitor records) of every variant at one LR; a diverged run ends in an x."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for v in variants:
        records = read_metrics(out / v / run_dir_name(lr))
        pts = sorted({(r["step"], r["loss"]) for r in records
                      if r.get("kind") in ("train", "monitor", "diverged") and r.get("loss") is not None})
        line = ax.plot(*zip(*pts), ".-", ms=4, label=v)[0]
        for d in (r for r in records if r.get("kind") == "diverged" and r.get("loss") is not None):
            ax.plot([d["step"]], [d["loss"]], "x", ms=11, mew=2, color=line.get_color())
    ax.set(xlabel="step", ylabel="train loss", title=f"Train loss at lr {lr:g} (x = stopped as diverged)",
           xscale="symlog", xlim=(1, None))
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


if __name__ == "__main__":
    main()
