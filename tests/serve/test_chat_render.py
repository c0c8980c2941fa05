"""render_chat / chat_stop: the checkpoint's chat template when there is one, the plain template otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from hybridlm.serve.chat import CHAT_STOP, chat_prompt, chat_stop, render_chat, template_messages
from hybridlm.serve.schemas import APIError, ChatMessage
from hybridlm.interop.chat_template import ChatTemplate, read_chat_template_file

NANO2_LIKE = Path(__file__).resolve().parents[1] / "data" / "nano2_like_chat_template.jinja"

MESSAGES = [ChatMessage(role="system", content="Be brief."),
            ChatMessage(role="user", content=[{"type": "text", "text": "Who "}, {"type": "text", "text": "was first?"}]),
            ChatMessage(role="assistant", content="Adam.", reasoning_content="Genesis 2."),
            ChatMessage(role="user", content="Then? /no_think")]


@pytest.fixture(scope="module")
def nano2() -> ChatTemplate:
    return read_chat_template_file(NANO2_LIKE)


def test_with_template(nano2):
    prompt = render_chat(MESSAGES, nano2)
    assert prompt == ("<extra_id_0>System\nBe brief.\n<extra_id_2>\n<extra_id_1>User\nWho was first?\n<extra_id_2>\n"
                      "<extra_id_1>Assistant\n<think></think>Adam.\n<extra_id_2>\n"
                      "<extra_id_1>User\nThen?\n<extra_id_2>\n<extra_id_1>Assistant\n<think></think>")
    assert render_chat(MESSAGES[:2], nano2).endswith("Assistant\n<think>\n")
    assert render_chat(MESSAGES[:2], nano2, enable_thinking=False).endswith("Assistant\n<think></think>")
    assert chat_stop(nano2) == []


def test_messages_as_the_template_sees_them():
    messages = MESSAGES[:3] + [ChatMessage(role="developer", content=None)]
    assert template_messages(messages) == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who was first?"},
        {"role": "assistant", "content": "Adam.", "reasoning_content": "Genesis 2."},
        {"role": "system", "content": ""}]
    seen = render_chat(messages, ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content }}:"
                                              "{{ m.reasoning_content }};{% endfor %}{{ add_generation_prompt }}"))
    assert seen == "system:Be brief.:;user:Who was first?:;assistant:Adam.:Genesis 2.;system::;True"


def test_without_template_is_the_plain_fallback():
    assert render_chat(MESSAGES, None) == chat_prompt(MESSAGES)
    assert render_chat(MESSAGES, None).endswith("User: Then? /no_think\n\nAssistant:")
    assert "User: Who was first?\n\n" in render_chat(MESSAGES, None, enable_thinking=False)
    assert chat_stop(None) == CHAT_STOP and chat_stop(None) is not CHAT_STOP


def test_template_error_is_a_400(nano2):
    with pytest.raises(APIError) as info:
        render_chat([ChatMessage(role="user", content="x")], ChatTemplate("{{ raise_exception('no users') }}"))
    assert info.value.status == 400 and info.value.param == "messages" and "no users" in info.value.message
    with pytest.raises(APIError) as info:
        render_chat([ChatMessage(role="user", content="x")], ChatTemplate("{% if %}"))
    assert info.value.status == 400 and "syntax error" in info.value.message
    with pytest.raises(APIError) as info:
        render_chat([ChatMessage(role="user", content="x")], nano2, add_generation_prompt=False)
    assert info.value.status == 400 and info.value.param == "chat_template_kwargs"


def test_non_text_parts_rejected():
    """Only text parts exist in the request schema: an image part fails validation (a 400 in the server)."""
    with pytest.raises(ValidationError, match="'text'"):
        ChatMessage(role="user", content=[{"type": "image_url", "image_url": {"url": "x"}}])
