"""Chat prompts: the checkpoint's own chat template when it has one, else a plain template for base models.

`render_chat` renders the messages with the tokenizer's
:class:`~hybridlm.interop.chat_template.ChatTemplate` (sandboxed Jinja, as Hugging Face
transformers does; ``add_generation_prompt=True``; extra keywords such as ``enable_thinking``
become template variables). Such a template ends the assistant's turn with the EOS token, so it
needs no stop strings (`chat_stop` gives ``[]``). A template error is a 400 on ``messages``.

Without a template, the plain template for base models, which know no chat format of their
own: each message becomes ``"{Role}: {content}\\n\\n"`` (System / User / Assistant; OpenAI's
"developer" role counts as System), then ``"Assistant:"`` is appended; generation also stops at
``"\\nUser:"`` and ``"\\nSystem:"`` (`CHAT_STOP`), so the model does not write the user's next turn.
"""

from __future__ import annotations

from typing import Any

from ..interop.chat_template import ChatTemplate, ChatTemplateError
from .schemas import APIError, ChatMessage

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:"]
_RESERVED_VARIABLES = {"messages", "add_generation_prompt"}


def message_text(message: ChatMessage, index: int = 0) -> str:
    """A message's content as one string (OpenAI content parts: only text parts exist in the schema)."""
    content = message.content
    if not isinstance(content, list):
        return content or ""
    return "".join(part.text for part in content)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The documented plain-text chat template (see the module docstring)."""
    parts = [f"{CHAT_ROLES.get(m.role, 'System')}: {message_text(m, i)}\n\n" for i, m in enumerate(messages)]
    return "".join(parts) + "Assistant:"


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as a chat template sees them: role, content as one string, reasoning_content if set.

    OpenAI's "developer" role is passed as "system", the role chat templates know.
    """
    out = []
    for i, m in enumerate(messages):
        entry: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": message_text(m, i)}
        if m.reasoning_content is not None:
            entry["reasoning_content"] = m.reasoning_content
        out.append(entry)
    return out


def render_chat(messages: list[ChatMessage], template: ChatTemplate | None, **extra: Any) -> str:
    """The prompt for a chat request: ``template`` rendered with a generation prompt, else `chat_prompt`.

    ``extra`` (e.g. ``enable_thinking=False``) goes to the template as variables; it is ignored
    by the plain template. A template error becomes ``APIError(400, ..., param="messages")``.
    """
    if template is None:
        return chat_prompt(messages)
    reserved = sorted(set(extra) & _RESERVED_VARIABLES)
    if reserved:
        raise APIError(400, f"chat template variables {reserved} are set by the server and cannot be passed",
                       param="chat_template_kwargs")
    try:
        return template.render(template_messages(messages), add_generation_prompt=True, **extra)
    except ChatTemplateError as err:
        raise APIError(400, f"could not apply the chat template: {err}", param="messages") from None


def chat_stop(template: ChatTemplate | None) -> list[str]:
    """Stop strings a chat request adds: `CHAT_STOP` for the plain template, none for a real one (EOS ends it)."""
    return list(CHAT_STOP) if template is None else []
