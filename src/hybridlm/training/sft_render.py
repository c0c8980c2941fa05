"""Rendering conversations for SFT: token ids plus a loss mask that covers the assistant turns only.

A conversation is rendered with a :class:`~hybridlm.interop.chat_template.ChatTemplate` (the
checkpoint's own, else the bundled `default_chat_template`), the same code `hybridlm serve`
renders prompts with. For each assistant message ``i``

* ``prompt = render(messages[:i], add_generation_prompt=True)`` is what the server renders when
  it asks the model for that turn, and must be a prefix of ``turn = render(messages[:i + 1])``;
  everything rendered before (the previous turns) must be a prefix of ``prompt``. A template
  that breaks this (one that drops earlier reasoning, say) is refused: what the model would be
  trained on would not be what it sees when serving.
* ``turn[len(prompt):]`` is trained: the reasoning, the answer and the end-of-turn token (the
  ``end_token``, e.g. ``<|im_end|>``). Text after the last end-of-turn token of that piece (the
  template's newline) is not: the model stops at the token.

Pieces are tokenized one by one (`Tokenizer.encode`) and concatenated: the prompt's ids are the
ids the server feeds the model, the turn's are the ones it should generate after them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from ..interop.chat_template import ChatTemplate, ChatTemplateError
from .chat_data import Conversation
from .tokenizer import Tokenizer

# not "chat_template.jinja": next to the bundled tokenizer.json that name would become its template
DEFAULT_CHAT_TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "assets" / "sft_chat_template.jinja"
Piece = tuple[str, bool]  # (text, trained)


@lru_cache(maxsize=1)
def _default_source() -> str:
    return DEFAULT_CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def default_chat_template() -> ChatTemplate:
    """The bundled ChatML template with ``<think>`` reasoning (``assets/sft_chat_template.jinja``)."""
    return ChatTemplate(_default_source())


def _mismatch(before: str, after: str, what: str, where: str, index: int) -> ValueError:
    """The error for a `before` that is not a prefix of `after`, showing where they part."""
    n = next((k for k, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
    near = before[max(0, n - 10):n + 10] + after[max(0, n - 10):n + 10]
    hint = ("; with the bundled template this is an assistant turn with reasoning_content while thinking is off "
            "(/no_think in the system prompt): drop the reasoning or the flag" if "<think>" in near else "")
    return ValueError(f"{where}: the chat template is not prefix-consistent at message {index}: {what} "
                      f"{before[max(0, n - 30):n + 30]!r} but the longer render continues "
                      f"{after[max(0, n - 30):n + 30]!r} (SFT needs render(messages[:i], add_generation_prompt"
                      f"=True) to be a prefix of render(messages[:i+1])){hint}")


def render_pieces(messages: list[dict[str, str]], template: ChatTemplate, end_token: str | None,
                  where: str = "conversation") -> list[Piece]:
    """The rendered conversation cut into (text, trained) pieces; joined, they are ``render(messages)``.

    ValueError naming ``where`` when the template fails (ChatTemplateError) or is not
    prefix-consistent, or when an assistant turn lacks ``end_token`` (the model would never stop).
    """
    def render(k: int, prompt: bool) -> str:
        try:
            return template.render(messages[:k], add_generation_prompt=prompt)
        except ChatTemplateError as err:
            raise ChatTemplateError(f"{where}: {err}") from None

    pieces: list[Piece] = []
    done, turn = "", ""  # the text of the pieces so far; the latest render of a whole turn
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, turn = render(i, True), render(i + 1, False)
        if not prompt.startswith(done):
            raise _mismatch(done, prompt, "the conversation so far renders", where, i)
        if not turn.startswith(prompt):
            raise _mismatch(prompt, turn, "the generation prompt ends", where, i)
        answer = turn[len(prompt):]
        cut = answer.rfind(end_token) + len(end_token) if end_token else len(answer)
        if end_token and cut < len(end_token):
            raise ValueError(f"{where}: the assistant turn at message {i} renders without the end-of-turn token "
                             f"{end_token!r}, so the model would never learn to stop: {answer[-60:]!r}")
        pieces += [(prompt[len(done):], False), (answer[:cut], True)]
        done = prompt + answer[:cut]
    full = turn if messages[-1]["role"] == "assistant" else render(len(messages), False)
    if not full.startswith(done):
        raise _mismatch(done, full, "the conversation renders", where, len(messages) - 1)
    pieces.append((full[len(done):], False))
    return [(text, trained) for text, trained in _merged(pieces) if text]


def _merged(pieces: list[Piece]) -> Iterator[Piece]:
    """Adjacent pieces of the same kind joined (so untrained text is tokenized in one go)."""
    text, kind = "", False
    for t, k in pieces:
        if k != kind and text:
            yield text, kind
            text = ""
        text, kind = text + t, k
    if text:
        yield text, kind


def tokenize_pieces(pieces: Iterable[Piece], tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """(ids, trained): each piece encoded on its own, its flag repeated over its tokens."""
    ids: list[int] = []
    trained: list[bool] = []
    for text, flag in pieces:
        piece_ids = tokenizer.encode(text)
        ids += piece_ids
        trained += [flag] * len(piece_ids)
    return ids, trained


def render_conversation(messages: list[dict[str, str]], template: ChatTemplate, tokenizer: Tokenizer,
                        end_token: str | None, where: str = "conversation") -> tuple[list[int], list[bool]]:
    """(ids, trained) of one conversation: `render_pieces`, then `tokenize_pieces`."""
    return tokenize_pieces(render_pieces(messages, template, end_token, where), tokenizer)


def render_samples(conversations: Iterable[Conversation], template: ChatTemplate, tokenizer: Tokenizer,
                   end_token: str | None) -> Iterator[tuple[list[int], list[bool]]]:
    """(ids, trained) per conversation, lazily (errors name the conversation's ``path:line``)."""
    for conv in conversations:
        yield render_conversation(conv.messages, template, tokenizer, end_token, conv.where)
