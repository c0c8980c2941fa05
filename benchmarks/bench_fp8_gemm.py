"""FP8 (E4M3, `torch._scaled_mm`) vs BF16 GEMM speed on a CUDA GPU with compute capability >= 8.9.

For each size d: an (M=tokens, K=d) x (K=d, N=d) GEMM, timed with CUDA events (median of
`--iters` after warm-up) three ways:

    bf16            torch.matmul on bf16 operands
    fp8 GEMM        torch._scaled_mm on pre-quantized E4M3 operands (the tensor-core speed-up)
    fp8 + quantize  the same plus per-tensor current scaling of both operands (amax, scale,
                    cast): what a training step with `--precision fp8` pays per GEMM here

and checks the FP8 result against the simulation of `hybridlm.lowp.fp8` (exact E4M3 values,
FP32 matmul). The goal from the issue: >= 1.5x for the GEMM at d = 4096 and 8192 on an H100.

    python benchmarks/bench_fp8_gemm.py                      # d = 4096, 8192; tokens = 8192
    python benchmarks/bench_fp8_gemm.py --sizes 2048,4096 --tokens 16384 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from _common import environment_line, write_json  # noqa: E402  (also puts src/ on sys.path)

from hybridlm.lowp import fp8  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,8192", help="comma list of d (K = N = d)")
    ap.add_argument("--tokens", type=int, default=8192, help="M, the rows of the activation operand")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args(argv)


def time_ms(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_size(d: int, tokens: int, iters: int, warmup: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(tokens, d, device="cuda", generator=gen, dtype=torch.bfloat16)
    w = torch.randn(d, d, device="cuda", generator=gen, dtype=torch.bfloat16) * d ** -0.5
    xq, wq = fp8.quantize(x), fp8.quantize(w)
    wq_t = wq.t()                                       # (K, N) column-major view, as _scaled_mm wants
    bf16_ms = time_ms(lambda: x @ w.t(), iters, warmup)
    fp8_ms = time_ms(lambda: fp8.fp8_matmul_scaled_mm(xq, wq_t, torch.bfloat16), iters, warmup)
    full_ms = time_ms(lambda: fp8.fp8_matmul_scaled_mm(fp8.quantize(x), fp8.quantize(w).t(), torch.bfloat16),
                      iters, warmup)
    real = fp8.fp8_matmul_scaled_mm(xq, wq_t, torch.float32)
    sim = fp8.fp8_matmul_simulated(xq, wq_t, torch.float32)
    err = float((real - sim).abs().max() / sim.abs().max())
    flops = 2 * tokens * d * d
    return {"d": d, "tokens": tokens, "bf16_ms": bf16_ms, "fp8_ms": fp8_ms, "fp8_quant_ms": full_ms,
            "speedup_gemm": bf16_ms / fp8_ms, "speedup_with_quant": bf16_ms / full_ms,
            "bf16_tflops": flops / bf16_ms / 1e9, "fp8_tflops": flops / fp8_ms / 1e9,
            "max_rel_diff_vs_simulation": err}


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_fp8_gemm: no CUDA device here; FP8 GEMMs need an NVIDIA GPU with compute capability "
                 ">= 8.9 (Ada / Hopper / Blackwell). Nothing measured.")
    if not fp8.scaled_mm_available("cuda"):
        cc = ".".join(map(str, torch.cuda.get_device_capability()))
        sys.exit(f"bench_fp8_gemm: {torch.cuda.get_device_name()} has compute capability {cc}; "
                 "torch._scaled_mm FP8 needs >= 8.9. Nothing measured.")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(environment_line("cuda"))
    rows = [bench_size(int(d), a.tokens, a.iters, a.warmup) for d in a.sizes.split(",")]
    head = (f"{'d':>6} {'M':>6} {'bf16 ms':>9} {'fp8 ms':>8} {'fp8+q ms':>9} {'GEMM x':>7} {'w/ quant x':>10} "
            f"{'bf16 TF/s':>10} {'fp8 TF/s':>9} {'vs sim':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['d']:>6} {r['tokens']:>6} {r['bf16_ms']:>9.3f} {r['fp8_ms']:>8.3f} {r['fp8_quant_ms']:>9.3f} "
              f"{r['speedup_gemm']:>6.2f}x {r['speedup_with_quant']:>9.2f}x {r['bf16_tflops']:>10.0f} "
              f"{r['fp8_tflops']:>9.0f} {r['max_rel_diff_vs_simulation']:>8.1e}")
    write_json(a.json, {"device": torch.cuda.get_device_name(), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
