"""The command line end to end: info, train -> eval -> generate -> report, convert, errors."""

import subprocess
import sys

import pytest

from hybridlm.cli import main


def test_info_prints_published_comparison(capsys):
    assert main(["info", "--preset", "nemotron-h-8b", "--contexts", "8192"]) == 0
    out = capsys.readouterr().out
    assert "8,100,852,736" in out and "published: 8.10 B" in out and "Mamba state" in out


@pytest.mark.parametrize("argv,message", [
    (["generate", "--ckpt", "/nonexistent/ck", "--prompt", "x"], "directory not found"),
    (["info", "--config", "/nonexistent/c.json"], "config file not found"),
    (["info", "--preset", "gpt-5"], "unknown preset"),
    (["convert", "/nonexistent/a", "/tmp/b"], "not found"),
    (["report", "/nonexistent/run"], "no metrics.jsonl"),
])
def test_bad_inputs_give_one_line_errors(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_unknown_flag_is_rejected(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--no-such-flag", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "hybridlm.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("info", "generate", "convert", "train", "eval", "report", "tokenizer", "data"):
        assert cmd in out


def test_train_eval_generate_report_convert(tmp_path, small_shards, tiny_model_file, capsys, one_thread):
    run = tmp_path / "run"
    assert main(["train", "--model", tiny_model_file, "--data", str(small_shards), "--out", str(run),
                 "--steps", "30", "--batch-size", "4", "--seq-len", "64", "--eval-every", "15",
                 "--eval-batches", "2", "--progress", "false", "--lr", "3e-3", "--warmup-steps", "5"]) == 0
    assert "done: step 30" in capsys.readouterr().out
    assert main(["eval", "--ckpt", str(run / "final"), "--data", str(small_shards), "--seq-len", "64",
                 "--batch-size", "2", "--batches", "2"]) == 0
    assert "val loss" in capsys.readouterr().out
    assert main(["generate", "--ckpt", str(run / "final"), "--prompt", "In the beginning",
                 "--max-new-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("In the beginning")
    assert main(["report", str(run), "--max-new-tokens", "5"]) == 0
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "final_val_loss" in page and "In the beginning" in page
    assert main(["convert", str(run / "final"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["generate", "--hf", str(tmp_path / "hf"), "--prompt", "In the beginning",
                 "--max-new-tokens", "5", "--temperature", "0", "--tokenizer",
                 str(run / "final" / "tokenizer.json")]) == 0


@pytest.mark.slow
def test_generate_and_eval_with_compile_equal_eager(small_shards, tiny_model_file, capsys, one_thread):
    """--compile: the same text and the same loss as eager, and the compile time on stderr."""
    import torch
    torch._dynamo.reset()
    common = ["--config", tiny_model_file]
    outputs = []
    for extra in ([], ["--compile"]):
        assert main(["generate", *common, "--prompt", "In the beginning", "--max-new-tokens", "6",
                     "--temperature", "0", *extra]) == 0
        assert main(["eval", *common, "--data", str(small_shards), "--seq-len", "32", "--batch-size", "2",
                     "--batches", "2", *extra]) == 0
        captured = capsys.readouterr()
        outputs.append(captured.out)
        assert ("compiled decode_step in" in captured.err and "compiled forward in" in captured.err) == bool(extra)
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("flags,message", [
    (["--model", "nonexistent"], "neither a preset"),
    (["--model", "tiny", "--init-from", "/nonexistent/ck"], "directory not found"),
    (["--model", "tiny", "--precision", "fp7"], "precision"),
])
def test_train_checks_model_and_flags_before_any_data_work(flags, message, tmp_path, capsys):
    """The bundled corpus would be tokenized into OUT/data: a bad model or flag must fail first."""
    out = tmp_path / "run"
    assert main(["train", *flags, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (out / "data").exists()
