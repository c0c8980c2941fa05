"""Chunked SSD scan vs the sequential recurrence: forward + backward wall time.

Both paths get the same float32 inputs (x, dt, A, B, C, D all require grad, as in
training); one timed run is forward, then `y.sum().backward()`. Warm-up runs come
first, the reported number is the median of the repeats. The two paths are also
checked against each other (max abs difference of y, of the final state, and of
every gradient).

The sequential recurrence is a Python loop of `ssd_step`, so it is slow: it gets
fewer repeats, its warm-up and repeats stop early once they have spent
`--seq-budget` seconds (at least one timed run is kept), and where one run is
predicted (linearly, from the previous length) to take longer than the budget, or
L is above `--max-seq-L`, it is not run: its time is extrapolated linearly and
marked `~` (the default settings measure every length).

    python benchmarks/bench_ssd.py                    # L = 512, 2048, 8192 on CPU
    python benchmarks/bench_ssd.py --device cuda --json runs/bench_ssd.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from _common import cpu_pressure_us, environment_line, parse_common, report_contention, sync, write_json  # noqa: E402  (also puts src/ on sys.path)

from hybridlm.model.ssd import ssd_chunked, ssd_sequential  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192], help="sequence lengths L")
    ap.add_argument("--batch", type=int, default=1, help="b")
    ap.add_argument("--heads", type=int, default=8, help="h")
    ap.add_argument("--head-dim", type=int, default=32, help="p")
    ap.add_argument("--groups", type=int, default=2, help="g (B/C groups)")
    ap.add_argument("--state", type=int, default=32, help="n (state size)")
    ap.add_argument("--chunk", type=int, default=64, help="chunk size of ssd_chunked")
    ap.add_argument("--warmup", type=int, default=2, help="untimed runs of the chunked scan")
    ap.add_argument("--repeats", type=int, default=10, help="timed runs of the chunked scan")
    ap.add_argument("--seq-warmup", type=int, default=1, help="untimed runs of the sequential recurrence")
    ap.add_argument("--seq-repeats", type=int, default=3, help="timed runs of the sequential recurrence")
    ap.add_argument("--max-seq-L", type=int, default=None,
                    help="do not run the sequential recurrence above this L (extrapolate instead)")
    ap.add_argument("--seq-budget", type=float, default=60.0,
                    help="seconds for one L's sequential runs: repeats stop once past it, and an L whose "
                         "single run is predicted to take longer is skipped (extrapolated)")
    args = parse_common(ap, argv)
    if args.heads % args.groups:
        ap.error(f"--heads ({args.heads}) must be divisible by --groups ({args.groups})")
    if min(args.repeats, args.seq_repeats) < 1:
        ap.error("--repeats and --seq-repeats must be >= 1")
    return args


def make_inputs(args: argparse.Namespace, L: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Float32 inputs with Mamba-2-like statistics: dt ~ softplus(N(-3, 0.5)) (about 0.01-0.1), A in [-16, -1]."""
    b, h, p, g, n = args.batch, args.heads, args.head_dim, args.groups, args.state

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    t = {
        "x": rnd(b, L, h, p),
        "dt": F.softplus(rnd(b, L, h) * 0.5 - 3.0),
        "A": -torch.empty(h).uniform_(1.0, 16.0, generator=gen),
        "B": rnd(b, L, g, n),
        "C": rnd(b, L, g, n),
        "D": torch.ones(h),
    }
    return {k: v.to(args.device).requires_grad_() for k, v in t.items()}


def run_once(fn, inputs: dict[str, torch.Tensor], device: str) -> tuple[float, torch.Tensor, torch.Tensor, dict]:
    """One forward + backward of y.sum(); returns (seconds, y, final state, grads)."""
    for v in inputs.values():
        v.grad = None
    sync(device)
    t0 = time.perf_counter()
    y, state = fn(inputs)
    y.sum().backward()
    sync(device)
    dt = time.perf_counter() - t0
    return dt, y.detach(), state.detach(), {k: v.grad.detach().clone() for k, v in inputs.items()}


def time_fn(fn, inputs, device: str, warmup: int, repeats: int, budget: float = float("inf")):
    """Warm-up then timed runs; stops early (after at least one timed run) once `budget` seconds are spent."""
    start = time.perf_counter()
    for _ in range(warmup):
        run_once(fn, inputs, device)
        if time.perf_counter() - start > budget / 2:
            break
    times = []
    for _ in range(repeats):
        t, y, state, grads = run_once(fn, inputs, device)
        times.append(t)
        if time.perf_counter() - start > budget:
            break
    return times, y, state, grads


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start, psi_start = time.perf_counter(), cpu_pressure_us()
    torch.manual_seed(args.seed)
    b, h, p, g, n, Q = args.batch, args.heads, args.head_dim, args.groups, args.state, args.chunk
    print(environment_line(args.device))
    print(f"SSD forward+backward, float32, b={b} h={h} p={p} g={g} n={n} chunk={Q}; "
          f"median of {args.seq_repeats} (sequential) / {args.repeats} (chunked) runs after warm-up")

    chunked = lambda t: ssd_chunked(t["x"], t["dt"], t["A"], t["B"], t["C"], Q, t["D"])  # noqa: E731
    sequential = lambda t: ssd_sequential(t["x"], t["dt"], t["A"], t["B"], t["C"], t["D"])  # noqa: E731

    rows = []
    seq_per_token = None  # seconds per token of the last measured sequential run
    for L in args.lengths:
        gen = torch.Generator().manual_seed(args.seed + L)
        inputs = make_inputs(args, L, gen)
        c_times, c_y, c_state, c_grads = time_fn(chunked, inputs, args.device, args.warmup, args.repeats)
        c_ms = statistics.median(c_times) * 1e3

        per_run = None if seq_per_token is None else seq_per_token * L  # predicted seconds of one run
        skip_reason = None
        if args.max_seq_L is not None and L > args.max_seq_L:
            skip_reason = f"L > --max-seq-L {args.max_seq_L}"
        elif per_run is not None and per_run > args.seq_budget:
            skip_reason = f"predicted {per_run:.0f} s a run > --seq-budget {args.seq_budget:.0f} s"
        row = {"L": L, "chunked_ms": c_ms, "chunked_times_ms": [t * 1e3 for t in c_times]}
        if skip_reason is None:
            t0 = time.perf_counter()
            s_times, s_y, s_state, s_grads = time_fn(sequential, inputs, args.device, args.seq_warmup,
                                                     args.seq_repeats, budget=args.seq_budget)
            if len(s_times) < args.seq_repeats:
                print(f"  L={L}: sequential runs take {s_times[0]:.0f} s: stopped after {len(s_times)} timed "
                      f"run(s) (--seq-budget {args.seq_budget:.0f} s)")
            s_ms = statistics.median(s_times) * 1e3
            seq_per_token = s_ms / 1e3 / L
            diff = {"y": (s_y - c_y).abs().max().item(), "state": (s_state - c_state).abs().max().item()}
            diff.update({f"grad_{k}": (s_grads[k] - c_grads[k]).abs().max().item() for k in s_grads})
            rel = {k: diff[k] / max(ref.abs().max().item(), 1e-30) for k, ref in
                   [("y", s_y), ("state", s_state)] + [(f"grad_{k}", s_grads[k]) for k in s_grads]}
            row.update(sequential_ms=s_ms, sequential_measured=True, sequential_times_ms=[t * 1e3 for t in s_times],
                       max_abs_diff=diff, max_rel_diff=rel, sequential_wall_s=time.perf_counter() - t0)
        else:
            if seq_per_token is None:
                raise SystemExit(f"L={L}: sequential skipped ({skip_reason}) and no shorter L was measured "
                                 "to extrapolate from")
            s_ms = seq_per_token * L * 1e3
            row.update(sequential_ms=s_ms, sequential_measured=False, skipped_because=skip_reason)
            print(f"  L={L}: sequential NOT measured ({skip_reason}); extrapolated linearly from the "
                  f"previous measured L (marked ~)")
        row["speedup"] = s_ms / c_ms
        rows.append(row)
        print(f"  L={L}: done (chunked {c_ms:.1f} ms, sequential {'~' if not row['sequential_measured'] else ''}"
              f"{s_ms:.0f} ms)", flush=True)

    print()
    print(f"| {'L':>5} | {'sequential ms':>13} | {'chunked ms':>10} | {'speed-up':>8} | {'max |dy|':>8} "
          f"| {'max |dgrad|':>11} |")
    print(f"|{'-' * 7}|{'-' * 15}|{'-' * 12}|{'-' * 10}|{'-' * 10}|{'-' * 13}|")
    for r in rows:
        mark = "" if r["sequential_measured"] else "~"
        if r["sequential_measured"]:
            dy = f"{r['max_abs_diff']['y']:.1e}"
            dg = f"{max(v for k, v in r['max_abs_diff'].items() if k.startswith('grad')):.1e}"
        else:
            dy = dg = "n/a"
        print(f"| {r['L']:>5} | {mark + format(r['sequential_ms'], '.1f'):>13} | {r['chunked_ms']:>10.2f} | "
              f"{mark + format(r['speedup'], '.0f') + 'x':>8} | {dy:>8} | {dg:>11} |")
    measured = [r for r in rows if r["sequential_measured"]]
    if measured:
        print("\nmax |sequential - chunked| per tensor (relative to max |sequential|):")
        for r in measured:
            parts = ", ".join(f"{k} {v:.1e} ({r['max_rel_diff'][k]:.0e})" for k, v in r["max_abs_diff"].items())
            print(f"  L={r['L']}: {parts}")
    if any(not r["sequential_measured"] for r in rows):
        print("~ = sequential time extrapolated linearly (per-token cost of the previous measured L), not measured")

    wall = time.perf_counter() - t_start
    print(f"total benchmark time {wall:.0f} s")
    contention = report_contention(psi_start, wall)

    result = {
        "benchmark": "ssd_forward_backward", "cpu_contention": contention,
        "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
        "dtype": "float32", "shapes": {"b": b, "h": h, "p": p, "g": g, "n": n, "chunk": Q},
        "warmup": args.warmup, "repeats": args.repeats,
        "seq_warmup": args.seq_warmup, "seq_repeats": args.seq_repeats,
        "rows": rows,
    }
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
