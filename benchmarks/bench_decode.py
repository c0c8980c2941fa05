"""Decode throughput and cache size: a hybrid preset vs a parameter-matched pure-attention twin.

The twin is `transformer_twin(cfg)` (every M layer becomes attention) with its
`ffn_dim` raised so its total parameter count matches the hybrid's within
`--param-tol` (see `param_matched_twin`). Both models get random weights and run in
float32 under `torch.inference_mode`.

Method, per context length C and model: prefill a random prompt of C tokens at
batch 1 (timed, reported, not the metric), replicate the cache rows to each
`--batch` (`cache.select`; the decode cost does not depend on the values), run
`--warmup-steps` untimed greedy decode steps, then time `--steps` greedy steps of
one token each, the two models alternating in blocks of `--block` steps (so load
from other processes hits both alike). tokens/s = batch / median step time (mean
and min are in the JSON). On Linux the CPU contention over the run (PSI) is
printed, as a check that nothing else competed for the cores.
Cache sizes are `cache.nbytes()` right after the prefill (C tokens): the Mamba part
is a constant-size state, the attention part grows with C.

    python benchmarks/bench_decode.py                          # contexts 1k, 4k, 8k; batch 1 and 8
    python benchmarks/bench_decode.py --contexts 1024 --batch 1 --device cuda --json runs/decode.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from _common import (cpu_pressure_us, environment_line, hybrid_and_twin, parse_common,  # noqa: E402
                     report_contention, sync, twin_parser, write_json)  # (also puts src/ on sys.path)

from hybridlm.model import HybridLM  # noqa: E402

MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = twin_parser(__doc__)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 8192],
                    help="prompt lengths (tokens already in the cache when decoding starts)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="decode batch size(s)")
    ap.add_argument("--steps", type=int, default=64, help="timed decode steps (one token each)")
    ap.add_argument("--warmup-steps", type=int, default=4, help="untimed decode steps before timing")
    ap.add_argument("--block", type=int, default=8, help="decode steps per model before switching to the other")
    args = parse_common(ap, argv)
    if min(args.steps, args.block, *args.batch, *args.contexts) < 1 or args.warmup_steps < 0:
        ap.error("--steps, --block, --batch and --contexts must be >= 1 (--warmup-steps >= 0)")
    return args


@torch.inference_mode()
def prefill(model: HybridLM, context: int, capacity: int, device: str, gen: torch.Generator):
    """Batch-1 prefill of a random prompt; returns (cache, last logits, seconds)."""
    ids = torch.randint(0, model.cfg.vocab_size, (1, context), generator=gen).to(device)
    cache = model.new_cache(1, capacity)
    sync(device)
    t0 = time.perf_counter()
    logits = model(ids, cache)[:, -1]
    sync(device)
    return cache, logits, time.perf_counter() - t0


class Decoder:
    """Greedy decoding of one model on its own cache, one token per `step()`."""

    def __init__(self, model: HybridLM, cache, logits: torch.Tensor, device: str) -> None:
        self.model, self.cache, self.device = model, cache, device
        self.tok = logits.argmax(-1, keepdim=True)
        self.times: list[float] = []

    @torch.inference_mode()
    def step(self, record: bool = True) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self.tok = self.model(self.tok, self.cache)[:, -1].argmax(-1, keepdim=True)
        sync(self.device)
        if record:
            self.times.append(time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start, psi_start = time.perf_counter(), cpu_pressure_us()
    print(environment_line(args.device))
    cfg, twin, n_h, n_t = hybrid_and_twin(args)
    print(f"float32, inference_mode; batch-1 prefill of a random prompt, cache rows replicated to the batch; "
          f"{args.warmup_steps} warm-up + {args.steps} timed greedy decode steps per model, the two models "
          f"alternating in blocks of {args.block}; tok/s = batch / median step time")

    torch.manual_seed(args.seed)
    models = {"hybrid": HybridLM(cfg).to(args.device).eval(), "transformer": HybridLM(twin).to(args.device).eval()}
    for model in models.values():  # first-call costs (allocator, oneDNN primitives) out of the timings
        gen = torch.Generator().manual_seed(args.seed)
        for batch in args.batch:
            cache, logits, _ = prefill(model, 128, 128 + args.warmup_steps + 2, args.device, gen)
            rows_idx = torch.zeros(batch, dtype=torch.long, device=args.device)
            dec = Decoder(model, _replicated(cache, rows_idx), logits[rows_idx], args.device)
            for _ in range(args.warmup_steps + 2):
                dec.step(record=False)
    rows = []
    for context in args.contexts:
        capacity = context + args.warmup_steps + args.steps
        prefilled = {}
        for name, model in models.items():
            gen = torch.Generator().manual_seed(args.seed + context)  # the same prompt for both models
            prefilled[name] = prefill(model, context, capacity, args.device, gen)
        for batch in args.batch:
            rows_idx = torch.zeros(batch, dtype=torch.long, device=args.device)
            decoders = {name: Decoder(models[name], _replicated(cache1, rows_idx), logits1[rows_idx], args.device)
                        for name, (cache1, logits1, _) in prefilled.items()}
            for dec in decoders.values():
                for _ in range(args.warmup_steps):
                    dec.step(record=False)
            # alternate the models in blocks, so a burst of load from elsewhere hits both alike
            while any(len(d.times) < args.steps for d in decoders.values()):
                for dec in decoders.values():
                    for _ in range(min(args.block, args.steps - len(dec.times))):
                        dec.step()
            row = {"batch": batch, "context": context}
            for name, dec in decoders.items():
                med, mean = statistics.median(dec.times), statistics.fmean(dec.times)
                nbytes = prefilled[name][0].nbytes()
                row[name] = {
                    "tok_s": batch / med, "tok_s_mean": batch / mean, "step_ms_median": med * 1e3,
                    "step_ms_mean": mean * 1e3, "step_ms_min": min(dec.times) * 1e3,
                    "prefill_s": prefilled[name][2],
                    "cache_bytes": {k: v * batch for k, v in nbytes.items()},
                }
            row["speedup"] = row["hybrid"]["tok_s"] / row["transformer"]["tok_s"]
            row["cache_ratio"] = (sum(row["transformer"]["cache_bytes"].values())
                                  / sum(row["hybrid"]["cache_bytes"].values()))
            rows.append(row)
            del decoders
            print(f"  context {context} batch {batch}: hybrid {row['hybrid']['tok_s']:.0f} tok/s, transformer "
                  f"{row['transformer']['tok_s']:.0f} tok/s (prefill {row['hybrid']['prefill_s']:.2f} s / "
                  f"{row['transformer']['prefill_s']:.2f} s)", flush=True)
        del prefilled

    print()
    print("| batch | context | hybrid tok/s | transformer tok/s | speed-up | hybrid cache MiB (mamba + attn) "
          "| transformer cache MiB | cache ratio | prefill s (hybrid / transformer) |")
    print("|------:|--------:|-------------:|------------------:|---------:|--------------------------------:"
          "|----------------------:|------------:|---------------------------------:|")
    for r in rows:
        hc, tc = r["hybrid"]["cache_bytes"], r["transformer"]["cache_bytes"]
        h_cache = f"{(hc['mamba'] + hc['attention']) / MiB:.2f} ({hc['mamba'] / MiB:.2f} + {hc['attention'] / MiB:.2f})"
        print(f"| {r['batch']:>5} | {r['context']:>7} | {r['hybrid']['tok_s']:>12.1f} "
              f"| {r['transformer']['tok_s']:>17.1f} "
              f"| {r['speedup']:>7.2f}x | {h_cache:>31} | {(tc['mamba'] + tc['attention']) / MiB:>21.2f} "
              f"| {r['cache_ratio']:>10.2f}x "
              f"| {r['hybrid']['prefill_s']:>14.2f} / {r['transformer']['prefill_s']:<14.2f} |")
    wall = time.perf_counter() - t_start
    print(f"(prefill: batch 1, one prompt of `context` tokens; cache MiB at `context` tokens; "
          f"total benchmark time {wall:.0f} s)")
    contention = report_contention(psi_start, wall)

    result = {
        "benchmark": "decode", "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
        "dtype": "float32", "preset": args.preset, "steps": args.steps, "warmup_steps": args.warmup_steps,
        "hybrid_config": cfg.to_dict(), "transformer_config": twin.to_dict(),
        "hybrid_params": n_h, "transformer_params": n_t, "block": args.block, "cpu_contention": contention,
        "rows": rows,
    }
    write_json(args.json, result)
    return result


def _replicated(cache, rows: torch.Tensor):
    """A copy of `cache` whose batch rows are `cache`'s rows `rows` (the original is left as it is)."""
    out = copy.copy(cache)
    out.layers = [copy.copy(layer) for layer in cache.layers]
    out.select(rows)  # indexes every tensor with `rows`: new tensors, nothing shared
    return out


if __name__ == "__main__":
    main()
