"""Chat SFT data: the JSONL reader's errors, rendering with loss masks (the bundled template, the server's
prompt, prefix consistency), masks that decide the loss through packing, special tokens and the vocabulary resize."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hybridlm.config import HybridConfig
from hybridlm.interop.chat_template import ChatTemplate
from hybridlm.model import HybridLM
from hybridlm.serve.chat import render_chat
from hybridlm.serve.reasoning import opens_thinking, split_reasoning
from hybridlm.serve.schemas import ChatMessage
from hybridlm.serve.thinking import FORCED_CLOSE, ThinkingBudget
from hybridlm.training.chat_data import iter_chat_jsonl, read_chat_jsonl
from hybridlm.training.packing import PackedDataset, write_packed_dataset
from hybridlm.training.sft_render import default_chat_template, render_conversation, render_pieces, render_samples
from hybridlm.training.tokenizer import default_tokenizer
from hybridlm.training.vocab import resize_for_tokenizer, resize_vocab, special_tokens_for, template_special_tokens

from helpers import TINY_MODEL

END = "<|im_end|>"
CHAT_TOKENS = ["<|im_start|>", "<think>", "</think>", END]
NANO2_TEMPLATE = Path(__file__).resolve().parents[1] / "data" / "nano2_like_chat_template.jinja"
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

# a multi-turn conversation: reasoning, then a turn without reasoning (thinking on: an empty thought)
THINK_CHAT = [{"role": "system", "content": "You add numbers. /think"},
              {"role": "user", "content": "What is 12+7?"},
              {"role": "assistant", "content": "19", "reasoning_content": "12 plus 7:\n12+7 = 19."},
              {"role": "user", "content": "And 2+2?"},
              {"role": "assistant", "content": "4"}]
NO_THINK_CHAT = [{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Say hi."},
                 {"role": "assistant", "content": "Hi!"}]


def chat_tokenizer():
    tok = default_tokenizer()
    tok.add_special_tokens(CHAT_TOKENS)
    return tok


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ---- 1. the reader -------------------------------------------------------------------------------------
def test_reader_keeps_conversations_skips_blank_lines_and_names_lines(tmp_path):
    chat = {"id": 7, "messages": THINK_CHAT}
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), "", "   ", json.dumps(chat)])
    convs = read_chat_jsonl(path)
    assert [c.where for c in convs] == [f"{path}:1", f"{path}:4"]
    assert convs[1].messages == THINK_CHAT and convs[0].messages == GOOD["messages"]


BAD_LINES = {
    "not json": ("{oops", "not valid JSON"),
    "not an object": ("[1, 2]", "must be a JSON object"),
    "no messages": ('{"conversation": []}', 'needs a non-empty "messages" list'),
    "messages not a list": ('{"messages": "hi"}', 'needs a non-empty "messages" list'),
    "unknown role": ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}',
                     "unknown role 'tool'"),
    "content not a string": ('{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", '
                             '"content": "y"}]}', "content must be a string"),
    "reasoning on a user turn": ('{"messages": [{"role": "user", "content": "x", "reasoning_content": "r"}, '
                                 '{"role": "assistant", "content": "y"}]}', "allowed on assistant turns only"),
    "no assistant turn": ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant turn"),
}


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_reader_errors_name_path_and_line(tmp_path, name):
    line, message = BAD_LINES[name]
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), "", line, json.dumps(GOOD)])
    with pytest.raises(ValueError, match=message) as err:
        read_chat_jsonl(path)
    assert f"{path}:3:" in str(err.value)


@pytest.mark.parametrize("text", ["", "\n  \n\n"])
def test_reader_refuses_a_file_without_conversations(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match="no conversations"):
        read_chat_jsonl(path)
    with pytest.raises(FileNotFoundError, match="chat data file not found"):
        next(iter_chat_jsonl(tmp_path / "missing.jsonl"))


# ---- 2. rendering ----------------------------------------------------------------------------------------
def test_default_template_renders_chatml_with_think_blocks():
    t = default_chat_template()
    assert t.render(THINK_CHAT, add_generation_prompt=False) == (
        "<|im_start|>system\nYou add numbers. /think<|im_end|>\n<|im_start|>user\nWhat is 12+7?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n12 plus 7:\n12+7 = 19.\n</think>\n\n19<|im_end|>\n"
        "<|im_start|>user\nAnd 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n</think>\n\n4<|im_end|>\n")
    assert t.render(NO_THINK_CHAT, add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n<think></think>Hi!<|im_end|>\n")
    prompts = {sys: t.render(([{"role": "system", "content": sys}] if sys else []) + [THINK_CHAT[1]])
               for sys in ("/think", "/no_think", "", "plain")}
    assert {s: p[p.rindex("<|im_start|>"):] for s, p in prompts.items()} == {
        "/think": "<|im_start|>assistant\n<think>\n", "": "<|im_start|>assistant\n<think>\n",
        "plain": "<|im_start|>assistant\n<think>\n", "/no_think": "<|im_start|>assistant\n<think></think>"}
    assert t.render(NO_THINK_CHAT[:2], enable_thinking=True).endswith("<think>\n")  # chat_template_kwargs win


def test_server_reasoning_and_budget_see_the_generation_prompt_as_intended():
    """The server decodes through `opens_thinking` / `ThinkingBudget`: /think opens a block, /no_think closes it."""
    t = default_chat_template()
    think, no_think = t.render(THINK_CHAT[:2]), t.render(NO_THINK_CHAT[:2])
    assert opens_thinking(think) and not opens_thinking(no_think)
    tok = chat_tokenizer()
    close_ids = tok.encode(FORCED_CLOSE)
    budget = ThinkingBudget(2, opens_thinking(think), close_ids)
    assert budget.state == "thinking" and ThinkingBudget(2, opens_thinking(no_think), close_ids).state == "before"
    # a trained answer is what the budget's forced close produces after the reasoning: "\n</think>\n\n"
    answer = t.render(THINK_CHAT[:3], add_generation_prompt=False)[len(think):]
    assert answer == THINK_CHAT[2]["reasoning_content"] + FORCED_CLOSE + "19" + END + "\n"
    assert split_reasoning(answer[:-len(END) - 1], in_think=True) == (THINK_CHAT[2]["reasoning_content"], "19")


def test_mask_covers_exactly_the_assistant_turns_and_prefixes_are_the_server_prompts():
    t, tok = default_chat_template(), chat_tokenizer()
    ids, trained = render_conversation(THINK_CHAT, t, tok, END)
    assert len(ids) == len(trained) and tok.decode(ids) == t.render(THINK_CHAT, add_generation_prompt=False)
    spans, start = [], None  # (first, end) of each run of trained tokens
    for i, flag in enumerate(trained + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            spans.append((start, i))
            start = None
    expected = ["12 plus 7:\n12+7 = 19.\n</think>\n\n19" + END, "</think>\n\n4" + END]  # after "<think>\n"
    assert [tok.decode(ids[a:b]) for a, b in spans] == expected
    assistant_at = [i for i, m in enumerate(THINK_CHAT) if m["role"] == "assistant"]
    for (first, _), i in zip(spans, assistant_at):  # the ids before a turn are the server's prompt, tokenized
        served = render_chat([ChatMessage(**m) for m in THINK_CHAT[:i]], t)
        assert ids[:first] == tok.encode(served) and tok.decode(ids[:first]) == served


def test_special_tokens_stay_single_tokens_in_rendered_ids():
    tok = chat_tokenizer()
    ids, _ = render_conversation(NO_THINK_CHAT, default_chat_template(), tok, END)
    special = {tok.token_to_id(s) for s in CHAT_TOKENS}
    assert sum(i in special for i in ids) == 3 * 2 + 2  # three turns: start + end each; <think></think>


def test_prefix_inconsistent_templates_are_refused_naming_the_line(tmp_path):
    tok = chat_tokenizer()
    nano2 = ChatTemplate(NANO2_TEMPLATE.read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="not prefix-consistent at message 2") as err:  # "<think>\n" vs "<think>"
        render_pieces(THINK_CHAT, nano2, "<extra_id_2>", where="chats.jsonl:5")
    assert "chats.jsonl:5" in str(err.value)
    with pytest.raises(ValueError, match="not prefix-consistent.*drop the reasoning or the flag"):
        render_pieces(NO_THINK_CHAT[:2] + [{"role": "assistant", "content": "x", "reasoning_content": "r"}],
                      default_chat_template(), END)
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), json.dumps({"messages": THINK_CHAT})])
    drops = ChatTemplate("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}{{ m.content }}|{% endif %}"
                         "{% endfor %}")  # drops earlier answers: fine for GOOD (line 1), not for THINK_CHAT
    with pytest.raises(ValueError, match=f"{path}:2: the chat template is not prefix-consistent"):
        list(render_samples(iter_chat_jsonl(path), drops, tok, None))


def test_template_failures_and_turns_without_the_end_token_name_the_line(tmp_path):
    tok = chat_tokenizer()
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(GOOD), json.dumps({"messages": THINK_CHAT})])
    failing = ChatTemplate("{% if messages|length > 2 %}{{ raise_exception('too long') }}{% endif %}x")
    with pytest.raises(ValueError, match=f"{path}:2: the chat template rejected the conversation: too long"):
        list(render_samples(iter_chat_jsonl(path), failing, tok, None))
    no_end = ChatTemplate("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    with pytest.raises(ValueError, match=f"{path}:1: .*without the end-of-turn token"):
        list(render_samples(iter_chat_jsonl(path), no_end, tok, END))


def test_untrained_targets_change_nothing_trained_ones_change_the_loss(tmp_path):
    """Through the real path (render -> pack -> PackedDataset batch -> model.loss): replacing the target of a
    non-assistant token leaves the loss and every gradient bit-identical, replacing an assistant one does not."""
    t, tok = default_chat_template(), chat_tokenizer()
    samples = [render_conversation(THINK_CHAT, t, tok, END), render_conversation(NO_THINK_CHAT, t, tok, END)] * 3
    ids, trained = samples[0]
    untrained_pos = next(i for i in range(1, len(ids)) if not trained[i] and ids[i] != tok.eos_id)
    trained_pos = next(i for i in range(1, len(ids)) if trained[i])
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**TINY_MODEL, "vocab_size": tok.vocab_size}))

    inputs = {}

    def loss_and_grads(sample0, name):
        out = tmp_path / name
        write_packed_dataset([sample0] + samples[1:], tok, out, seq_len=96, val_fraction=0.2, progress=False)
        model.zero_grad()
        loss = 0.0
        for split in ("train", "val"):  # every row of both splits, wherever sample 0 went
            data = PackedDataset(out, split)
            x, y, seq_idx = next(data.iter_eval_batches(data.num_rows, 96))
            x, seq_idx = inputs.setdefault(split, (x, seq_idx))  # the unchanged inputs: only targets differ
            loss = loss + model.loss(x, y, seq_idx)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def replaced(pos):
        new = list(ids)
        new[pos] = (new[pos] + 1) % 256  # another byte token
        return new, trained

    base_loss, base_grads = loss_and_grads(samples[0], "base")
    loss_u, grads_u = loss_and_grads(replaced(untrained_pos), "untrained")
    loss_t, grads_t = loss_and_grads(replaced(trained_pos), "trained")
    assert torch.equal(loss_u, base_loss) and all(torch.equal(a, b) for a, b in zip(grads_u, base_grads))
    assert not torch.equal(loss_t, base_loss) and not all(torch.equal(a, b) for a, b in zip(grads_t, base_grads))


# ---- 3. special tokens and the resize ---------------------------------------------------------------------
def test_template_tokens_and_the_special_tokens_flag():
    assert template_special_tokens(default_chat_template().source) == ["<|im_start|>", "<think>", "</think>", END]
    assert template_special_tokens(NANO2_TEMPLATE.read_text()) == ["<extra_id_0>", "<extra_id_2>", "<extra_id_1>",
                                                                   "<think>", "</think>"]
    assert special_tokens_for("auto", "{{ '<|a|>' }}{# <|b|> #}") == ["<|a|>"]
    assert special_tokens_for(" <x>, <y> ,,<x>", "") == ["<x>", "<y>"]


def test_added_special_tokens_encode_as_single_ids_and_are_not_added_twice():
    tok = default_tokenizer()
    before = tok.vocab_size
    text = "<|im_start|>user\nhi<|im_end|><think>x</think>"
    pieces_before = len(tok.encode("<|im_start|>"))
    assert tok.add_special_tokens(CHAT_TOKENS + ["<|endoftext|>"]) == CHAT_TOKENS  # <|endoftext|> exists
    assert tok.vocab_size == before + 4 and pieces_before > 1
    assert [tok.encode(s) for s in CHAT_TOKENS] == [[before + i] for i in range(4)]
    assert tok.add_special_tokens(CHAT_TOKENS) == [] and tok.vocab_size == before + 4
    assert tok.decode(tok.encode(text)) == text and tok.eos_id == 0
    with pytest.raises(ValueError, match="non-blank"):
        tok.add_special_tokens([" "])


@pytest.mark.parametrize("tied", [False, True])
def test_resize_keeps_old_rows_and_logits_new_rows_are_the_mean(tied):
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**TINY_MODEL, tie_embeddings=tied)).eval()
    tok = default_tokenizer()
    added = tok.add_special_tokens(CHAT_TOKENS)
    new = resize_for_tokenizer(model, tok, added).eval()
    old_n = model.cfg.vocab_size
    assert new.cfg.vocab_size == old_n + 4 == tok.vocab_size
    assert new.cfg.replace(vocab_size=old_n) == model.cfg
    assert (new.lm_head.weight is new.backbone.embeddings.weight) == tied
    for name in ("backbone.embeddings.weight", "lm_head.weight"):
        w_old, w_new = model.state_dict()[name], new.state_dict()[name]
        assert w_new.shape == (old_n + 4, model.cfg.d_model)
        assert torch.equal(w_new[:old_n], w_old)
        assert torch.equal(w_new[old_n:], w_old.double().mean(0).float().expand(4, -1))
    x = torch.randint(0, old_n, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(new(x)[..., :old_n], model(x), rtol=0, atol=1e-6)
        assert new.loss(x, torch.tensor([tok.encode("<|im_end|>") * 12] * 2)).isfinite()
    assert resize_for_tokenizer(new, tok, []) is new  # it already fits the tokenizer


def test_resize_reuses_spare_rows_of_a_padded_vocabulary():
    torch.manual_seed(0)
    model = HybridLM(HybridConfig(**{**TINY_MODEL, "vocab_size": 4100}))
    new = resize_vocab(model, 4101, init_ids=[4098, 4099])
    w_old, w_new = model.lm_head.weight.detach(), new.lm_head.weight.detach()
    mean = w_old[:4098].double().mean(0).float()
    assert torch.equal(w_new[:4098], w_old[:4098])
    assert all(torch.equal(w_new[i], mean) for i in (4098, 4099, 4100))
    with pytest.raises(ValueError, match="cannot shrink"):
        resize_vocab(model, 4000)
