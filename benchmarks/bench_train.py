"""Training throughput: tokens/s, MFU and peak memory per size, GEMM precision and activation checkpointing.

Each size also compares the hybrid with a same-size pure-attention model (``--twin``).

One timed step is exactly a training step of :func:`hybridlm.training.loop.train` in one
process: forward + loss (bf16 autocast on CUDA, float32 on CPU), backward, global gradient
norm clipping and the AdamW step (decay groups of :mod:`hybridlm.training.optim`), on
random tokens, with the ``--precision`` recipe (:func:`hybridlm.lowp.linear.apply_recipe`:
``fp8`` runs real FP8 GEMMs through ``torch._scaled_mm`` on CUDA cc >= 8.9, a simulation
elsewhere) and the ``--ac`` activation checkpointing
(:mod:`hybridlm.model.activation_checkpointing`). Warm-up steps come first and are not
timed; then all configurations of one size take turns step by step (interleaved
repetitions: a busy machine slows them alike) and each reports its median step.

* MFU = tokens/s x model FLOPs per token / peak (:func:`hybridlm.training.flops.train_flops_per_token`:
  6 x the projection weights + causal attention scores/values + the SSD scan; recomputation
  not counted). The peak is detected from ``torch.cuda.get_device_name()`` (H100 / H200 SXM:
  989.4 bf16, 1978.9 fp8 dense TFLOP/s) or given with ``--peak-tflops`` (bf16; the fp8 peak is
  then twice it). ``MFU`` is against the bf16 peak for every row (comparable across rows),
  ``MFU fp8`` against the fp8 peak for fp8 rows. On CPU only with ``--peak-tflops``.
* peak memory (CUDA): the largest memory allocated during the configuration's own steps, its
  weights, gradients and optimizer state included and the other configurations' excluded.
* ``vs bf16``: the step throughput relative to the bf16 run of the same size and checkpointing;
  ``vs attn``: the hybrid relative to its parameter-matched attention twin (``--twin``, every
  Mamba-2 layer replaced by attention and ``ffn_dim`` widened to match the parameters).

    python benchmarks/bench_train.py                        # tiny hybrid vs twin, CPU
    python benchmarks/bench_train.py --quick                # every code path in seconds (CPU)
    python benchmarks/bench_train.py --device cuda          # 125M and 1B, bf16 vs fp8, MFU, memory
    python benchmarks/bench_train.py --device cuda --ac none,full --sizes 1b
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from _common import write_json  # noqa: E402  (also puts src/ on sys.path)

from hybridlm.config import HybridConfig, preset  # noqa: E402
from hybridlm.lowp.linear import apply_recipe  # noqa: E402
from hybridlm.lowp.recipe import Recipe  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402
from hybridlm.model.activation_checkpointing import AC_MODES, apply_activation_checkpointing  # noqa: E402
from hybridlm.model.info import param_matched_twin  # noqa: E402
from hybridlm.training.flops import detect_peak_tflops, mfu, train_flops_per_token  # noqa: E402
from hybridlm.training.optim import build_optimizer, clip_grad_norm  # noqa: E402

# ~0.6M parameters (M, MLP, attention, MLP): --quick.
MICRO = dict(vocab_size=4096, d_model=64, pattern="M-*-", n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=128,
             ssm_state=16, mamba_head_dim=16, n_groups=1, chunk_size=16)
# ~125M parameters (24 layers: 8 Mamba-2, 4 attention, 12 MLP), GPT-2-small width.
HYBRID_125M = dict(vocab_size=32768, d_model=768, pattern="M-M-*-M-M-*-M-M-*-M-M-*-", n_heads=12, n_kv_heads=4,
                   head_dim=64, ffn_dim=2048, ssm_state=128, mamba_head_dim=64, n_groups=1, chunk_size=128,
                   max_seq_len=4096)
# ~0.98B parameters: 27 layers in the Nemotron-H-8B order (4 Mamba-2 + 4 MLP per attention layer:
# 12 M, 3 *, 12 -), Nemotron-H's Mamba settings (head dim 64, state 128, 8 groups), GQA 16/8.
HYBRID_1B = dict(vocab_size=32768, d_model=2048, pattern="M-M-M-M*-" * 3, n_heads=16, n_kv_heads=8, head_dim=128,
                 ffn_dim=9216, ssm_state=128, mamba_head_dim=64, n_groups=8, chunk_size=128, max_seq_len=4096)
SIZES = {"micro": lambda: HybridConfig(**MICRO), "tiny": lambda: preset("tiny"),
         "125m": lambda: HybridConfig(**HYBRID_125M), "1b": lambda: HybridConfig(**HYBRID_1B)}


def _list(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"--{what}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default=None, help=f"comma list of {','.join(SIZES)} (default: tiny on CPU, "
                                                  "125m,1b on CUDA)")
    ap.add_argument("--precision", default=None, help="comma list of GEMM recipes, e.g. bf16,fp8 (default: bf16 on "
                                                      "CPU, bf16,fp8 on CUDA)")
    ap.add_argument("--high-precision-layers", default="auto", help="blocks kept unquantized (TrainConfig's flag)")
    ap.add_argument("--ac", default="none", help=f"comma list of activation checkpointing modes ({','.join(AC_MODES)})")
    ap.add_argument("--ac-every", type=int, default=1, help="checkpoint every k-th block")
    ap.add_argument("--twin", action=argparse.BooleanOptionalAction, default=None,
                    help="also time the parameter-matched attention twin (bf16; default: on for CPU, off for CUDA)")
    ap.add_argument("--quick", action="store_true", help="micro model, 2 steps, bf16+fp8, AC none+full, twin: "
                                                         "runs every code path in seconds")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 4 CPU, 8 CUDA)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256 CPU, 2048 CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 3 CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense bf16 peak TFLOP/s for MFU (default: detected from the GPU name; fp8 peak = 2x)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    if a.quick:
        a.sizes, a.precision = a.sizes or "micro", a.precision or "bf16,fp8"
        a.ac = "none,full" if a.ac == "none" else a.ac
        a.twin = True if a.twin is None else a.twin
        a.batch_size, a.seq_len, a.steps, a.warmup = a.batch_size or 2, a.seq_len or 64, a.steps or 2, \
            1 if a.warmup is None else a.warmup
    a.sizes = _list(a.sizes or ("125m,1b" if cuda else "tiny"), SIZES, "sizes")
    try:
        names = (a.precision or ("bf16,fp8" if cuda else "bf16")).split(",")
        a.precision = [Recipe.parse(p.strip()).name for p in names]
    except ValueError as e:
        raise SystemExit(f"--precision: {e}") from None
    a.ac = _list(a.ac, AC_MODES, "ac")
    a.twin = (not cuda) if a.twin is None else a.twin
    a.batch_size = a.batch_size or (8 if cuda else 4)
    a.seq_len = a.seq_len or (2048 if cuda else 256)
    a.steps = a.steps or (20 if cuda else 3)
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    return a


def peaks(a: argparse.Namespace) -> tuple[float | None, float | None]:
    """(bf16, fp8) dense peak TFLOP/s: --peak-tflops (fp8 = 2x), else detected from the GPU name."""
    if a.peak_tflops:
        return a.peak_tflops, 2 * a.peak_tflops
    if a.device == "cuda":
        found = detect_peak_tflops(torch.cuda.get_device_name())
        if found:
            return found
    return None, None


class Trainer:
    """One model + AdamW + a fixed random batch; `step()` times one training step (and, on CUDA,
    the memory it needs: the peak during its own steps plus its resident weights and optimizer state)."""

    def __init__(self, label: dict, cfg: HybridConfig, a: argparse.Namespace) -> None:
        self.label, self.cfg, self.device = label, cfg, torch.device(a.device)
        self.cuda = self.device.type == "cuda"
        self.times: list[float] = []
        self.peak_bytes, self.resident = 0, None
        before = torch.cuda.memory_allocated() if self.cuda else 0
        torch.manual_seed(0)
        self.model = HybridLM(cfg).to(self.device).train()
        if label["precision"] != "bf16":
            apply_recipe(self.model, label["precision"], a.high_precision_layers)
        if label["ac"] != "none":
            apply_activation_checkpointing(self.model, label["ac"], a.ac_every)
        self.opt = build_optimizer(self.model, lr=1e-4, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1), generator=gen).to(self.device)
        self.inputs, self.targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        self.step(record=False)  # the first warm-up step also allocates the optimizer state
        self.resident = torch.cuda.memory_allocated() - before if self.cuda else None

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step(self, record: bool = True) -> None:
        self._sync()
        if self.cuda:
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cuda):
            loss = self.model.loss(self.inputs, self.targets)
        loss.backward()
        clip_grad_norm(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        if record:
            self.times.append(time.perf_counter() - t0)
        if self.cuda and self.resident is not None:
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated() - base + self.resident)

    def row(self, a: argparse.Namespace, peak: tuple[float | None, float | None]) -> dict:
        sec = statistics.median(self.times)
        tps = a.batch_size * a.seq_len / sec
        fpt = train_flops_per_token(self.cfg, a.seq_len)
        row = {**self.label, "pattern": self.cfg.pattern, "ffn_dim": self.cfg.ffn_dim,
               "params": self.model.num_params(), "flops_per_token": fpt, "step_s": sec, "tokens_per_s": tps,
               "peak_mem_gib": self.peak_bytes / 2 ** 30 if self.cuda else None,
               "mfu": mfu(tps, fpt, peak[0]) if peak[0] else None,
               "mfu_fp8": mfu(tps, fpt, peak[1]) if peak[1] and self.label["precision"] == "fp8" else None}
        return row


def _specs(size: str, a: argparse.Namespace) -> list[tuple[dict, HybridConfig]]:
    """(label, config) of every configuration timed for one size."""
    hybrid = SIZES[size]()
    hybrid = hybrid.replace(max_seq_len=max(hybrid.max_seq_len, a.seq_len))
    specs = [({"size": size, "model": "hybrid", "precision": p, "ac": ac}, hybrid) for ac in a.ac for p in a.precision]
    if a.twin:
        twin = param_matched_twin(hybrid)
        specs += [({"size": size, "model": "attention", "precision": "bf16", "ac": ac}, twin) for ac in a.ac]
    return specs


def _guard(label: dict, fn, failed: list[dict]):
    """fn(), or None after recording a CUDA out-of-memory failure for `label`."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        failed.append({**label, "error": "CUDA out of memory"})
        torch.cuda.empty_cache()
        return None


def compare(size: str, a: argparse.Namespace, peak: tuple[float | None, float | None]) -> list[dict]:
    """Time every configuration of `size` with interleaved steps (all see the same machine load)."""
    trainers, failed = [], []
    for label, cfg in _specs(size, a):
        t = _guard(label, lambda: Trainer(label, cfg, a), failed)
        if t is not None:
            trainers.append(t)
    for record, reps in ((False, a.warmup - 1), (True, a.steps)):
        for _ in range(max(reps, 0)):
            for t in list(trainers):
                if _guard(t.label, lambda: t.step(record) or True, failed) is None:
                    trainers.remove(t)
    rows = [t.row(a, peak) for t in trainers] + failed
    del trainers
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _ratio(row: dict, rows: list[dict], **match) -> str:
    ref = next((r for r in rows if "error" not in r and r["size"] == row["size"] and r["ac"] == row["ac"]
                and all(r[k] == v for k, v in match.items())), None)
    return "" if ref is None or "error" in row else f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x"


def print_table(rows: list[dict], a: argparse.Namespace, peak: tuple[float | None, float | None]) -> None:
    cols = [("size", 6), ("model", 9), ("prec", 7), ("AC", 9), ("params", 9), ("step ms", 9), ("tokens/s", 11),
            ("vs bf16", 7), ("vs attn", 7)]
    cols += [("MFU", 6), ("MFU fp8", 7)] if peak[0] else []
    cols += [("peak GiB", 8)] if a.device == "cuda" else []
    print(" ".join(f"{c:>{w}}" if i >= 4 else f"{c:<{w}}" for i, (c, w) in enumerate(cols)))
    print("-" * (sum(w + 1 for _, w in cols) - 1))
    for r in rows:
        cells = [r["size"], r["model"], r["precision"], r["ac"]]
        if "error" in r:
            print(" ".join(f"{c:<{w}}" for c, (_, w) in zip(cells, cols)) + f"  {r['error']}")
            continue
        cells += [f"{r['params'] / 1e6:.1f}M", f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}",
                  _ratio(r, rows, model="hybrid", precision="bf16") if r["model"] == "hybrid" else "",
                  _ratio(r, rows, model="attention") if r["model"] == "hybrid" and r["precision"] == "bf16" else ""]
        if peak[0]:
            cells += [f"{r['mfu']:.1%}", f"{r['mfu_fp8']:.1%}" if r["mfu_fp8"] is not None else ""]
        if a.device == "cuda":
            cells += [f"{r['peak_mem_gib']:.2f}"]
        print(" ".join(f"{c:>{w}}" if i >= 4 else f"{c:<{w}}" for i, (c, (_, w)) in enumerate(zip(cells, cols))))


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if a.threads:
        torch.set_num_threads(a.threads)
    peak = peaks(a)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"training throughput on {a.device} ({where}), torch {torch.__version__}; batch {a.batch_size} x "
          f"{a.seq_len} tokens, median of {a.steps} steps after {max(a.warmup, 1)} warm-up, interleaved"
          + (", bf16 autocast" if a.device == "cuda" else ", float32")
          + (f"; MFU vs {peak[0]} (bf16) / {peak[1]} (fp8) dense TFLOP/s" if peak[0] else
             ("; MFU: unknown GPU, pass --peak-tflops" if a.device == "cuda" else "")))
    rows = []
    for size in a.sizes:
        rows += compare(size, a, peak)
    print_table(rows, a, peak)
    write_json(Path(a.json) if a.json else None, {"args": vars(a), "peak_tflops": peak, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
