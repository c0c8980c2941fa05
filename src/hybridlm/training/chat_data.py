"""Chat data for supervised fine-tuning: conversations read from JSONL, one per line, and checked.

Each non-blank line is one conversation::

    {"messages": [{"role": "system", "content": "/think"},
                  {"role": "user", "content": "What is 12+7?"},
                  {"role": "assistant", "content": "19", "reasoning_content": "12+7 = 19."}]}

Roles are ``system``, ``user`` and ``assistant``; ``content`` is a string; ``reasoning_content``
(a string, or null for none) is allowed on assistant turns only; every conversation has at least
one assistant turn (the turns trained on). Other top-level keys (``id``, ...) are ignored. Every
problem is a ValueError naming ``path:line``; blank lines are skipped; a file without any
conversation is an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "reasoning_content")


@dataclass(frozen=True)
class Conversation:
    """One checked conversation and where it came from (``where`` is ``"path:line"``)."""

    messages: list[dict[str, str]]
    where: str


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """The messages of one parsed JSONL line, as plain dicts (role, content, reasoning_content if set).

    ValueError naming ``where`` for anything the module docstring does not allow.
    """
    if not isinstance(value, dict):
        raise ValueError(f"{where}: a line must be a JSON object, got {type(value).__name__}")
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: needs a non-empty \"messages\" list")
    out = [_check_message(m, where, i) for i, m in enumerate(messages)]
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(f"{where}: the conversation has no assistant turn (nothing to train on)")
    return out


def _check_message(message: Any, where: str, i: int) -> dict[str, str]:
    at = f"{where}: message {i}"
    if not isinstance(message, dict):
        raise ValueError(f"{at} must be an object, got {type(message).__name__}")
    unknown = sorted(set(message) - set(MESSAGE_KEYS))
    if unknown:
        raise ValueError(f"{at} has unknown key(s) {unknown} (allowed: {', '.join(MESSAGE_KEYS)})")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{at} has unknown role {role!r} (use {', '.join(ROLES)})")
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"{at} ({role}): content must be a string, got {type(content).__name__}")
    out = {"role": role, "content": content}
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        if role != "assistant":
            raise ValueError(f"{at} ({role}): reasoning_content is allowed on assistant turns only")
        if not isinstance(reasoning, str):
            raise ValueError(f"{at}: reasoning_content must be a string, got {type(reasoning).__name__}")
        out["reasoning_content"] = reasoning
    return out


def iter_chat_jsonl(path: str | Path) -> Iterator[Conversation]:
    """The conversations of a chat JSONL file, in order (checked line by line as they are read).

    FileNotFoundError for a missing file; ValueError naming ``path:line`` for a bad line, and
    naming ``path`` when the file holds no conversation at all.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"chat data file not found: {p}")
    count = 0
    with p.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{p}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{where}: not UTF-8 text: {err}") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as err:
                raise ValueError(f"{where}: not valid JSON: {err}") from None
            count += 1
            yield Conversation(check_messages(value, where), where)
    if count == 0:
        raise ValueError(f"{p}: no conversations (the file is empty or blank)")


def read_chat_jsonl(path: str | Path) -> list[Conversation]:
    """All conversations of a chat JSONL file (see `iter_chat_jsonl`)."""
    return list(iter_chat_jsonl(path))
