"""Serving throughput and latency: a hybrid preset vs its parameter-matched Transformer twin.

Both models are served by the same continuous-batching `Engine` (hybridlm.serve.engine) under
the same closed-loop load: `--concurrency` clients, each sending a request (a random
prompt of P tokens, greedy, exactly O new tokens: no EOS) and the next one as soon as
its answer is complete, until `--requests` requests are done. The engine's batch holds
`--concurrency` slots, so requests join (prefill) and leave the running batch exactly as
in `hybridlm serve` (the HTTP layer is left out: it costs both models the same).

Side by side in one process: the two engines take turns, one step each, and each is
timed on its own clock (the time spent in its own steps), so each is measured as if it
ran alone while a burst of load from other processes hits both alike.

Reported per model and setting P+O: output tokens/s (all generated tokens / engine
time), request latency p50 / p99 (sent -> last token, engine time), time to first token
p50, and the cache one request holds at P+O tokens (fp32). The twin is
`param_matched_twin(cfg)` (every M layer -> attention, ffn_dim raised to match the
parameter count). Random weights, float32, `torch.inference_mode`. Results per setting
are cached in `--cache`, so a rerun (e.g. after an interruption) skips what is done;
`--fresh` ignores the cache.

    python benchmarks/bench_serve.py --threads 1                       # 1k+1k and 4k+4k
    python benchmarks/bench_serve.py --settings 256+256 --requests 8 --concurrency 4
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from _common import (cpu_pressure_us, environment_line, hybrid_and_twin, parse_common,  # noqa: E402
                     report_contention, sync, twin_parser, write_json)  # (also puts src/ on sys.path)

from hybridlm.model import HybridLM  # noqa: E402
from hybridlm.model.info import kv_bytes_per_token, mamba_state_bytes  # noqa: E402
from hybridlm.serve.engine import Engine, Request, RequestOutput  # noqa: E402
from hybridlm.serve.sampling import SamplingParams  # noqa: E402

MiB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = twin_parser(__doc__)
    ap.add_argument("--settings", nargs="+", default=["1024+1024", "4096+4096"],
                    help="prompt+output token lengths, e.g. 1024+1024")
    ap.add_argument("--requests", type=int, default=16, help="requests per model and setting")
    ap.add_argument("--concurrency", type=int, default=8, help="clients in flight (= engine batch slots)")
    ap.add_argument("--memory-matched", action="store_true",
                    help="give the hybrid the concurrency that fits in the cache memory the Transformer's "
                         "--concurrency slots use at P+O tokens (and as many more requests), as the papers "
                         "compare at a memory budget; default: the same concurrency for both")
    ap.add_argument("--prefill-chunk", type=int, default=2048, help="prompt tokens per prefill forward call")
    ap.add_argument("--cache", type=Path, default=Path("runs/bench_serve_cache.json"),
                    help="per-run results, reused by a rerun with the same arguments")
    ap.add_argument("--fresh", action="store_true", help="ignore (and overwrite) cached runs")
    ap.add_argument("--plot", type=Path, default=None, help="write a PNG: throughput and latency per setting")
    args = parse_common(ap, argv)
    try:
        args.settings = [tuple(int(x) for x in s.split("+")) for s in args.settings]
    except ValueError:
        ap.error("--settings take the form PROMPT+OUTPUT, e.g. 1024+1024")
    if any(len(s) != 2 or min(s) < 1 for s in args.settings) or min(args.requests, args.concurrency) < 1:
        ap.error("--settings need two positive lengths; --requests and --concurrency must be >= 1")
    return args


class ClosedLoop:
    """One model's engine under a closed-loop load, timed on its own clock.

    The clock advances only by the time spent inside this engine's `step()`, so two
    models stepped alternately in one process are each timed as if they ran alone, and
    a burst of load from other processes hits both alike. Latency = clock at the end of
    the step that finished a request - clock when it was sent; output tokens/s =
    all generated tokens / final clock.
    """

    def __init__(self, model: HybridLM, prompt_len: int, out_len: int, n_requests: int, concurrency: int,
                 prefill_chunk: int, device: str, seed: int) -> None:
        self.engine = Engine(model, max_batch=concurrency, max_queue=concurrency,
                             max_model_len=prompt_len + out_len, prefill_chunk=prefill_chunk,
                             prefill_tokens_per_step=prompt_len)
        self.vocab, self.prompt_len, self.out_len, self.n = model.cfg.vocab_size, prompt_len, out_len, n_requests
        self.device, self.rng, self.clock, self.sent = device, random.Random(seed), 0.0, 0
        self.t_sent: dict[str, float] = {}
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self._first: list[str] = []   # events of the running step, stamped when it ends
        self._done: list[str] = []
        self._failure: str | None = None  # raised from step(): the engine swallows callback exceptions
        for _ in range(min(concurrency, n_requests)):
            self._send()

    @property
    def finished(self) -> bool:
        return len(self.latency) == self.n

    def step(self) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self.engine.step()
        sync(self.device)
        self.clock += time.perf_counter() - t0
        if self._failure:
            raise RuntimeError(self._failure)
        self.ttft += [self.clock - self.t_sent[rid] for rid in self._first]
        self.latency += [self.clock - self.t_sent[rid] for rid in self._done]
        for _ in self._done:  # each finished client sends its next request
            self._send()
        self._first, self._done = [], []

    def _send(self) -> None:
        if self.sent >= self.n:
            return
        self.sent += 1
        prompt = [self.rng.randrange(self.vocab) for _ in range(self.prompt_len)]
        req = Request(prompt, SamplingParams(max_new_tokens=self.out_len, temperature=0, eos_id=None),
                      on_output=self._on_output)
        self.t_sent[req.request_id] = self.clock
        self.engine.submit(req)

    def _on_output(self, out: RequestOutput) -> None:
        if out.completion_tokens == 1 and out.token_ids:
            self._first.append(out.request_id)
        if out.finished:
            if out.finish_reason != "length" or out.completion_tokens != self.out_len:
                self._failure = (f"request {out.request_id} ended with {out.finish_reason} after "
                                 f"{out.completion_tokens} tokens" + (f": {out.error}" if out.error else ""))
            self._done.append(out.request_id)

    def result(self) -> dict:
        lat, ttft = sorted(self.latency), sorted(self.ttft)
        return {"clock_s": self.clock, "output_tok_s": self.n * self.out_len / self.clock,
                "total_tok_s": self.n * (self.prompt_len + self.out_len) / self.clock,
                "latency_p50_s": _pct(lat, 50), "latency_p99_s": _pct(lat, 99),
                "latency_mean_s": statistics.fmean(lat), "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
                "engine_steps": self.engine.stats["steps"]}


def cache_mib(cfg, tokens: int) -> float:
    """Inference cache of one request holding `tokens` tokens, fp32 (what the engine keeps)."""
    return (kv_bytes_per_token(cfg, 4) * tokens + mamba_state_bytes(cfg, 4)) / MiB


def loads(configs: dict, prompt_len: int, out_len: int, args) -> dict[str, tuple[int, int]]:
    """(concurrency, requests) per model: the same for both, or memory-matched for the hybrid."""
    out = {name: (args.concurrency, args.requests) for name in configs}
    if args.memory_matched:
        budget = args.concurrency * cache_mib(configs["transformer"], prompt_len + out_len)
        c = max(1, int(budget // cache_mib(configs["hybrid"], prompt_len + out_len)))
        out["hybrid"] = (c, max(c, round(args.requests * c / args.concurrency)))
    return out


def run_side_by_side(models: dict[str, HybridLM], prompt_len: int, out_len: int, load: dict, args) -> dict[str, dict]:
    """Both models under their loads, their engines stepped alternately until every request is done."""
    loops = {name: ClosedLoop(m, prompt_len, out_len, load[name][1], load[name][0], args.prefill_chunk,
                              args.device, args.seed + prompt_len) for name, m in models.items()}
    with tqdm(total=sum(n for _, n in load.values()), desc=f"{prompt_len}+{out_len}", unit="req", leave=False,
              mininterval=10) as bar:
        while not all(loop.finished for loop in loops.values()):
            for loop in loops.values():
                if not loop.finished:
                    before = len(loop.latency)
                    loop.step()
                    bar.update(len(loop.latency) - before)
    return {name: loop.result() for name, loop in loops.items()}


def _pct(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list."""
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = (len(sorted_values) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t_start, psi_start = time.perf_counter(), cpu_pressure_us()
    print(environment_line(args.device))
    cfg, twin, n_h, n_t = hybrid_and_twin(args)
    configs = {"hybrid": cfg, "transformer": twin}
    print(f"closed loop: {args.concurrency} clients, {args.requests} requests per model and setting, random "
          f"prompts, greedy, no EOS; float32, inference_mode", flush=True)

    cache: dict = {}
    if args.cache.is_file() and not args.fresh:
        cache = json.loads(args.cache.read_text())
    torch.manual_seed(args.seed)
    models = {name: HybridLM(c).to(args.device).eval() for name, c in configs.items()}
    for model in models.values():  # first-call costs out of the timings
        warm = ClosedLoop(model, 64, 8, 2, 2, args.prefill_chunk, args.device, args.seed)
        while not warm.finished:
            warm.step()

    rows = []
    for prompt_len, out_len in args.settings:
        load = loads(configs, prompt_len, out_len, args)
        key = (f"{args.device}|{args.preset}|{cfg.pattern}|{prompt_len}+{out_len}|{args.requests}x{args.concurrency}"
               f"|chunk{args.prefill_chunk}|threads{torch.get_num_threads()}"
               + ("|memory-matched" if args.memory_matched else ""))
        if key in cache:
            row = cache[key]
            print(f"  {prompt_len}+{out_len}: cached in {args.cache}", flush=True)
        else:
            psi0, t0 = cpu_pressure_us(), time.perf_counter()
            row = {"prompt": prompt_len, "output": out_len,
                   **run_side_by_side(models, prompt_len, out_len, load, args)}
            for name, (c, n) in load.items():
                row[name].update(concurrency=c, requests=n)
            row["wall_s"] = time.perf_counter() - t0
            psi1 = cpu_pressure_us()
            row["cpu_contention"] = None if psi0 is None or psi1 is None else (psi1 - psi0) / 1e6 / row["wall_s"]
            cache[key] = row
            args.cache.parent.mkdir(parents=True, exist_ok=True)
            args.cache.write_text(json.dumps(cache, indent=2) + "\n")
        for name, c in configs.items():
            res = row[name]
            res.setdefault("concurrency", load[name][0])
            res.setdefault("requests", load[name][1])
            res["cache_mib_per_request"] = cache_mib(c, prompt_len + out_len)
            print(f"  {prompt_len}+{out_len} {name:<11} ({res['concurrency']} clients, {res['requests']} requests): "
                  f"{res['output_tok_s']:7.1f} output tok/s, latency p50 "
                  f"{res['latency_p50_s']:.1f} s p99 {res['latency_p99_s']:.1f} s, TTFT p50 {res['ttft_p50_s']:.2f} s "
                  f"({res['clock_s']:.0f} s of engine time)", flush=True)
        print(f"  ({row['wall_s']:.0f} s wall for both, CPU contention {_fmt_pct(row.get('cpu_contention'))})")
        row["speedup"] = row["hybrid"]["output_tok_s"] / row["transformer"]["output_tok_s"]
        rows.append(row)

    print()
    print("| prompt+output | clients (hybrid / transformer) | hybrid out tok/s | transformer out tok/s | speed-up | hybrid latency p50 / p99 s "
          "| transformer latency p50 / p99 s | hybrid TTFT p50 s | transformer TTFT p50 s "
          "| cache MiB / request (hybrid / transformer) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        h, t = r["hybrid"], r["transformer"]
        print(f"| {r['prompt']}+{r['output']} | {h['concurrency']} / {t['concurrency']} | {h['output_tok_s']:.1f} | {t['output_tok_s']:.1f} "
              f"| **{r['speedup']:.2f}x** | {h['latency_p50_s']:.1f} / {h['latency_p99_s']:.1f} "
              f"| {t['latency_p50_s']:.1f} / {t['latency_p99_s']:.1f} | {h['ttft_p50_s']:.2f} | {t['ttft_p50_s']:.2f} "
              f"| {h['cache_mib_per_request']:.1f} / {t['cache_mib_per_request']:.1f} |")
    wall = time.perf_counter() - t_start
    print(f"({'memory-matched: the hybrid gets the clients that fit in the transformer cache memory; ' if args.memory_matched else ''}"
          f"{args.concurrency} clients and {args.requests} requests for the transformer; fp32 cache; "
          f"total benchmark time {wall:.0f} s)")
    contention = report_contention(psi_start, wall)
    result = {
        "benchmark": "serve", "torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
        "dtype": "float32", "preset": args.preset, "requests": args.requests, "concurrency": args.concurrency,
        "prefill_chunk": args.prefill_chunk, "memory_matched": args.memory_matched, "hybrid_config": cfg.to_dict(), "transformer_config": twin.to_dict(),
        "hybrid_params": n_h, "transformer_params": n_t, "cpu_contention": contention, "rows": rows,
    }
    write_json(args.json, result)
    if args.plot:
        plot(rows, args.plot)
    return result


def plot(rows: list[dict], path: Path) -> None:
    """Two panels: output tokens/s and latency p50 (bar) / p99 (tick), hybrid vs transformer per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['prompt']}+{r['output']}\n({r['hybrid']['concurrency']} / {r['transformer']['concurrency']} clients)"
              for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for off, name, color in ((-0.2, "hybrid", "tab:green"), (0.2, "transformer", "tab:gray")):
        xs = [i + off for i in x]
        ax1.bar(xs, [r[name]["output_tok_s"] for r in rows], 0.4, color=color, label=name)
        ax2.bar(xs, [r[name]["latency_p50_s"] for r in rows], 0.4, color=color, label=f"{name} p50")
        ax2.scatter(xs, [r[name]["latency_p99_s"] for r in rows], color="black", marker="_", s=300,
                    label="p99" if name == "hybrid" else None)
    for i, r in enumerate(rows):
        ax1.annotate(f"{r['speedup']:.2f}x", (i, max(r["hybrid"]["output_tok_s"], r["transformer"]["output_tok_s"])),
                     ha="center", va="bottom")
    ax1.margins(y=0.2)
    for ax, title in ((ax1, "output tokens/s (higher is better)"), (ax2, "request latency, s (lower is better)")):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("prompt + output tokens (clients: hybrid / transformer)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("hybridlm serve engine: tiny hybrid vs parameter-matched Transformer (CPU)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0%}"


if __name__ == "__main__":
    main()
