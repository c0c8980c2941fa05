"""Chat templates: rendering equals transformers' apply_chat_template, loading from checkpoint files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers

from hybridlm.interop.chat_template import (ChatTemplate, ChatTemplateError, load_chat_template,
                                             read_chat_template_file)
from hybridlm.training.tokenizer import DEFAULT_TOKENIZER_PATH, Tokenizer, default_tokenizer

NANO2_LIKE = Path(__file__).resolve().parents[1] / "data" / "nano2_like_chat_template.jinja"
BOS, EOS = "<s>", "<|endoftext|>"

SYSTEM_NO_THINK = [{"role": "system", "content": "You are terse. /no_think"},
                   {"role": "user", "content": "Name a river."}]
MULTI_TURN = [{"role": "system", "content": "Answer from Genesis."},
              {"role": "user", "content": "Who was first? /no_think"},
              {"role": "assistant", "content": "Adam.", "reasoning_content": "Genesis 2 says so."},
              {"role": "user", "content": "And his sons? /think"},
              {"role": "assistant", "content": "Cain, Abel, Seth.", "reasoning_content": " Genesis 4. "}]
CONVERSATIONS = {
    "no system": [{"role": "user", "content": "In the beginning?"}],
    "system + /no_think": SYSTEM_NO_THINK,
    "user /think": [{"role": "user", "content": "/think What is light?"}],
    "user /no_think, no system": [{"role": "user", "content": "Count to three /no_think"}],
    "multi-turn with reasoning": MULTI_TURN,
    "ends with the user": MULTI_TURN[:4],
    "unicode and json-ish text": [{"role": "user", "content": 'Ünïcode "quotes" <tags> & {"a": 1}'}],
}


@pytest.fixture(scope="module")
def nano2_source() -> str:
    return NANO2_LIKE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def hf_tokenizer(nano2_source: str):
    transformers = pytest.importorskip("transformers")
    backend = tokenizers.Tokenizer.from_str(default_tokenizer().backend.to_str())  # a copy: transformers may add tokens
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=nano2_source,
                                                bos_token=BOS, eos_token=EOS)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_render_matches_transformers(hf_tokenizer, nano2_source, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    ours = ChatTemplate(nano2_source, BOS, EOS).render(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_extra_kwarg_matches_transformers(hf_tokenizer, nano2_source, enable_thinking):
    messages = CONVERSATIONS["no system"]
    ours = ChatTemplate(nano2_source, BOS, EOS).render(messages, enable_thinking=enable_thinking)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              enable_thinking=enable_thinking)
    assert ours == theirs
    assert ours.endswith("Assistant\n<think>\n" if enable_thinking else "Assistant\n<think></think>")


def test_nano2_like_shape(nano2_source):
    template = ChatTemplate(nano2_source, BOS, EOS)
    no_system = template.render(CONVERSATIONS["no system"])
    assert no_system == ("<s><extra_id_0>System\n\n<extra_id_2>\n<extra_id_1>User\nIn the beginning?\n<extra_id_2>\n"
                         "<extra_id_1>Assistant\n<think>\n")
    off = template.render(SYSTEM_NO_THINK)
    assert "You are terse.\n" in off and "/no_think" not in off and off.endswith("Assistant\n<think></think>")
    history = template.render(MULTI_TURN, add_generation_prompt=False)
    assert "<think></think>Adam." in history and "Genesis 2" not in history  # earlier reasoning dropped
    assert history.endswith("<think>Genesis 4.</think>Cain, Abel, Seth.\n<extra_id_2>\n")
    assert "sons?\n" in history and "first?\n" in history and "/no_think" not in history  # flags stripped
    assert template.render(MULTI_TURN[:4]).endswith("Assistant\n<think>\n")  # the last /think wins


def test_variables_and_filters():
    source = ("{{ bos_token }}|{{ eos_token }}|{{ tools }}|{{ documents }}|{{ messages[0] | tojson }}|"
              "{{ {'b': [1, 2]} | tojson(indent=2) }}|{{ custom }}|{{ strftime_now('%Y') | length }}|"
              "{{ messages[0].thinking }}|{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}"
              "{% endfor %}|{{ dict(a=1).a }}")
    out = ChatTemplate(source, "<s>", "</s>").render([{"role": "user", "content": "é<b>", "reasoning": "r"}],
                                                     custom="x")
    assert out == ('<s>|</s>|None|None|{"thinking": "r", "role": "user", "content": "é<b>", "reasoning": "r", '
                   '"reasoning_content": "r"}|{\n  "b": [\n    1,\n    2\n  ]\n}|x|4|r|01|1')
    # unset special tokens are undefined (render as ""), not "None"; extra keywords override them
    assert ChatTemplate("[{{ bos_token }}]").render([]) == "[]"
    assert ChatTemplate("{{ eos_token }}", eos_token="</s>").render([], eos_token="<e>") == "<e>"


def test_template_errors():
    with pytest.raises(ChatTemplateError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% if %}").render([])
    with pytest.raises(ChatTemplateError, match="rejected the conversation: only users here"):
        ChatTemplate("{{ raise_exception('only users here') }}").render([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="unexpected role tool"):
        ChatTemplate(NANO2_LIKE.read_text()).render([{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 // 0 }}").render([])
    with pytest.raises(ChatTemplateError, match="failed"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "x"}])


@pytest.mark.parametrize("source", ["{{ ''.__class__.__mro__ }}", "{{ messages.__class__.__name__ }}",
                                    "{{ cycler.__init__.__globals__ }}",
                                    "{% set ns = namespace() %}{% set ns._x = 1 %}",
                                    "{{ namespace(_x=1) }}", "{{ messages.append(1) }}"])
def test_sandbox_refuses(source):
    with pytest.raises(ChatTemplateError, match="sandbox"):
        ChatTemplate(source).render([{"role": "user", "content": "x"}])


def test_sandbox_hides_unsafe_attributes():
    # as in Jinja's sandbox, a forbidden attribute is undefined (prints as nothing) until it is used
    assert ChatTemplate("[{{ messages.__class__ }}]").render([]) == "[]"


def test_compiled_once():
    first = ChatTemplate("{{ messages | length }}")
    assert first.compile() is ChatTemplate("{{ messages | length }}").compile()
    assert first.render([{}, {}]) == "2"


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(text, encoding="utf-8")
    return directory / name


def test_load_from_jinja_file(tmp_path):
    _write(tmp_path, "chat_template.jinja", "J{{ bos_token }}")
    assert load_chat_template(tmp_path) == ChatTemplate("J{{ bos_token }}")
    _write(tmp_path, "tokenizer_config.json", json.dumps({"bos_token": {"content": "<s>", "lstrip": False},
                                                         "eos_token": "</s>", "chat_template": "C"}))
    template = load_chat_template(tmp_path)  # the .jinja file wins; the tokens come from the config
    assert template == ChatTemplate("J{{ bos_token }}", "<s>", "</s>")
    assert template.render([]) == "J<s>"


def test_load_from_tokenizer_config(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    _write(tmp_path, config.name, json.dumps({"chat_template": "S", "eos_token": "</s>", "bos_token": None}))
    assert load_chat_template(tmp_path) == ChatTemplate("S", None, "</s>")
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    config.write_text(json.dumps({"chat_template": named}))
    assert load_chat_template(tmp_path).source == "D"
    config.write_text(json.dumps({"chat_template": named[:1] + [{"name": "rag", "template": "R"}]}))
    assert load_chat_template(tmp_path).source == "T"  # no "default": the first


def test_load_missing(tmp_path):
    assert load_chat_template(tmp_path / "absent") is None
    assert load_chat_template(tmp_path) is None
    _write(tmp_path, "tokenizer_config.json", json.dumps({"eos_token": "</s>"}))
    assert load_chat_template(tmp_path) is None


@pytest.mark.parametrize("text, match", [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps({"chat_template": 5}), "chat_template must be a string"),
    (json.dumps({"chat_template": []}), "chat_template must be a string"),
    (json.dumps({"chat_template": [{"name": "default"}]}), "chat_template must be a string"),
    (json.dumps({"chat_template": "x", "eos_token": 3}), "eos_token must be a string"),
    (json.dumps({"chat_template": "x", "bos_token": {"content": 1}}), "bos_token must be a string"),
])
def test_load_corrupt_config(tmp_path, text, match):
    _write(tmp_path, "tokenizer_config.json", text)
    with pytest.raises(ChatTemplateError, match=match) as info:
        load_chat_template(tmp_path)
    assert "tokenizer_config.json" in str(info.value)


def test_read_chat_template_file(tmp_path, nano2_source):
    assert read_chat_template_file(NANO2_LIKE) == ChatTemplate(nano2_source)
    config = _write(tmp_path / "ck", "tokenizer_config.json", json.dumps({"chat_template": "C", "eos_token": "</s>"}))
    assert read_chat_template_file(config) == ChatTemplate("C", None, "</s>")
    assert read_chat_template_file(config.parent) == ChatTemplate("C", None, "</s>")
    with pytest.raises(FileNotFoundError, match="nope.jinja"):
        read_chat_template_file(tmp_path / "nope.jinja")
    bad = _write(tmp_path, "bad.jinja", "{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match=r"bad\.jinja: chat template syntax error"):
        read_chat_template_file(bad)  # reported at load time, before any render
    empty = _write(tmp_path / "empty", "tokenizer_config.json", "{}")
    with pytest.raises(ChatTemplateError, match="no chat template"):
        read_chat_template_file(empty)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        read_chat_template_file(empty.parent)


def test_tokenizer_from_file_picks_up_template(tmp_path, nano2_source):
    assert default_tokenizer().chat_template is None  # the bundled tokenizer has none
    directory = tmp_path / "tok"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(DEFAULT_TOKENIZER_PATH.read_bytes())
    (directory / "chat_template.jinja").write_text(nano2_source, encoding="utf-8")
    tok = Tokenizer.from_file(directory / "tokenizer.json")
    assert tok.chat_template == ChatTemplate(nano2_source, None, EOS)  # eos filled in from the tokenizer
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": EOS}))
    assert Tokenizer.from_file(directory).chat_template == ChatTemplate(nano2_source, "<s>", EOS)
    explicit = Tokenizer(tok.backend, chat_template=ChatTemplate("x", eos_token="<end>"))
    assert explicit.chat_template.eos_token == "<end>" and explicit.eos_token == EOS
