"""Experiment: post-training quantization (compressed-tensors NVFP4 / FP8) of a small hybrid trained in BF16.

One model is trained in BF16 (fp32 on CPU) on the bundled corpus, and the same model
(same data, seed, schedule) once more with ``--precision nvfp4``. Then, each written with
`hybridlm.compress.quantize.quantize_checkpoint` (calibrated on the train split) and
loaded back with `hybridlm.load`, the validation loss of

    fp8-tensor          FP8 E4M3 weights, one scale per tensor; first + last block in BF16 ('auto')
    fp8-channel         ... one scale per output channel
    nvfp4               NVFP4 weights (E2M1, E4M3 scale per 16, FP32 global scale), 1x16 groups,
                        the last block(s) in BF16 ('auto', the NVFP4 paper's choice)
    nvfp4-all-layers    ... every block quantized
    nvfp4-trained       the model trained with --precision nvfp4, exported with its recipe
                        (its 16x16 weight tiles, so the weights its forward saw)

twice: weights only (what `load` returns: dequantized weights, activations in full
precision) and weights + activations (the static calibrated activation scales applied as
an engine's W4A4 / W8A8 GEMM does, `hybridlm.lowp.ptq.simulated_activations`). Prints a
markdown table of the losses and their deltas vs BF16 and writes ``OUT/results.json``.
Training runs are cached in ``OUT/<run>/`` (a re-run resumes or skips them).

    python benchmarks/exp_ptq.py --threads 2                          # ~15 min on a 2-core CPU
    python benchmarks/exp_ptq.py --steps 30 --out /tmp/ptq_smoke      # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from _common import environment_line, parse_common, write_json  # noqa: E402

from hybridlm.compress.quantize import quantize_checkpoint  # noqa: E402
from hybridlm.config import HybridConfig  # noqa: E402
from hybridlm.interop.convert import load  # noqa: E402
from hybridlm.lowp import apply_recipe, ptq  # noqa: E402
from hybridlm.training import TrainConfig, evaluate, train  # noqa: E402
from hybridlm.training.corpus import default_corpus_path  # noqa: E402
from hybridlm.training.dataset import TokenDataset  # noqa: E402
from hybridlm.training.distributed import DistEnv  # noqa: E402
from hybridlm.training.shards import META_FILE, prepare_shards  # noqa: E402
from hybridlm.training.tokenizer import default_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name: (source run, format, fp8 granularity, high-precision layers, training recipe)
PTQ_RUNS = {
    "fp8-tensor": ("bf16", "fp8", "tensor", "auto", None),
    "fp8-channel": ("bf16", "fp8", "channel", "auto", None),
    "nvfp4": ("bf16", "nvfp4", "tensor", "auto", None),
    "nvfp4-all-layers": ("bf16", "nvfp4", "tensor", "none", None),
    "nvfp4-trained": ("nvfp4", None, "tensor", "auto", "nvfp4"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "exp_ptq", help="experiment directory")
    ap.add_argument("--d-model", type=int, default=128, help="model width (a multiple of 16)")
    ap.add_argument("--pattern", default="M-*-M-M-", help="layer pattern (M Mamba-2, * attention, - MLP)")
    ap.add_argument("--ffn-dim", type=int, default=512)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-batches", type=int, default=16, help="validation batches per evaluation")
    ap.add_argument("--calib-seqs", type=int, default=32, help="calibration sequences (train split)")
    return parse_common(ap, argv)


def model_config(a: argparse.Namespace) -> HybridConfig:
    heads = max(1, a.d_model // 32)
    return HybridConfig(vocab_size=4096, d_model=a.d_model, pattern=a.pattern, n_heads=heads,
                        n_kv_heads=max(1, heads // 2), head_dim=32, ffn_dim=a.ffn_dim, ssm_state=32, mamba_head_dim=32,
                        n_groups=1, chunk_size=64)


def prepared_data(out: Path) -> Path:
    dest = out / "data"
    if not (dest / META_FILE).is_file():
        prepare_shards(default_corpus_path(), default_tokenizer(), dest, val_fraction=0.01)
    return dest


def trained(name: str, precision: str, a: argparse.Namespace, data: Path, model_file: Path) -> Path:
    """OUT/<name>/final, trained (or resumed, or found finished)."""
    tc = TrainConfig(model=str(model_file), data=str(data), out=str(a.out / name), steps=a.steps,
                     batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, min_lr=a.lr / 10,
                     warmup_steps=max(1, a.steps // 10), eval_every=max(1, a.steps // 4), eval_batches=4,
                     save_every=max(1, a.steps // 3), keep_last=1, seed=a.seed, device="cpu", log_every=25,
                     precision=precision, resume=True)
    final = Path(tc.out) / "final"
    done = Path(tc.out) / "train_config.json"
    if not (final.is_dir() and done.is_file() and json.loads(done.read_text()) == tc.to_dict()):
        t0 = time.perf_counter()
        train(tc)
        done.write_text(json.dumps(tc.to_dict(), indent=2) + "\n")
        print(f"[{name}] trained in {time.perf_counter() - t0:.0f} s")
    return final


def val_loss(model, a: argparse.Namespace, data: Path) -> float:
    return evaluate(model, TokenDataset(data, "val"), a.batch_size, a.seq_len, a.eval_batches, DistEnv.single("cpu"))


def activation_scales(out: Path, quantized: list[str]) -> dict[str, torch.Tensor]:
    """The static input scales the written checkpoint holds, per quantized linear."""
    stored = {}
    for f in sorted(out.glob("*.safetensors")):
        stored.update(load_file(f))
    return {n: stored.get(f"{n}.input_global_scale", stored.get(f"{n}.input_scale")) for n in quantized}


def ptq_run(name: str, sources: dict[str, Path], a: argparse.Namespace, data: Path) -> dict:
    src, fmt, gran, keep, recipe = PTQ_RUNS[name]
    t0 = time.perf_counter()
    r = quantize_checkpoint(sources[src], a.out / "ptq" / name, fmt, calib=data, high_precision_layers=keep,
                            fp8_granularity=gran, recipe=recipe, calib_seqs=a.calib_seqs, seq_len=a.seq_len,
                            batch_size=8)
    model = load(r.out)
    weights_only = val_loss(model, a, data)
    fmt = "nvfp4" if "NVFP4" in r.scheme else "fp8"
    with torch.no_grad(), ptq.simulated_activations(model, fmt, activation_scales(r.out, r.quantized)):
        with_acts = val_loss(model, a, data)
    print(f"[{name}] {r.summary()}: val loss {weights_only:.4f} (weights only), {with_acts:.4f} "
          f"(+ activations), {time.perf_counter() - t0:.0f} s")
    return {"scheme": r.scheme, "source": src, "quantized_linears": len(r.quantized),
            "high_precision_blocks": r.high_precision, "val_loss_weights": weights_only,
            "val_loss_weights_acts": with_acts, "dir": str(r.out)}


def table(base: float, trained_nvfp4: dict[str, float], rows: dict[str, dict]) -> str:
    def delta(v: float) -> str:
        return f"{v - base:+.4f} ({100 * (v - base) / base:+.2f}%)"

    lines = ["| run | scheme | quantized linears | BF16 blocks | val loss, weights only | Δ vs bf16 "
             "| val loss, weights + activations | Δ vs bf16 |", "|---|---|---:|---|---:|---:|---:|---:|",
             f"| bf16 | - | 0 | - | {base:.4f} | +0 | {base:.4f} | +0 |",
             f"| nvfp4-trained, its checkpoint unquantized | - | 0 | - | {trained_nvfp4['plain']:.4f} | "
             f"{delta(trained_nvfp4['plain'])} | | |",
             f"| nvfp4-trained, its training forward (nvfp4 recipe) | - | | | | | {trained_nvfp4['recipe']:.4f} | "
             f"{delta(trained_nvfp4['recipe'])} |"]
    for name, r in rows.items():
        keep = ",".join(map(str, r["high_precision_blocks"])) or "none"
        lines.append(f"| {name} | {r['scheme']} | {r['quantized_linears']} | {keep} | {r['val_loss_weights']:.4f} | "
                     f"{delta(r['val_loss_weights'])} | {r['val_loss_weights_acts']:.4f} | "
                     f"{delta(r['val_loss_weights_acts'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    print(environment_line(a.device))
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    data = prepared_data(a.out)
    model_file = a.out / "model.json"
    model_config(a).save(model_file)
    sources = {p: trained(p, p, a, data, model_file) for p in ("bf16", "nvfp4")}
    base = val_loss(load(sources["bf16"]), a, data)
    trained_model = load(sources["nvfp4"])
    trained_plain = {"plain": val_loss(trained_model, a, data)}
    apply_recipe(trained_model, "nvfp4")  # the quantized forward it was trained (and validated) with
    trained_plain["recipe"] = val_loss(trained_model, a, data)
    rows = {name: ptq_run(name, sources, a, data) for name in PTQ_RUNS}
    md = table(base, trained_plain, rows)
    print("\n" + md)
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "val_loss_bf16": base,
              "val_loss_nvfp4_trained": trained_plain, "runs": rows,
              "params": load(sources["bf16"]).num_params(), "wall_s": time.perf_counter() - t0,
              "environment": environment_line(a.device)}
    write_json(a.json or a.out / "results.json", result)
    (a.out / "results.md").write_text(md + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
