"""Experiment: the same small hybrid trained in bf16, fp8, nvfp4 and four nvfp4 ablations.

Runs (same data, seed, schedule; only `precision` / `high_precision_layers` differ):

    bf16               no GEMM quantization (fp32 on CPU)
    fp8                E4M3, per-tensor current scaling, first + last block in BF16 ('auto')
    nvfp4              the full recipe: RHT on wgrad, stochastic rounding of gradients, 16x16 weight
                       blocks, the last block(s) in BF16 ('auto')
    nvfp4-no-rht       ... without the random Hadamard transform
    nvfp4-no-sr        ... with round-to-nearest-even for gradients too
    nvfp4-no-2d        ... with 1x16 weight blocks (fprop and dgrad see different weights)
    nvfp4-all-layers   ... with every block quantized (no BF16 layers)
    bf16-seed1         bf16 and nvfp4 again with another seed (weights and data order): the run-to-run
    nvfp4-seed1        noise floor for the gaps

Each run trains with :func:`hybridlm.training.loop.train` into ``OUT/<run>/`` and leaves
``OUT/<run>/result.json``; a re-run skips finished runs (and resumes an interrupted one
from its checkpoint). The final weights are also evaluated without quantization (the
checkpoint is plain). Then the per-step cost of the simulation is measured side by side
(bf16 / fp8 / nvfp4 steps interleaved on one batch), and the script writes the plot
(validation loss vs tokens), ``OUT/results.md`` and ``OUT/results.json``.

    python benchmarks/exp_low_precision.py --threads 1                     # ~20 min on a busy 2-core box
    python benchmarks/exp_low_precision.py --steps 40 --out /tmp/lp_smoke   # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from _common import cpu_pressure_us, environment_line, parse_common, report_contention, sync, write_json  # noqa: E402

from hybridlm.config import HybridConfig  # noqa: E402
from hybridlm.interop.checkpoint import load_model  # noqa: E402
from hybridlm.lowp.linear import apply_recipe  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402
from hybridlm.training import TrainConfig, evaluate, train  # noqa: E402
from hybridlm.training.corpus import default_corpus_path  # noqa: E402
from hybridlm.training.dataset import TokenDataset  # noqa: E402
from hybridlm.training.distributed import DistEnv  # noqa: E402
from hybridlm.training.metrics import read_metrics  # noqa: E402
from hybridlm.training.optim import build_optimizer, clip_grad_norm  # noqa: E402
from hybridlm.training.shards import META_FILE, prepare_shards  # noqa: E402
from hybridlm.training.tokenizer import default_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# 8 blocks (3 Mamba-2, 4 MLP, 1 attention), d_model 128: ~2M parameters, 1.05M of them in the embeddings + head
MODEL = dict(vocab_size=4096, d_model=128, pattern="M-*-M-M-", n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=512,
             ssm_state=32, mamba_head_dim=32, n_groups=1, chunk_size=64)
RUNS = {  # name: (precision, high_precision_layers, seed offset)
    "bf16": ("bf16", "auto", 0),
    "fp8": ("fp8", "auto", 0),
    "nvfp4": ("nvfp4", "auto", 0),
    "nvfp4-no-rht": ("nvfp4-no-rht", "auto", 0),
    "nvfp4-no-sr": ("nvfp4-no-sr", "auto", 0),
    "nvfp4-no-2d": ("nvfp4-no-2d", "auto", 0),
    "nvfp4-all-layers": ("nvfp4", "none", 0),
    "bf16-seed1": ("bf16", "auto", 1),
    "nvfp4-seed1": ("nvfp4", "auto", 1),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "exp_low_precision", help="experiment directory")
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-batches", type=int, default=6)
    ap.add_argument("--overhead-steps", type=int, default=6, help="timed steps per precision for the overhead")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "low_precision.png")
    a = parse_common(ap, argv)
    unknown = [r for r in a.runs.split(",") if r not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    return a


def prepared_data(out: Path) -> Path:
    """The bundled KJV corpus tokenized once into OUT/data (shared by all runs)."""
    dest = out / "data"
    if not (dest / META_FILE).is_file():
        prepare_shards(default_corpus_path(), default_tokenizer(), dest, val_fraction=0.01)
    return dest


def run_config(name: str, a: argparse.Namespace, data: Path, model_file: Path) -> TrainConfig:
    precision, keep, seed_offset = RUNS[name]
    return TrainConfig(model=str(model_file), data=str(data), out=str(a.out / name), steps=a.steps,
                       batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, min_lr=a.lr / 10,
                       warmup_steps=max(1, a.steps // 10), eval_every=a.eval_every, eval_batches=a.eval_batches,
                       save_every=max(1, a.steps // 3), keep_last=1, seed=a.seed + seed_offset, device="cpu",
                       log_every=10,
                       precision=precision, high_precision_layers=keep, resume=True)


def run_one(name: str, a: argparse.Namespace, data: Path, model_file: Path) -> dict:
    """Train one run (or read its cached result)."""
    tc = run_config(name, a, data, model_file)
    result_file = Path(tc.out) / "result.json"
    if result_file.is_file():
        cached = json.loads(result_file.read_text())
        if cached.get("train_config") == tc.to_dict():
            print(f"[{name}] cached: final val loss {cached['val_loss']:.4f}")
            return cached
    print(f"[{name}] training: precision {tc.precision}, high-precision layers {tc.high_precision_layers!r}")
    t0 = time.perf_counter()
    summary = train(tc)
    wall = time.perf_counter() - t0
    model = load_model(Path(tc.out) / "final")  # plain weights: evaluated without any quantization
    env = DistEnv.single("cpu")
    plain = evaluate(model, TokenDataset(data, "val"), tc.batch_size, tc.seq_len, tc.eval_batches, env)
    probe = HybridLM(model.cfg)
    applied = apply_recipe(probe, tc.precision, tc.high_precision_layers)
    result = {**summary, "name": name, "val_loss_unquantized_eval": plain, "wall_s": wall,
              "quantized_linears": len(applied.quantized), "high_precision_blocks": applied.high_precision,
              "curve": [(r["tokens"], r["val_loss"]) for r in read_metrics(tc.out, "val")],
              "train_config": tc.to_dict()}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    print(f"[{name}] val loss {summary['val_loss']:.4f} (unquantized eval {plain:.4f}), {wall:.0f} s")
    return result


def measure_overhead(cfg: HybridConfig, a: argparse.Namespace) -> dict:
    """Median seconds of one training step (fwd + bwd + clip + AdamW) per precision, steps interleaved."""
    gen = torch.Generator().manual_seed(a.seed)
    ids = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1), generator=gen)
    x, y = ids[:, :-1], ids[:, 1:]
    setups = {}
    for precision in ("bf16", "fp8", "nvfp4"):
        torch.manual_seed(a.seed)
        model = HybridLM(cfg).train()
        apply_recipe(model, precision, "none")  # every block quantized: the worst case
        setups[precision] = (model, build_optimizer(model, 1e-4, 0.1), [])

    def step(model, opt) -> float:
        sync(a.device)
        t0 = time.perf_counter()
        model.loss(x, y).backward()
        clip_grad_norm(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(a.device)
        return time.perf_counter() - t0

    psi, wall0 = cpu_pressure_us(), time.perf_counter()
    for i in range(a.overhead_steps + 1):
        for model, opt, times in setups.values():
            dt = step(model, opt)
            if i:  # the first round is warm-up
                times.append(dt)
    contention = report_contention(psi, time.perf_counter() - wall0)
    med = {p: statistics.median(t) for p, (_, _, t) in setups.items()}
    return {"step_s": med, "ratio": {p: med[p] / med["bf16"] for p in med}, "contention": contention,
            "batch": [a.batch_size, a.seq_len], "steps": a.overhead_steps}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gemm_errors(ckpt: Path, data: Path, a: argparse.Namespace, draws: int = 16) -> dict:
    """What each NVFP4 ingredient does to the GEMMs, on the real x, dy and W of a trained model.

    One training batch through the (unquantized) checkpoint captures every block linear's input x,
    output gradient dy and weight W; then, averaged over the layers:
      wgrad_rel_err  ||Q(dy)^T Q(x) - dy^T x|| / ||dy^T x||   (RNE), with and without the RHT;
      dgrad_rel_err_of_mean  error of the mean of `draws` quantized dgrads Q(dy) W_q vs the unquantized-dy
                     dgrad, with stochastic rounding (unbiased: shrinks with more draws) and with RNE;
      weight_mismatch  ||W_q(fprop) - W_q(dgrad)|| / ||W||: 0 with 16x16 blocks, > 0 with 1x16.
    """
    from hybridlm.lowp import nvfp4
    q = nvfp4.fake_quantize
    model = load_model(ckpt).train()
    captured: dict[str, dict] = {}
    for i, block in enumerate(model.backbone.layers):
        for name, lin in block.named_modules():
            if isinstance(lin, torch.nn.Linear):
                def hook(mod, inp, out, key=f"{i}.{name}"):
                    captured[key] = {"x": inp[0].detach().reshape(-1, mod.in_features), "w": mod.weight.detach()}
                    out.register_hook(lambda g: captured[key].__setitem__("dy", g.reshape(-1, g.shape[-1])))
                lin.register_forward_hook(hook)
    x, y = TokenDataset(data, "train").get_batch(0, a.batch_size, a.seq_len, a.seed + 12345)
    model.loss(x, y).backward()
    gen = torch.Generator().manual_seed(a.seed)
    rows = []
    for t in captured.values():
        xx, dy, w = t["x"], t["dy"], t["w"]
        exact_w = dy.double().t() @ xx.double()
        plain = _rel(q(dy.t().contiguous()) @ q(xx.t().contiguous()).t(), exact_w)
        xr, dr = nvfp4.apply_rht(xx, 0, 0), nvfp4.apply_rht(dy, 0, 0)
        rht = _rel(q(dr.t().contiguous()) @ q(xr.t().contiguous()).t(), exact_w)
        w2 = q(w, (16, 16))
        exact_d = dy.double() @ w2.double()
        sr = torch.stack([q(dy, stochastic=True, generator=gen) @ w2 for _ in range(draws)]).mean(0)
        rne = q(dy) @ w2
        rows.append({"wgrad_no_rht": plain, "wgrad_rht": rht, "dgrad_mean_sr": _rel(sr, exact_d),
                     "dgrad_rne": _rel(rne, exact_d),
                     "weight_mismatch_1x16": float((q(w) - q(w.t().contiguous()).t()).norm() / w.norm()),
                     "weight_mismatch_16x16": float((w2 - q(w.t().contiguous(), (16, 16)).t()).norm() / w.norm())})
    return {k: statistics.mean(r[k] for r in rows) for k in rows[0]} | {"layers": len(rows), "draws": draws}


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        toks, losses = zip(*[(t, v) for t, v in r["curve"] if v is not None])
        style = dict(lw=2.2, color="black") if name == "bf16" else dict(lw=1.3)
        for axis in (ax, zoom):
            axis.plot(toks, losses, label=f"{name} ({r['val_loss']:.3f})", **style)
    half = max(t for r in results.values() for t, _ in r["curve"]) / 2
    late = [v for r in results.values() for t, v in r["curve"] if t >= half and v is not None]
    zoom.set_xlim(left=half)
    zoom.set_ylim(min(late) - 0.02, max(late) + 0.02)
    ax.set_title("validation loss (quantized forward, as trained)")
    zoom.set_title("second half, zoomed")
    for axis in (ax, zoom):
        axis.set_xlabel("training tokens")
        axis.set_ylabel("val loss (nats/token)")
        axis.grid(alpha=0.3)
    zoom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def table(results: dict[str, dict], overhead: dict, mechanisms: dict) -> str:
    base = results["bf16"]["val_loss"] if "bf16" in results else None
    lines = ["| run | quantized linears | BF16 blocks | final val loss | gap to bf16 | val loss, unquantized eval "
             "| train wall s |", "|---|---:|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        gap = f"{100 * (r['val_loss'] - base) / base:+.2f}%" if base else "n/a"
        keep = ",".join(map(str, r["high_precision_blocks"])) or (
            "-" if r["train_config"]["precision"] == "bf16" else "none")
        lines.append(f"| {name} | {r['quantized_linears']} | {keep} | {r['val_loss']:.4f} | {gap} | "
                     f"{r['val_loss_unquantized_eval']:.4f} | {r['wall_s']:.0f} |")
    if overhead:
        lines += ["", "| precision (all blocks quantized) | step ms | vs bf16 |", "|---|---:|---:|"]
        for p, s in overhead["step_s"].items():
            lines.append(f"| {p} | {1e3 * s:.0f} | {overhead['ratio'][p]:.2f}x |")
    if mechanisms:
        m = mechanisms
        lines += ["", f"| NVFP4 ingredient, real tensors of the trained nvfp4 model (mean of {m['layers']} linears) "
                  "| without | with |", "|---|---:|---:|",
                  f"| RHT: wgrad relative error | {m['wgrad_no_rht']:.4f} | {m['wgrad_rht']:.4f} |",
                  f"| SR: dgrad error of the mean of {m['draws']} draws (RNE vs SR) | {m['dgrad_rne']:.4f} | "
                  f"{m['dgrad_mean_sr']:.4f} |",
                  f"| 2D: fprop vs dgrad weight mismatch (1x16 vs 16x16) | {m['weight_mismatch_1x16']:.4f} | "
                  f"{m['weight_mismatch_16x16']:.4f} |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    a = parse_args(argv)
    if a.device != "cpu":
        raise SystemExit("this experiment runs the CPU simulation; use benchmarks/bench_fp8_gemm.py on a GPU")
    print(environment_line(a.device))
    a.out.mkdir(parents=True, exist_ok=True)
    cfg = HybridConfig(**MODEL)
    model_file = a.out / "model.json"
    cfg.save(model_file)
    data = prepared_data(a.out)
    results = {name: run_one(name, a, data, model_file) for name in a.runs.split(",")}
    overhead_file = a.out / "overhead.json"
    key = {"batch": [a.batch_size, a.seq_len], "steps": a.overhead_steps}
    overhead = json.loads(overhead_file.read_text()) if overhead_file.is_file() else {}
    if {k: overhead.get(k) for k in key} != key:
        overhead = measure_overhead(cfg, a)
        overhead_file.write_text(json.dumps(overhead, indent=2) + "\n")
    mech_file = a.out / "gemm_errors.json"
    mechanisms = json.loads(mech_file.read_text()) if mech_file.is_file() else {}
    if not mechanisms and "nvfp4" in results:
        mechanisms = gemm_errors(a.out / "nvfp4" / "final", data, a)
        mech_file.write_text(json.dumps(mechanisms, indent=2) + "\n")
    plot(results, a.plot)
    md = table(results, overhead, mechanisms)
    print(md)
    (a.out / "results.md").write_text(md + "\n")
    payload = {"model": MODEL, "runs": results, "overhead": overhead, "gemm_errors": mechanisms,
               "args": {k: str(v) for k, v in vars(a).items()}}
    (a.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_json(a.json, payload)
    return payload


if __name__ == "__main__":
    main()
