"""Compression experiment: prune a small trained hybrid by width, by depth and by both, distill each
student, and compare with training the same student architectures from scratch on the same tokens.

1. teacher: a 4.57M-parameter hybrid (``M-M-*-M-M-*-``, d_model 192, ffn 768) trained on the
   bundled KJV corpus for 500 steps x 16 x 128 tokens (1.02M tokens);
2. importance on a calibration set (64 windows x 128 tokens of the training split);
3. three students at 0.63-0.68x the teacher's parameters (``pruning.search_spec``): width only,
   depth only, and both (the 2 least important layers dropped, width searched for the rest);
4. each student distilled (forward KL, T = 1, lr 1e-3) for 60 steps x 16 x 128 tokens (123k,
   12% of the teacher's tokens), and the same architecture trained from scratch (fresh init, LM
   loss, the teacher's lr 3e-3) for the same tokens;
5. the 'both' architecture also trained from scratch on the teacher's whole budget (1.02M tokens);
6. the planner's answer for Nemotron Nano 2: 12B and 9B at 128k tokens in 22 GiB, bf16.

Every stage is cached under ``--out`` (the teacher and every student run is a resumable
training run directory; finished stages are skipped), so a re-run only does missing work.

    python benchmarks/exp_compression.py --threads 1    # ~45 min on one contended CPU core (teacher ~17)
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from _common import parse_common, write_json  # noqa: E402  (also puts src/ on sys.path)

from hybridlm.compress.distill import DistillConfig, distill  # noqa: E402
from hybridlm.compress.importance import Importance, calibration_batches, compute_importance  # noqa: E402
from hybridlm.compress.planner import describe_spec, format_plan, parse_bytes, search_architecture  # noqa: E402
from hybridlm.compress.pruning import param_count, prune_model  # noqa: E402
from hybridlm.compress.search import search_spec  # noqa: E402
from hybridlm.config import preset  # noqa: E402
from hybridlm.interop.checkpoint import load_model, save_model  # noqa: E402
from hybridlm.model.info import human_bytes  # noqa: E402
from hybridlm.training import TrainConfig, evaluate, train  # noqa: E402
from hybridlm.training.dataset import TokenDataset  # noqa: E402
from hybridlm.training.distributed import DistEnv  # noqa: E402
from hybridlm.training.metrics import read_metrics  # noqa: E402

TEACHER = dict(d_model=192, pattern="M-M-*-M-M-*-", n_heads=4, n_kv_heads=2, head_dim=48, ffn_dim=768,
               ssm_state=32, mamba_head_dim=32, n_groups=2, chunk_size=64, max_seq_len=2048)
BATCH, SEQ = 16, 128
EVAL_BATCHES = 20


def teacher_run(out: Path, steps: int) -> Path:
    """Train (or resume, or reuse) the teacher; returns its final checkpoint dir."""
    final = out / "teacher" / "final"
    if final.is_dir():
        return final
    cfg_path = out / "teacher_config.json"
    preset("tiny", **TEACHER).save(cfg_path)
    train(TrainConfig(model=str(cfg_path), data=None, out=str(out / "teacher"), steps=steps, batch_size=BATCH,
                      seq_len=SEQ, lr=3e-3, min_lr=3e-4, warmup_steps=50, eval_every=100, eval_batches=10,
                      save_every=100, keep_last=1, val_fraction=0.02, resume=True, progress=True, log_every=10))
    return final


def val_loss(model, data: Path) -> float:
    env = DistEnv.single("cpu")
    return evaluate(model, TokenDataset(data, "val"), BATCH, SEQ, EVAL_BATCHES, env)


def student_tc(out: Path, model: str, data: Path, steps: int, lr: float, **kw) -> TrainConfig:
    return TrainConfig(model=model, data=str(data), out=str(out), steps=steps, batch_size=BATCH, seq_len=SEQ,
                       lr=lr, min_lr=lr / 10, warmup_steps=max(steps // 10, 1), eval_every=max(steps // 2, 1),
                       eval_batches=EVAL_BATCHES, save_every=max(steps // 2, 1), keep_last=1, resume=True,
                       progress=True, log_every=5, **kw)


def run(a: argparse.Namespace) -> dict:
    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    t0 = time.time()
    final = teacher_run(out, a.teacher_steps)
    data = out / "teacher" / "data"
    teacher = load_model(final)
    if "teacher" not in results:
        results["teacher"] = {"params": teacher.num_params(), "val_loss": val_loss(teacher, data),
                              "tokens": a.teacher_steps * BATCH * SEQ}
    imp_path = out / "importance.json"
    batches = calibration_batches(TokenDataset(data, "train"), a.calib_seqs, SEQ, BATCH)
    if not imp_path.is_file():
        compute_importance(teacher, batches, depth=True, progress=True).save(imp_path)
    imp = Importance.load(imp_path)
    results["depth_kl"] = imp.depth_kl.tolist()
    target = int(a.target * param_count(teacher.cfg))
    for axes in ("width", "depth", "both"):
        row = results.setdefault(axes, {})
        sdir = out / axes
        # both: the 2 least important layers dropped, width searched for the rest
        search_axes, n_drop = ("mixed", 2) if axes == "both" else (axes, None)
        pruned_dir = sdir / "pruned"
        if not (pruned_dir / "model.safetensors").is_file():
            try:
                spec, _ = search_spec(teacher.cfg, imp, target, search_axes, a.tolerance, teacher, batches[:2],
                                      n_drop=n_drop)
            except ValueError:  # whole layers are coarse steps: widen the window once
                spec, _ = search_spec(teacher.cfg, imp, target, search_axes, 2 * a.tolerance, teacher, batches[:2],
                                      n_drop=n_drop)
            student = prune_model(teacher, imp, spec).eval()
            save_model(student, pruned_dir, extra={"pruned_from": str(final), "prune_spec": spec.to_dict()})
            shutil.copyfile(final / "tokenizer.json", pruned_dir / "tokenizer.json")
            row.update(spec=spec.to_dict(), params=student.num_params(), val_loss_pruned=val_loss(student, data),
                       describe=describe_spec(teacher.cfg, spec))
            results_path.write_text(json.dumps(results, indent=2) + "\n")
        for kind in ("distill", "scratch"):
            key = f"val_loss_{kind}"
            if key in row:
                continue
            if kind == "distill":
                tc = student_tc(sdir / kind, str(pruned_dir), data, a.steps, a.distill_lr, init_from=str(pruned_dir))
                summary = distill(tc, DistillConfig(teacher=str(final), temperature=1.0, alpha=1.0))
            else:
                summary = train(student_tc(sdir / kind, str(pruned_dir), data, a.steps, a.scratch_lr))
            row[key] = summary["val_loss"]
            row["tokens"] = summary["tokens"]
            results_path.write_text(json.dumps(results, indent=2) + "\n")
    both = results["both"]
    if a.full_scratch and "val_loss_scratch_full" not in both:  # the teacher's whole token budget
        summary = train(student_tc(out / "both" / "scratch_full", str(out / "both" / "pruned"), data,
                                   a.teacher_steps, a.scratch_lr))
        both.update(val_loss_scratch_full=summary["val_loss"], tokens_scratch_full=summary["tokens"])
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    results["planner"] = planner_answer()
    results["wall_s_this_run"] = round(time.time() - t0)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(out, results)
    return results


def planner_answer() -> dict:
    budget = parse_bytes("22GiB")
    ans = {}
    for name in ("nemotron-nano-12b-v2", "nemotron-nano-9b-v2"):
        ans[name] = format_plan(preset(name), name, budget, 131072, 1, "bf16")
        print(ans[name])
    cfg = preset("nemotron-nano-12b-v2")
    rows = search_architecture(cfg, budget, 131072, 1, "bf16", top=3)
    ans["search_12b"] = [f"{r['plan'].params / 1e9:.2f} B, {human_bytes(r['plan'].total)}: {describe_spec(cfg, r['spec'])}"
                         for r in rows]
    return ans


def plot(out: Path, results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, axes in zip(axs, ("width", "depth", "both")):
        for kind, color in (("distill", "C0"), ("scratch", "C1")):
            vals = read_metrics(out / axes / kind, "val")
            ax.plot([v["tokens"] / 1e3 for v in vals], [v["val_loss"] for v in vals], "o-", color=color,
                    label=f"{'pruned + distilled' if kind == 'distill' else 'from scratch'}")
        ax.axhline(results["teacher"]["val_loss"], color="gray", ls="--", label="teacher")
        r = results[axes]
        ax.set_title(f"{axes}: {r['params'] / 1e6:.2f}M params ({r['params'] / results['teacher']['params']:.0%})")
        ax.set_xlabel("student training tokens (k)")
        ax.grid(alpha=0.3)
    axs[0].set_ylabel("validation loss (nats/token)")
    axs[0].legend()
    fig.tight_layout()
    img = Path(__file__).resolve().parents[1] / "docs" / "img" / "compression.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(img, dpi=110)
    print(f"wrote {img}")


def table(results: dict) -> str:
    t = results["teacher"]
    lines = ["| student | params | val loss pruned | pruned + distilled | from scratch |",
             "|---|---|---|---|---|",
             f"| teacher | {t['params'] / 1e6:.2f}M | {t['val_loss']:.3f} | - | - |"]
    for axes in ("width", "depth", "both"):
        r = results[axes]
        lines.append(f"| {axes}: {r['describe']} | {r['params'] / 1e6:.2f}M ({r['params'] / t['params']:.0%}) | "
                     f"{r['val_loss_pruned']:.3f} | {r['val_loss_distill']:.3f} | {r['val_loss_scratch']:.3f} |")
    if "val_loss_scratch_full" in results["both"]:
        b = results["both"]
        lines.append(f"\n'both' architecture trained from scratch on the teacher's whole budget "
                     f"({b['tokens_scratch_full'] / 1e6:.2f}M tokens, 8x the students'): val loss "
                     f"{b['val_loss_scratch_full']:.3f} (pruned + distilled: {b['val_loss_distill']:.3f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/exp_compression"))
    ap.add_argument("--teacher-steps", type=int, default=500)
    ap.add_argument("--steps", type=int, default=60, help="student training steps (16 x 128 tokens each)")
    ap.add_argument("--target", type=float, default=0.68, help="student parameters as a fraction of the teacher's")
    ap.add_argument("--tolerance", type=float, default=0.08)
    ap.add_argument("--calib-seqs", type=int, default=64)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--scratch-lr", type=float, default=3e-3)
    ap.add_argument("--full-scratch", type=int, default=1,
                    help="also train the 'both' student from scratch on the teacher's whole token budget (0: skip)")
    a = parse_common(ap, argv)  # also applies --threads
    torch.manual_seed(a.seed)
    results = run(a)
    print(table(results))
    write_json(a.json, results)


if __name__ == "__main__":
    main()
