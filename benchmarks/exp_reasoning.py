"""Experiment: a thinking budget on a small hybrid fine-tuned for reasoning, the Nemotron Nano 2 way.

1. **Base**: the `tiny` hybrid pretrained on the bundled King James Bible (or ``--base DIR``,
   e.g. the demo's ``runs/demo/final``).
2. **SFT** (`hybridlm.training.sft.sft`): conversations of the generated reasoning task
   (`hybridlm.tasks.reasoning`, default kind ``count``: how often a letter occurs in a string,
   with a trace that walks the string), a share of them with a ``<think>`` trace (system
   ``/think``) and the rest without (``/no_think``), as Nano 2 mixed both; the ChatML template
   and the new special tokens (``<|im_start|>``, ``<|im_end|>``, ``<think>``, ``</think>``) are
   added and the embeddings resized.
3. **Evaluation** on the test split (no problem in common with the training split), greedy,
   through the serving engine's own thinking-budget control (`SamplingParams.thinking_budget`,
   what ``hybridlm serve`` applies to a request's ``thinking_budget``):

       no thinking      system "/no_think": the generation prompt closes the block at once
       budget 25/50/100%   system "/think", the block force-closed ("\\n</think>\\n\\n") after
                        that share of the median trace length (in tokens)
       unlimited        system "/think", no budget

Prints a markdown table (accuracy, mean thinking tokens, mean answer tokens per condition),
writes ``OUT/results.json`` and the plot ``docs/img/exp_reasoning.png``. The base and SFT
runs are cached in ``OUT/`` (a re-run resumes or skips them).

    python benchmarks/exp_reasoning.py --threads 2                        # ~30 min on a 2-core CPU
    python benchmarks/exp_reasoning.py --pretrain-steps 20 --sft-steps 20 --test 20 --out /tmp/r   # smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import environment_line, parse_common, write_json  # noqa: E402

from hybridlm.interop.convert import load  # noqa: E402
from hybridlm.plotting import pyplot, save_figure  # noqa: E402
from hybridlm.serve.chat import render_chat  # noqa: E402
from hybridlm.serve.engine import Engine  # noqa: E402
from hybridlm.serve.reasoning import opens_thinking, split_reasoning  # noqa: E402
from hybridlm.serve.sampling import SamplingParams  # noqa: E402
from hybridlm.serve.schemas import ChatMessage  # noqa: E402
from hybridlm.tasks.reasoning import (NO_THINK_SYSTEM, THINK_SYSTEM, generate_problems, is_correct,  # noqa: E402
                                      median_trace_tokens, write_chat_jsonl)
from hybridlm.training import TrainConfig, train  # noqa: E402
from hybridlm.training.sft import SFTConfig, sft  # noqa: E402
from hybridlm.training.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SHARES = (0.25, 0.5, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "exp_reasoning")
    ap.add_argument("--base", type=Path, default=None, help="a pretrained checkpoint; default: pretrain tiny here")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--sft-steps", type=int, default=600)
    ap.add_argument("--sft-lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--kind", default="count", help="reasoning task kind (hybridlm.tasks.reasoning.KINDS)")
    ap.add_argument("--train", type=int, default=6000, help="training problems")
    ap.add_argument("--test", type=int, default=300, help="test problems")
    ap.add_argument("--think-fraction", type=float, default=0.7, help="share of SFT examples with a trace")
    ap.add_argument("--max-tokens", type=int, default=160, help="generation limit per answer")
    ap.add_argument("--plot", type=Path, default=ROOT / "docs" / "img" / "exp_reasoning.png")
    return parse_common(ap, argv)


def base_checkpoint(a: argparse.Namespace) -> Path:
    """The pretrained base: --base, or tiny pretrained on the bundled corpus (cached in OUT/base_run)."""
    if a.base is not None:
        return a.base
    run = a.out / "base_run"
    if not (run / "final" / "config.json").is_file():
        train(TrainConfig(model="tiny", out=str(run), steps=a.pretrain_steps, batch_size=16, seq_len=128, lr=3e-3,
                          min_lr=3e-4, warmup_steps=min(50, a.pretrain_steps // 10 + 1), eval_every=0,
                          eval_batches=4, save_every=0, seed=a.seed, device=a.device, resume=True))
    return run / "final"


def fine_tuned(a: argparse.Namespace, base: Path) -> Path:
    """SFT of `base` on the generated traces (cached in OUT/sft)."""
    data = write_chat_jsonl(a.out / "train.jsonl", generate_problems(a.train, "train", a.kind, seed=a.seed),
                            think_fraction=a.think_fraction, seed=a.seed)
    run = a.out / "sft"
    if not (run / "final" / "config.json").is_file():
        sft(SFTConfig(model=str(base), data=str(data), out=str(run), steps=a.sft_steps, batch_size=a.batch_size,
                      seq_len=a.seq_len, lr=a.sft_lr, min_lr=a.sft_lr / 10, warmup_steps=a.sft_steps // 20 + 1,
                      eval_every=max(1, a.sft_steps // 4), eval_batches=4, save_every=max(1, a.sft_steps // 4),
                      seed=a.seed, device=a.device, resume=True))
    return run / "final"


def prompt_ids(tok: Tokenizer, question: str, think: bool) -> list[int]:
    """The server's chat prompt for one question (the checkpoint's template, generation prompt on)."""
    messages = [ChatMessage(role="system", content=THINK_SYSTEM if think else NO_THINK_SYSTEM),
                ChatMessage(role="user", content=question)]
    return tok.encode(render_chat(messages, tok.chat_template))


def conditions(median: int) -> dict[str, tuple[bool, int | None]]:
    """name -> (thinking on, budget in tokens or None)."""
    out: dict[str, tuple[bool, int | None]] = {"no thinking": (False, None)}
    for share in BUDGET_SHARES:
        out[f"budget {share:.0%} ({max(1, round(share * median))} tok)"] = (True, max(1, round(share * median)))
    out["unlimited"] = (True, None)
    return out


def step_agreement(reasoning: str | None, problem) -> tuple[float, float]:
    """For `count` traces ("1 b:0, 2 a:1, ..."): the share of the true steps whose letter the model copied
    right ("2 a"), and whose running count it also got right ("2 a:1"), position by position."""
    true = problem.trace.rsplit(", so ", 1)[0].split(", ")
    said = (reasoning or "").rsplit(", so ", 1)[0].split(", ")
    said += [""] * (len(true) - len(said))
    copied = sum(t.split(":")[0] == g.split(":")[0] for t, g in zip(true, said)) / len(true)
    counted = sum(t == g for t, g in zip(true, said)) / len(true)
    return copied, counted


def evaluate_condition(engine: Engine, tok: Tokenizer, problems: list, think: bool, budget: int | None,
                       max_tokens: int) -> dict:
    """Greedy answers to every problem under one condition: accuracy and token counts."""
    params = SamplingParams(temperature=0.0, max_new_tokens=max_tokens, eos_id=tok.eos_id, thinking_budget=budget)
    prompts = [prompt_ids(tok, p.question, think) for p in problems]
    done = engine.generate(prompts, params)
    correct = [is_correct(c.text, p) for c, p in zip(done, problems)]
    in_think = opens_thinking(tok.decode(prompts[0]))
    reasoning = [split_reasoning(c.text, in_think)[0] for c in done]
    thinking = [len(tok.encode(r or "")) for r in reasoning]
    steps = [step_agreement(r, p) for r, p in zip(reasoning, problems)] if think and problems[0].kind == "count" else []
    return {"accuracy": sum(correct) / len(problems), "correct": sum(correct), "n": len(problems),
            "letters_copied": statistics.mean(s[0] for s in steps) if steps else None,
            "counts_right": statistics.mean(s[1] for s in steps) if steps else None,
            "thinking_tokens": statistics.mean(thinking), "completion_tokens": statistics.mean(
                c.completion_tokens for c in done), "example": done[0].text}


def plot(results: dict, path: Path) -> None:
    names = list(results["conditions"])
    acc = [results["conditions"][n]["accuracy"] * 100 for n in names]
    fig, ax = pyplot().subplots(figsize=(7.5, 3.8))
    bars = ax.bar(range(len(names)), acc, color=["#999999"] + ["#4c72b0"] * (len(names) - 2) + ["#dd8452"])
    ax.bar_label(bars, fmt="%.0f%%")
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Thinking budget, {results['model']} after SFT on '{results['kind']}' traces "
                 f"(median trace {results['median_trace_tokens']} tokens)", fontsize=9)
    save_figure(fig, path)


def table(results: dict) -> str:
    lines = ["| condition | accuracy | correct / n | thinking tokens (mean) | trace steps: letter copied / "
             "count right |", "|---|---:|---:|---:|---:|"]
    for name, r in results["conditions"].items():
        steps = "-" if r["letters_copied"] is None else f"{r['letters_copied']:.0%} / {r['counts_right']:.0%}"
        lines.append(f"| {name} | {r['accuracy']:.1%} | {r['correct']} / {r['n']} | {r['thinking_tokens']:.1f} "
                     f"| {steps} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    print(environment_line(a.device))
    t0 = time.perf_counter()
    final = fine_tuned(a, base_checkpoint(a))
    model, tok = load(str(final)).to(a.device).eval(), Tokenizer.from_file(final)
    test = generate_problems(a.test, "test", a.kind, seed=a.seed)
    median = median_trace_tokens(test, tok)
    engine = Engine(model, tok, max_batch=32, max_queue=len(test))
    results = {"model": "tiny", "kind": a.kind, "median_trace_tokens": median, "conditions": {}}
    for name, (think, budget) in conditions(median).items():
        results["conditions"][name] = evaluate_condition(engine, tok, test, think, budget, a.max_tokens)
        print(f"{name}: {results['conditions'][name]['accuracy']:.1%}", flush=True)
    results["elapsed_s"] = time.perf_counter() - t0
    print(table(results))
    write_json(a.out / "results.json", results)
    plot(results, a.plot)
    print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
