"""`sft()` end to end on generated arithmetic chats: the loss falls, stop_at + resume repeats the uninterrupted run
bit-exactly (re-using the prepared data), the resized base keeps its old rows, and the final directory serves with
the template and <|im_end|> as EOS in our tokenizer and in transformers alike."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from hybridlm.config import HybridConfig
from hybridlm.interop.checkpoint import load_model, save_model
from hybridlm.interop.files import load_tensors
from hybridlm.model import HybridLM
from hybridlm.serve.chat import chat_stop, render_chat
from hybridlm.serve.schemas import ChatMessage
from hybridlm.training.sft import SFTConfig, prepare_sft, sft
from hybridlm.training.sft_render import default_chat_template
from hybridlm.training.tokenizer import Tokenizer

from helpers import TINY_MODEL

pytestmark = pytest.mark.slow
N_CHATS, STEPS, STOP = 80, 12, 5
SPECIALS = ["<|im_start|>", "<think>", "</think>", "<|im_end|>"]


def arithmetic_chats(n: int, seed: int = 0) -> list[dict]:
    """Conversations "What is a+b?": with /think a short reasoning and the sum, with /no_think the sum only."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        a, b = rng.randint(0, 30), rng.randint(0, 30)
        answer = {"role": "assistant", "content": str(a + b)}
        if i % 2 == 0:
            answer["reasoning_content"] = f"{a}+{b} = {a + b}."
        chats.append({"messages": [{"role": "system", "content": "/think" if i % 2 == 0 else "/no_think"},
                                   {"role": "user", "content": f"What is {a}+{b}?"}, answer]})
    return chats


def write_chats(path: Path, chats: list[dict]) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return path


def config(root: Path, out: str, **changes) -> SFTConfig:
    fields = dict(model=str(root / "base"), data=str(root / "chats.jsonl"), out=str(root / out), steps=STEPS,
                  batch_size=2, seq_len=64, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_every=0, eval_batches=1,
                  save_every=0, log_every=1, progress=False)
    return SFTConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, dict]:
    """A base checkpoint (random tiny model, bundled tokenizer), the chats, and one uninterrupted sft() run."""
    root = tmp_path_factory.mktemp("sft")
    torch.manual_seed(0)
    save_model(HybridLM(HybridConfig(**TINY_MODEL)), root / "base")
    write_chats(root / "chats.jsonl", arithmetic_chats(N_CHATS))
    return root, sft(config(root, "full"))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_sft_loss_falls_and_the_base_grows_by_the_chat_tokens(run):
    root, summary = run
    out = root / "full"
    assert summary["step"] == STEPS and summary["sft"]["added_tokens"] == SPECIALS
    assert summary["sft"]["packed"]["samples"] == N_CHATS and not summary["sft"]["packed"]["truncated"]
    records = metrics(out)
    val = [r["val_loss"] for r in records if r["kind"] == "val"]
    train = [r["loss"] for r in records if r["kind"] == "train"]
    assert val[-1] < val[0] - 1.0 and train[-1] < train[0] - 1.0
    base, grown = load_model(root / "base"), load_model(out / "base")
    assert grown.cfg.vocab_size == base.cfg.vocab_size + 4 == load_model(out / "final").cfg.vocab_size
    old = base.cfg.vocab_size
    for name, w in base.state_dict().items():
        w_new = grown.state_dict()[name]
        assert torch.equal(w_new[:old] if name.endswith(("embeddings.weight", "lm_head.weight")) else w_new, w)


def test_final_dir_serves_with_the_template_and_im_end_as_eos(run):
    root, _ = run
    final = root / "full" / "final"
    tok = Tokenizer.from_file(final)
    assert tok.eos_token == "<|im_end|>" and tok.eos_id == tok.token_to_id("<|im_end|>") and tok.vocab_size == 4100
    assert tok.chat_template.source == default_chat_template().source and chat_stop(tok.chat_template) == []
    assert all(len(tok.encode(s)) == 1 for s in SPECIALS)
    chat = arithmetic_chats(1)[0]["messages"]
    prompt = render_chat([ChatMessage(**m) for m in chat[:2]], tok.chat_template)
    assert prompt == tok.chat_template.render(chat[:2]) and prompt.endswith("<|im_start|>assistant\n<think>\n")


def test_final_dir_loads_in_transformers_with_the_same_rendering(run):
    transformers = pytest.importorskip("transformers")
    root, _ = run
    final = root / "full" / "final"
    theirs, ours = transformers.AutoTokenizer.from_pretrained(str(final)), Tokenizer.from_file(final)
    assert (theirs.eos_token, theirs.eos_token_id) == ("<|im_end|>", ours.eos_id)
    for chat in (c["messages"] for c in arithmetic_chats(2)):
        for prompt, extra in ((False, {}), (True, {}), (True, {"enable_thinking": False})):
            messages = chat[:2] if prompt else chat
            text = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt, **extra)
            assert text == ours.chat_template.render(messages, add_generation_prompt=prompt, **extra)
            assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text)


def test_stop_at_and_resume_repeat_the_uninterrupted_run_bit_exactly(run):
    root, _ = run
    first = sft(config(root, "split", stop_at=STOP))
    assert first["step"] == STOP and not first["sft"]["reused"]
    packed = root / "split" / "sft_data" / "train_tokens.bin"
    stamp = packed.stat().st_mtime_ns
    second = sft(config(root, "split", resume=True))
    assert second["step"] == STEPS and second["sft"]["reused"] and packed.stat().st_mtime_ns == stamp
    full, resumed = (load_tensors(root / d / "final" / "model.safetensors") for d in ("full", "split"))
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_changed_inputs_are_refused_while_the_run_has_checkpoints(run, tmp_path):
    root, _ = run
    other = write_chats(tmp_path / "other.jsonl", arithmetic_chats(N_CHATS, seed=1))
    with pytest.raises(ValueError, match="prepared from other inputs"):
        prepare_sft(config(root, "full", data=str(other), resume=True))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        prepare_sft(config(root, "full", data=str(other)))


def test_bad_configs_and_a_random_init_base(tmp_path):
    for changes, message in (({"model": ""}, "base checkpoint"), ({"data": None}, "chat JSONL"),
                             ({"init_from": "x"}, "init_from is not used")):
        with pytest.raises(ValueError, match=message):
            config(tmp_path, "out", **changes)
    with pytest.raises(FileNotFoundError, match="no config.json in checkpoint directory"):
        prepare_sft(config(tmp_path, "out", model=str(tmp_path)))
    (tmp_path / "model.json").write_text(json.dumps(TINY_MODEL))  # a config: random weights (tests only)
    with pytest.raises(FileNotFoundError, match="chat data file not found"):
        prepare_sft(config(tmp_path, "out", model=str(tmp_path / "model.json")))
    write_chats(tmp_path / "chats.jsonl", arithmetic_chats(20))
    prepared = prepare_sft(config(tmp_path, "out", model=str(tmp_path / "model.json")))
    assert prepared["init_from"] == prepared["model"] == str(tmp_path / "out" / "base")
    assert load_model(prepared["model"]).cfg.vocab_size == 4100
