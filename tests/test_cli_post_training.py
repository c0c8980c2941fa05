"""The post-training commands end to end: `hybridlm sft` on the generated reasoning data (stopped, then
resumed), `hybridlm eval --tasks` on both bundled lm-eval tasks, and their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hybridlm.cli import main
from hybridlm.interop.files import load_tensors
from hybridlm.tasks.reasoning import generate_problems, write_chat_jsonl
from hybridlm.training.metrics import read_metrics


def _sft_args(model: str, data: Path, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", model, "--data", str(data), "--out", str(out), "--steps", "4", "--batch-size", "2",
            "--seq-len", "160", "--lr", "3e-3", "--warmup-steps", "1", "--eval-every", "0", "--eval-batches", "1",
            "--save-every", "2", "--log-every", "1", "--device", "cpu", "--progress", "false", *extra]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_file: str) -> dict[str, Path]:
    """The same SFT twice: stopped at step 2 and resumed, and uninterrupted."""
    root = tmp_path_factory.mktemp("cli_sft")
    data = write_chat_jsonl(root / "train.jsonl", generate_problems(120, "train", "count", seed=0), think_fraction=0.5)
    assert main(_sft_args(tiny_model_file, data, root / "resumed", "--stop-at", "2")) == 0
    assert main(_sft_args(tiny_model_file, data, root / "resumed", "--resume")) == 0
    assert main(_sft_args(tiny_model_file, data, root / "straight")) == 0
    return {"resumed": root / "resumed", "straight": root / "straight", "data": data}


@pytest.mark.slow
def test_sft_command_resumes_to_the_uninterrupted_weights(sft_run):
    final = load_tensors(sft_run["resumed"] / "final" / "model.safetensors")
    straight = load_tensors(sft_run["straight"] / "final" / "model.safetensors")
    assert final.keys() == straight.keys() and all((final[k] == straight[k]).all() for k in final)
    steps = [r["step"] for r in read_metrics(sft_run["resumed"]) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    config = json.loads((sft_run["resumed"] / "final" / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and "<think>" in config["chat_template"]


@pytest.mark.slow
def test_eval_tasks_runs_both_bundled_tasks(sft_run, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["eval", "--ckpt", str(sft_run["resumed"] / "final"), "--tasks", "hybridlm_reasoning,hybridlm_kjv_verses",
            "--limit", "4", "--max-gen-toks", "8", "--batch-size", "4", "--device", "cpu", "--output", str(out),
            "--metadata", json.dumps({"kjv_docs": 8, "reasoning_docs": 8})]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert "exact_match" in printed and "acc" in printed
    assert 0 <= results["hybridlm_reasoning"]["exact_match,none"] <= 1
    assert 0 <= results["hybridlm_kjv_verses"]["acc,none"] <= 1


@pytest.mark.parametrize("argv,message", [
    (["eval", "--preset", "tiny"], "give one of --data"),
    (["eval", "--preset", "tiny", "--data", "x", "--tasks", "y"], "give one of --data"),
    (["eval", "--preset", "tiny", "--tasks", "hybridlm_reasoning", "--metadata", "[1]"], "JSON object"),
])
def test_eval_bad_flags_give_one_line_errors(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize("line,message", [
    ('["not", "an", "object"]', ":2: "),
    ('{"messages": [{"role": "user", "content": "hi"}]}', ":2: "),
    ('{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}', ":2: "),
])
def test_sft_bad_conversations_name_their_line(line, message, tmp_path, tiny_model_file, capsys):
    data = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    data.write_text(json.dumps(good) + "\n" + line + "\n", encoding="utf-8")
    assert main(_sft_args(tiny_model_file, data, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{data}{message}" in err and "Traceback" not in err
