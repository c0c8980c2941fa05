"""Activation checkpointing: peak memory and step time of forward + backward, per mode.

Modes (`hybridlm.model.activation_checkpointing`): none, full (every block recomputed in
backward), selective (only the Mamba-2 / attention mixers recomputed), each with
``--every``. One step is ``model.loss(x, y).backward()`` on random tokens (float32 on CPU,
bf16 autocast on CUDA); no optimizer.

Peak memory is the growth over the state before the first step (model, inputs), so
parameters count only through their gradients, which every mode allocates alike:

* CUDA: ``torch.cuda.max_memory_allocated()`` minus the allocated bytes before the step,
  every mode in one process (peak statistics reset between them);
* CPU: each (repetition, mode) runs in a fresh subprocess, which reports the growth of its
  peak resident set size (``getrusage(RUSAGE_SELF).ru_maxrss`` after minus before the steps).

Repetitions are interleaved (rep 1: none, full, selective; rep 2: ...) so machine load hits
every mode alike; the table gives the median over repetitions of each one's median step
time, the largest peak, and both as ratios to ``none``.

    python benchmarks/bench_activation_checkpointing.py                # CPU: d_model 512, 8 blocks, 1 x 1024
    python benchmarks/bench_activation_checkpointing.py --device cuda  # d_model 1024, 16 blocks, 4 x 4096
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

from _common import cpu_pressure_us, environment_line, report_contention, sync, write_json  # noqa: E402  (puts src/ on sys.path)

from hybridlm.config import preset  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402
from hybridlm.model.activation_checkpointing import AC_MODES, apply_activation_checkpointing  # noqa: E402

# CPU / CUDA defaults: (d_model, blocks, seq_len, batch)
DEFAULTS = {"cpu": (512, 8, 1024, 1), "cuda": (1024, 16, 4096, 4)}
PATTERN = "M-M-*-"  # repeated / cut to the number of blocks (Nemotron-H-like: M and - alternate, some *)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--modes", default=",".join(AC_MODES), help="comma list of " + ", ".join(AC_MODES))
    ap.add_argument("--every", type=int, default=1, help="checkpoint every n-th block (or mixer)")
    ap.add_argument("--d-model", type=int, default=None, help="default 512 CPU, 1024 CUDA")
    ap.add_argument("--blocks", type=int, default=None, help="layers (default 8 CPU, 16 CUDA)")
    ap.add_argument("--seq-len", type=int, default=None, help="default 1024 CPU, 4096 CUDA")
    ap.add_argument("--batch", type=int, default=None, help="default 1 CPU, 4 CUDA")
    ap.add_argument("--reps", type=int, default=2, help="interleaved repetitions (fresh process each on CPU)")
    ap.add_argument("--steps", type=int, default=1, help="timed steps per repetition, after one warm-up step")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    a = ap.parse_args(argv)
    d, blocks, seq, batch = DEFAULTS[a.device]
    a.d_model, a.blocks = a.d_model or d, a.blocks or blocks
    a.seq_len, a.batch = a.seq_len or seq, a.batch or batch
    a.modes = a.modes.split(",")
    bad = [m for m in a.modes if m not in AC_MODES]
    if bad or a.reps < 1 or a.steps < 1 or a.every < 1:
        ap.error(f"modes must be among {AC_MODES} (got {bad}); --reps, --steps, --every >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda given but torch.cuda.is_available() is False")
    return a


def build(a: argparse.Namespace, mode: str):
    """The model (train mode, checkpointing `mode`), inputs and targets on the device."""
    pattern = (PATTERN * a.blocks)[:a.blocks]
    heads = max(1, a.d_model // 64)
    cfg = preset("tiny", d_model=a.d_model, pattern=pattern, n_heads=heads, n_kv_heads=max(1, heads // 4),
                 head_dim=64, ffn_dim=3 * a.d_model, ssm_state=64, mamba_head_dim=64, n_groups=1, chunk_size=128,
                 max_seq_len=a.seq_len)
    torch.manual_seed(0)
    model = HybridLM(cfg).to(a.device).train()
    apply_activation_checkpointing(model, mode, a.every)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq_len + 1), generator=torch.Generator().manual_seed(0))
    ids = ids.to(a.device)
    return model, ids[:, :-1], ids[:, 1:]


def step(model: HybridLM, x: torch.Tensor, y: torch.Tensor, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model.loss(x, y)
    loss.backward()
    sync(device)
    model.zero_grad(set_to_none=False)  # keep the gradients: their memory counts once, in every mode
    return time.perf_counter() - t0


def measure(a: argparse.Namespace, mode: str) -> dict:
    """One mode in this process: {"mode", "peak_bytes", "step_s"} (median step)."""
    # torch.utils.checkpoint imports torch._dynamo on first use (~100 MB of RSS): do it first, in every mode
    checkpoint(torch.sin, torch.zeros(1, requires_grad=True), use_reentrant=False).sum().backward()
    model, x, y = build(a, mode)
    if a.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    step(model, x, y, a.device)  # warm-up (allocates the gradients)
    times = [step(model, x, y, a.device) for _ in range(a.steps)]
    if a.device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    del model, x, y
    return {"mode": mode, "peak_bytes": peak, "step_s": statistics.median(times)}


def in_subprocess(a: argparse.Namespace, mode: str) -> dict:
    """`measure` in a fresh interpreter (CPU: its own peak RSS)."""
    cmd = [sys.executable, __file__, "--worker", mode, "--device", a.device, "--every", str(a.every),
           "--d-model", str(a.d_model), "--blocks", str(a.blocks), "--seq-len", str(a.seq_len),
           "--batch", str(a.batch), "--steps", str(a.steps)] + (["--threads", str(a.threads)] if a.threads else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def table(rows: list[dict], modes: list[str]) -> list[dict]:
    """Per mode: median step time, largest peak, and their ratios to `none` (if measured)."""
    summary = []
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        summary.append({"mode": mode, "peak_bytes": max(r["peak_bytes"] for r in mine),
                        "step_s": statistics.median(r["step_s"] for r in mine)})
    ref = next((s for s in summary if s["mode"] == "none"), None)
    print(f"{'mode':<10} {'peak MiB':>9} {'vs none':>8} {'step s':>8} {'vs none':>8}")
    for s in summary:
        mem = f"{s['peak_bytes'] / ref['peak_bytes']:.2f}x" if ref else "-"
        tim = f"{s['step_s'] / ref['step_s']:.2f}x" if ref else "-"
        print(f"{s['mode']:<10} {s['peak_bytes'] / 2**20:>9.0f} {mem:>8} {s['step_s']:>8.2f} {tim:>8}")
    return summary


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.worker:
        print(json.dumps(measure(a, a.worker)))
        return []
    print(environment_line(a.device))
    print(f"d_model {a.d_model}, {a.blocks} blocks ({(PATTERN * a.blocks)[:a.blocks]}), batch {a.batch} x "
          f"{a.seq_len} tokens, every {a.every}; {a.reps} interleaved reps x {a.steps} timed step(s) after 1 warm-up"
          + (", bf16 autocast" if a.device == "cuda" else ", float32, one fresh process per (rep, mode)"))
    psi, t0 = cpu_pressure_us(), time.perf_counter()
    rows = []
    for rep in range(a.reps):
        for mode in a.modes:
            rows.append({"rep": rep, **(measure(a, mode) if a.device == "cuda" else in_subprocess(a, mode))})
    summary = table(rows, a.modes)
    if a.device == "cpu":
        report_contention(psi, time.perf_counter() - t0)
    write_json(a.json, {"args": {k: v for k, v in vars(a).items() if k != "json"}, "rows": rows, "summary": summary})
    return summary


if __name__ == "__main__":
    main()
