"""Prefill and decode tok/s of hybridlm against its peers, on the same weights, side by side.

Engines: `eager` and `compiled` (hybridlm's fixed-shape `hybridlm.serve.decoder.Decoder`,
`compile=False` / `compile=True`), `transformers` (`NemotronHForCausalLM` of the installed
transformers, its pure-PyTorch path, SDPA attention) and `llama.cpp` (`llama-bench`, and
`llama-batched-bench` for batch > 1 when that binary exists). One random-init checkpoint
per model (fixed `--seed`) is saved once as hybridlm, exported with `hybridlm convert` to
a Hugging Face directory (what transformers loads) and converted by llama.cpp's own
`convert_hf_to_gguf.py --outtype f32` (what llama.cpp loads); all cached in
`runs/peers/`. Everything runs in float32.

Method. Every measurement is its own process (torch and ggml fight over OpenMP threads
in one process; the thread count is fixed per process: OMP_NUM_THREADS, torch threads,
llama.cpp `-t`). The grid is run `--rounds` times; in each round the engines take turns
for every (model, threads, context, batch) cell, so load from elsewhere hits all alike;
the tables give the median over the rounds. In a PyTorch worker (`torch.inference_mode`):
an untimed warm-up (a prefill of min(C, `--warmup-prefill`) tokens per row, then
`--warmup-steps` decode steps: the compiled engine compiles here, its compile time is
reported apart, never inside the timings), then the timed prefill of a random (batch, C)
prompt, 2 untimed steps, and `--steps` timed greedy decode steps with C tokens already in
the context. prefill tok/s = batch * C / prefill time; decode tok/s = batch / median step
time. llama.cpp: `llama-bench -p C -n 0` (prefill, after llama-bench's own warm-up) and
`llama-bench -p 0 -n STEPS -d C` (decode STEPS tokens after a depth of C tokens), tok/s
from the median of its `--llama-reps` repetitions; batch > 1: `llama-batched-bench -npp C
-ntg STEPS -npl BATCH` (its S_PP and S_TG). llama.cpp keeps K/V in f16 (`--llama-kv-type`:
llama-bench takes no f32 there), the other engines in f32. Ratios are hybridlm tok/s /
peer tok/s (> 1: hybridlm faster). llama.cpp runs on the CPU; transformers follows
`--device` as hybridlm does. An engine that cannot run (no binary, no Decoder) shows n/a,
with the reason printed under the tables; the run goes on.

Before the grid, for each model: the GGUF's embedding/output matrices are compared with
the checkpoint's, and (when the llama-cpp-python source tree that vendors llama.cpp is
there) llama.cpp's prompt logits and 16 greedy tokens with hybridlm's.

    python benchmarks/bench_peers.py --llama-bin-dir /path/to/llama.cpp/build/bin
    python benchmarks/bench_peers.py --model tiny,medium --contexts 512 --batch 1 --threads 1 --steps 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _common import cpu_pressure_us, environment_line, report_contention, sync, write_json  # noqa: E402
import _peers  # noqa: E402

ENGINES = ("eager", "compiled", "transformers", "llama.cpp")
HYBRID = ("eager", "compiled")
PEERS = ("llama.cpp", "transformers")
SHORT = {"eager": "eager", "compiled": "compiled", "transformers": "tf", "llama.cpp": "llama"}
RESULT_TAG = "BENCH_PEERS_RESULT "


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each flag, the docstring's method text as written."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=_HelpFormatter)
    ap.add_argument("--preset", default="tiny", help="hybridlm preset used when --model is not given")
    ap.add_argument("--model", default=None,
                    help="comma-separated models: hybridlm preset names and/or 'medium' (about 41M parameters: "
                         "d_model 512, 4 groups of M-M-*-, 4 Mamba groups, 4 KV heads); default: --preset")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts, one process each")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192],
                    help="prompt lengths C: prefill C tokens, then decode with C tokens in the context")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (sequences decoded together)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per measurement")
    ap.add_argument("--warmup-steps", type=int, default=4, help="untimed decode steps before timing (compiles)")
    ap.add_argument("--warmup-prefill", type=int, default=512, help="prompt tokens per row of the warm-up prefill")
    ap.add_argument("--rounds", type=int, default=3, help="repeats of the whole grid; tables show the median")
    ap.add_argument("--llama-bin-dir", default=None,
                    help="directory of the llama.cpp binaries (llama-bench, ...); default $LLAMA_CPP_BIN, else PATH")
    ap.add_argument("--llama-tree", default=None,
                    help="llama.cpp source tree with convert_hf_to_gguf.py; default: two levels above the binaries")
    ap.add_argument("--llama-reps", type=int, default=1, help="llama-bench -r (repetitions inside one call)")
    ap.add_argument("--llama-kv-type", default="f16",
                    help="llama.cpp KV cache type (-ctk/-ctv): llama-bench accepts f16, bf16 and quantized types, "
                         "not f32, so its attention reads half the KV bytes ours does (the weights are F32)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda, for the hybridlm and transformers engines")
    ap.add_argument("--seed", type=int, default=0, help="weights and prompts")
    ap.add_argument("--out-dir", type=Path, default=_peers.ROOT / "runs" / "peers", help="checkpoint cache")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement process")
    ap.add_argument("--json", type=Path, default=None, help="write all results (every round) and the medians here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    args = ap.parse_args(argv)
    if args.worker:
        return args
    args.models = (args.model or args.preset).split(",")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if bad := sorted(set(args.engines) - set(ENGINES)):
        ap.error(f"unknown engine(s) {bad}; choose from {','.join(ENGINES)}")
    if min(args.steps, args.rounds, args.llama_reps, *args.threads, *args.contexts, *args.batch) < 1:
        ap.error("--steps, --rounds, --llama-reps, --threads, --contexts and --batch must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda given but torch.cuda.is_available() is False")
    return args


# ---- one measurement (inside a worker process) --------------------------------------------
def _runner(spec: dict[str, Any]) -> _peers.HybridRunner | _peers.TransformersRunner:
    from hybridlm import load
    if spec["engine"] == "transformers":
        return _peers.TransformersRunner(Path(spec["hf"]), spec["device"])
    model = load(spec["hybridlm"], device=spec["device"])
    max_len = spec["context"] + spec["warmup_steps"] + spec["steps"] + 8
    return _peers.HybridRunner(model, spec["batch"], max_len, compile=spec["engine"] == "compiled")


@torch.inference_mode()
def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm-up, timed prefill, timed decode steps of one engine for one cell (see the module docstring)."""
    torch.set_num_threads(spec["threads"])
    device, b, c = spec["device"], spec["batch"], spec["context"]
    psi, t_start = cpu_pressure_us(), time.perf_counter()
    runner = _runner(spec)
    vocab = json.loads((Path(spec["hf"]) / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(spec["seed"] + c)
    ids = torch.randint(0, vocab, (b, c), generator=gen).to(device)
    tok = runner.prefill(ids[:, :min(c, spec["warmup_prefill"])]).argmax(-1)
    for _ in range(spec["warmup_steps"]):
        tok = runner.step(tok).argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    logits = runner.prefill(ids)
    sync(device)
    prefill_s = time.perf_counter() - t0
    tok = logits.argmax(-1)
    for _ in range(2):
        tok = runner.step(tok).argmax(-1)
    times = []
    for _ in range(spec["steps"]):
        sync(device)
        t0 = time.perf_counter()
        tok = runner.step(tok).argmax(-1)
        sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    wall = time.perf_counter() - t_start
    psi_end = cpu_pressure_us()
    return {"prefill_tok_s": b * c / prefill_s, "decode_tok_s": b / med, "prefill_s": prefill_s,
            "step_ms_median": med * 1e3, "step_ms_min": min(times) * 1e3, "compile_s": runner.compile_seconds,
            "runner": runner.kind, "torch_threads": torch.get_num_threads(), "worker_wall_s": wall,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "contention": None if psi is None or psi_end is None else (psi_end - psi) / 1e6 / wall}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        result = measure(spec)
    except _peers.EngineUnavailable as err:
        result = {"unavailable": str(err)}
    except Exception as err:  # reported in the table, the run goes on
        result = {"error": f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err) else ''}"}
    print(RESULT_TAG + json.dumps(result), flush=True)


def spawn(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh process with the thread count fixed from the start."""
    n = str(spec["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s (--timeout)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = " | ".join(proc.stderr.strip().splitlines()[-2:])
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit {proc.returncode}"
    return {"error": f"worker {why}: {tail}"}


# ---- the parent: checkpoints, the interleaved grid, the tables ----------------------------
def prepare(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The checkpoints of every model (+ GGUF when llama.cpp is wanted and found) and llama.cpp's state."""
    from hybridlm.model import count_params
    max_seq_len = max(16384, max(args.contexts) + args.warmup_steps + args.steps + 16)
    models = []
    for name in args.models:
        cfg = _peers.model_config(name, max_seq_len)
        paths = _peers.prepare_checkpoint(name, cfg, args.seed, args.out_dir)
        print(f"model {name}: {count_params(cfg):,} parameters, pattern {cfg.pattern}, d_model {cfg.d_model}, "
              f"seed {args.seed}; checkpoints in {paths['dir']}")
        models.append({"name": name, "params": count_params(cfg), "config": cfg.to_dict(), "paths": paths})
    llama: dict[str, Any] = {"bins": {}, "reason": None}
    if "llama.cpp" not in args.engines:
        return models, llama
    llama["bins"], where = _peers.find_llama(args.llama_bin_dir)
    tree = _peers.find_llama_tree(args.llama_tree, llama["bins"])
    if not llama["bins"]:
        llama["reason"] = f"no llama.cpp binaries ({', '.join(_peers.LLAMA_BINARIES[:2])}) in {where}"
    elif tree is None:
        llama["reason"] = "no convert_hf_to_gguf.py found (give --llama-tree, the llama.cpp source tree)"
    for m in models if llama["reason"] is None else []:
        t0 = time.perf_counter()
        llama["reason"] = _peers.convert_to_gguf(tree, m["paths"]["hf"], m["paths"]["gguf"], args.timeout)
        if llama["reason"]:
            break
        print(f"  GGUF F32 by {tree}/convert_hf_to_gguf.py: {m['paths']['gguf']} ({time.perf_counter() - t0:.0f} s)")
        _checks(tree, llama["bins"], m)
    if llama["reason"]:
        print(f"llama.cpp: skipped ({llama['reason']})")
    else:
        print("llama.cpp: " + ", ".join(f"{k} {v}" for k, v in llama["bins"].items()))
    return models, llama


def _checks(tree: Path, bins: dict[str, Path], model: dict[str, Any]) -> None:
    """Print that llama.cpp holds the same weights and computes the same thing (never fails the run)."""
    gguf, ours = model["paths"]["gguf"], model["paths"]["hybridlm"]
    for name, check in (("same weights", lambda: _peers.check_gguf_weights(tree, gguf, ours)),
                        ("llama.cpp vs hybridlm", lambda: _peers.greedy_check(tree, bins, gguf, ours))):
        try:
            model.setdefault("checks", {})[name] = line = check()
        except Exception as err:  # a check that cannot run is reported, the benchmark goes on
            line = f"skipped ({type(err).__name__}: {err})"
        print(f"  {name}: {line}")


def run_cell(args: argparse.Namespace, model: dict[str, Any], llama: dict[str, Any], engine: str,
             threads: int, context: int, batch: int) -> dict[str, Any]:
    """One measurement: a PyTorch worker process, or llama.cpp's benchmark binaries."""
    if engine == "llama.cpp":
        if llama["reason"]:
            return {"unavailable": llama["reason"]}
        try:
            return _peers.llama_bench_cell(llama["bins"], model["paths"]["gguf"], threads, context, batch,
                                           args.steps, args.llama_reps, args.llama_kv_type, args.timeout)
        except _peers.EngineUnavailable as err:
            return {"unavailable": str(err)}
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as err:
            return {"error": f"{type(err).__name__}: {err}"}
    spec = {"engine": engine, "threads": threads, "context": context, "batch": batch, "steps": args.steps,
            "warmup_steps": args.warmup_steps, "warmup_prefill": args.warmup_prefill, "device": args.device,
            "seed": args.seed, "hybridlm": str(model["paths"]["hybridlm"]), "hf": str(model["paths"]["hf"])}
    return spawn(spec, args.timeout)


def run_grid(args: argparse.Namespace, models: list[dict[str, Any]], llama: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell `--rounds` times; within a round the engines take turns cell by cell."""
    results, unavailable = [], set()
    grid = itertools.product(range(args.rounds), models, args.threads, args.contexts, args.batch, args.engines)
    for rnd, model, threads, context, batch, engine in grid:
        key = (model["name"], engine, threads, context, batch)
        if key in unavailable:  # e.g. no Decoder, no llama-batched-bench: not tried again in later rounds
            continue
        psi, t0 = cpu_pressure_us(), time.perf_counter()
        res = run_cell(args, model, llama, engine, threads, context, batch)
        wall, psi_end = time.perf_counter() - t0, cpu_pressure_us()
        if psi is not None and psi_end is not None and wall > 0:
            res["cell_contention"] = (psi_end - psi) / 1e6 / wall
        if "unavailable" in res:
            unavailable.add(key)
        results.append({"round": rnd, "model": model["name"], "engine": engine, "threads": threads,
                        "context": context, "batch": batch, **res})
        print(f"  round {rnd + 1}/{args.rounds} {model['name']} t{threads} C{context} b{batch} {engine:12s} "
              f"{_cell_line(res)} ({wall:.0f} s)", flush=True)
    return results


def _cell_line(res: dict[str, Any]) -> str:
    if "prefill_tok_s" not in res:
        return "n/a: " + res.get("unavailable", res.get("error", "?"))
    extra = f", compile {res['compile_s']:.1f} s" if res.get("compile_s") else ""
    if res.get("cell_contention", 0) > 0.10:
        extra += f", CPU contention {res['cell_contention']:.0%}: noisy"
    return f"prefill {res['prefill_tok_s']:9.1f} tok/s, decode {res['decode_tok_s']:8.1f} tok/s{extra}"


def summarize(results: list[dict[str, Any]], engines: list[str]) -> list[dict[str, Any]]:
    """One row per (model, threads, context, batch): per engine the medians over the rounds, or why not."""
    rows: dict[tuple, dict[str, Any]] = {}
    for r in results:
        key = (r["model"], r["threads"], r["context"], r["batch"])
        row = rows.setdefault(key, dict(zip(("model", "threads", "context", "batch"), key), engines={}))
        row["engines"].setdefault(r["engine"], []).append(r)
    for row in rows.values():
        for engine, runs in list(row["engines"].items()):
            ok = [r for r in runs if "prefill_tok_s" in r]
            if not ok:
                row["engines"][engine] = {"na": runs[-1].get("unavailable", runs[-1].get("error", "?"))}
                continue
            med = {k: statistics.median(r[k] for r in ok) for k in ("prefill_tok_s", "decode_tok_s")}
            row["engines"][engine] = {**med, "rounds": len(ok), "compile_s": max(r.get("compile_s", 0) for r in ok),
                                      "failed_rounds": len(runs) - len(ok)}
        for metric in ("prefill_tok_s", "decode_tok_s"):
            for h in HYBRID:
                for p in PEERS:
                    a, b = row["engines"].get(h, {}), row["engines"].get(p, {})
                    if metric in a and metric in b:
                        row.setdefault("ratios", {})[f"{metric}:{h}/{p}"] = a[metric] / b[metric]
    return list(rows.values())


def print_table(rows: list[dict[str, Any]], engines: list[str], metric: str, title: str) -> None:
    ratios = [(h, p) for p in PEERS for h in HYBRID if h in engines and p in engines]
    head = ["model", "threads", "context", "batch", *engines, *(f"{SHORT[h]}/{SHORT[p]}" for h, p in ratios)]
    if metric == "decode_tok_s" and "compiled" in engines:
        head.append("compile s (max)")
    print(f"\n{title}\n")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|")
    for row in rows:
        cells = [row["model"], str(row["threads"]), str(row["context"]), str(row["batch"])]
        for engine in engines:
            e = row["engines"].get(engine, {})
            cells.append(f"{e[metric]:.1f}" if metric in e else "n/a")
        for h, p in ratios:
            value = row.get("ratios", {}).get(f"{metric}:{h}/{p}")
            cells.append(f"{value:.2f}x" if value is not None else "n/a")
        if metric == "decode_tok_s" and "compiled" in engines:
            c = row["engines"].get("compiled", {}).get("compile_s")
            cells.append(f"{c:.1f}" if c else "n/a")
        print("| " + " | ".join(cells) + " |")


def print_reasons(rows: list[dict[str, Any]]) -> None:
    """Why a cell is n/a, once per distinct reason, and rounds that failed."""
    seen: dict[str, list[str]] = {}
    for row in rows:
        for engine, e in row["engines"].items():
            where = f"{row['model']} t{row['threads']} C{row['context']} b{row['batch']}"
            if "na" in e:
                seen.setdefault(f"{engine}: {e['na']}", []).append(where)
            elif e["failed_rounds"]:
                reason = f"{engine}: {e['failed_rounds']} round(s) failed (median of the rest)"
                seen.setdefault(reason, []).append(where)
    for reason, cells in seen.items():
        print(f"n/a  {reason}  [{', '.join(cells[:4])}{', ...' if len(cells) > 4 else ''}]")


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return None
    t_start, psi_start = time.perf_counter(), cpu_pressure_us()
    print(environment_line(args.device))
    print(f"engines {','.join(args.engines)} | threads {args.threads} | contexts {args.contexts} | batch {args.batch} "
          f"| {args.steps} timed steps | {args.rounds} round(s), median | float32 | one process per measurement")
    models, llama = prepare(args)
    results = run_grid(args, models, llama)
    rows = summarize(results, args.engines)
    print_table(rows, args.engines, "prefill_tok_s", "Prefill tok/s (batch * C prompt tokens / prefill time; "
                "ratio = hybridlm / peer, > 1: hybridlm faster)")
    print_table(rows, args.engines, "decode_tok_s", "Decode tok/s at context C (batch / median step time; "
                "llama-bench: STEPS / time after a depth of C)")
    print()
    print_reasons(rows)
    wall = time.perf_counter() - t_start
    print(f"total benchmark time {wall:.0f} s")
    contention = report_contention(psi_start, wall)
    result = {"benchmark": "peers", "torch": torch.__version__, "device": args.device, "dtype": "float32",
              "engines": args.engines, "threads": args.threads, "contexts": args.contexts, "batch": args.batch,
              "steps": args.steps, "warmup_steps": args.warmup_steps, "rounds": args.rounds, "seed": args.seed,
              "models": [{k: (v if k != "paths" else {n: str(p) for n, p in v.items()}) for k, v in m.items()}
                         for m in models],
              "llama_cpp": {"bins": {k: str(v) for k, v in llama["bins"].items()}, "skipped": llama["reason"]},
              "cpu_contention": contention, "wall_s": wall, "rows": rows, "runs": results}
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
