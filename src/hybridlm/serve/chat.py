"""The chat template for base models, which know no chat format of their own.

Each message becomes ``"{Role}: {content}\\n\\n"`` (System / User / Assistant; OpenAI's
"developer" role counts as System), then ``"Assistant:"`` is appended; generation also
stops at ``"\\nUser:"`` and ``"\\nSystem:"`` (`CHAT_STOP`), so the model does not write the
user's next turn.
"""

from __future__ import annotations

from .schemas import APIError, ChatMessage

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:"]


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one string (OpenAI content parts: only text parts are understood)."""
    content = message.content
    if not isinstance(content, list):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"messages[{index}].content: only text parts are supported",
                           param=f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The documented plain-text chat template (see the module docstring)."""
    parts = [f"{CHAT_ROLES.get(m.role, 'System')}: {message_text(m, i)}\n\n" for i, m in enumerate(messages)]
    return "".join(parts) + "Assistant:"
