"""Reasoning output: splitting a generation into `reasoning_content` and `content`.

This module owns the `--reasoning-parser` formats (`PARSERS`, `reasoning_parser`), the
check whether a rendered prompt leaves the model inside a thinking block
(`opens_thinking`), the split of a whole generated text (`split_reasoning`) and the same
split done piece by piece while streaming (`ReasoningStream`). It knows only text: no
tokenizer, no torch. Every parser name here is the `<think>…</think>` format (vLLM's
`deepseek_r1` / `qwen3`, NVIDIA Nemotron Nano 2).

The rules, the same for `split_reasoning` and `ReasoningStream`:

* A generation that starts inside a thinking block (the prompt ends with an open
  `<think>`, see `opens_thinking`) is reasoning up to the first `</think>`. One that does
  not start inside opens a block only with a `<think>` at its very start (after optional
  whitespace, which is dropped); a `<think>` anywhere else is content.
* Inside a block only the end tag is special; text after the first end tag is content,
  later tags included. A block that never closes makes the whole text reasoning and
  content None.
* Reasoning loses its leading and trailing newlines ("\\n" only), content its leading
  newlines (also when there is no reasoning at all); nothing else is changed.
* An empty part is None, never "": OpenAI clients read `content` as a string or null,
  and `reasoning_content` is absent/null when the model did not think.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"
Tags = tuple[str, str]  # (start tag, end tag) of a thinking block
THINK_TAGS: Tags = (THINK_START, THINK_END)

# `--reasoning-parser` names; all of them are the `<think>…</think>` format here.
PARSERS: dict[str, Tags] = {
    "think": THINK_TAGS,
    "deepseek_r1": THINK_TAGS,
    "qwen3": THINK_TAGS,
    "nemotron": THINK_TAGS,
}


def reasoning_parser(name: str) -> Tags:
    """The (start, end) tags of the reasoning parser `name`; ValueError for an unknown one."""
    try:
        return PARSERS[name]
    except KeyError:
        choices = ", ".join(sorted(PARSERS))
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {choices}") from None


def opens_thinking(prompt_text: str, tags: Tags = THINK_TAGS) -> bool:
    """True when the prompt ends inside an open thinking block.

    That is, its last start tag comes after its last end tag, as in a generation prompt
    ending with "Assistant\\n<think>\\n"; "...<think></think>" (thinking turned off) is False.
    """
    start, end = tags
    last_start = prompt_text.rfind(start)
    return last_start >= 0 and last_start > prompt_text.rfind(end)


def _or_none(part: str) -> str | None:
    return part or None


def split_reasoning(text: str, in_think: bool,
                    tags: Tags = THINK_TAGS) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a whole generated text (rules: module docstring).

    `in_think` says the generation started inside a thinking block (`opens_thinking` of
    the prompt).
    """
    start, end = tags
    if not in_think:
        stripped = text.lstrip()
        if not stripped.startswith(start):
            return None, _or_none(text.lstrip("\n"))
        text = stripped[len(start):]
    reasoning, closed, content = text.partition(end)
    reasoning = reasoning.strip("\n")
    if not closed:
        return _or_none(reasoning), None
    return _or_none(reasoning), _or_none(content.lstrip("\n"))


def _tag_prefix_len(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """`split_reasoning` piece by piece, for streamed generations.

    `feed` takes the next piece of generated text and returns the (reasoning, content)
    text it decides; what could still change meaning waits: the start of a tag ("</thi"),
    a run of newlines that a closing tag would strip, the opening whitespace that a
    `<think>` may follow. `finish` returns what is left at the end. For any cutting of a
    text into pieces, the joined reasoning deltas (finish included) equal
    `split_reasoning(text, in_think)[0] or ""`, and the content deltas `[1] or ""`.
    """

    _START, _REASONING, _CONTENT = "start", "reasoning", "content"

    def __init__(self, in_think: bool, tags: Tags = THINK_TAGS) -> None:
        self.start_tag, self.end_tag = tags
        self._mode = self._REASONING if in_think else self._START
        self._held = ""                   # text received but not yet decided
        self._reasoning_started = False   # a reasoning character was returned (no more leading "\n" to drop)
        self._content_started = False

    @property
    def thinking(self) -> bool:
        """Whether the text so far is inside a thinking block (or may still open one)."""
        return self._mode != self._CONTENT

    def feed(self, delta: str) -> tuple[str, str]:
        """(reasoning_delta, content_delta) decided by the new piece `delta`."""
        text, self._held = self._held + delta, ""
        reasoning = content = ""
        if self._mode == self._START:
            text = self._open(text, final=False)
        if self._mode == self._REASONING:
            reasoning, text = self._think(text, final=False)
        if self._mode == self._CONTENT:
            content = self._answer(text)
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """(reasoning_delta, content_delta) of the text still held at the end."""
        text, self._held = self._held, ""
        if self._mode == self._START:
            text = self._open(text, final=True)
        if self._mode == self._REASONING:
            reasoning, _ = self._think(text, final=True)
            return reasoning, ""
        return "", self._answer(text)

    def _open(self, text: str, final: bool) -> str:
        """Before anything is decided: does the text open a thinking block?"""
        stripped = text.lstrip()
        if stripped.startswith(self.start_tag):
            self._mode = self._REASONING
            return stripped[len(self.start_tag):]
        if self.start_tag.startswith(stripped) and not final:
            self._held = text             # only whitespace and part of the start tag yet
            return ""
        self._mode = self._CONTENT
        return text

    def _think(self, text: str, final: bool) -> tuple[str, str]:
        """Reasoning decided in `text`, and the content text after the end tag (if any)."""
        head, closed, rest = text.partition(self.end_tag)
        if closed:
            self._mode = self._CONTENT
            return self._reason(head.rstrip("\n")), rest
        if final:
            return self._reason(head.rstrip("\n")), ""
        keep = _tag_prefix_len(head, self.end_tag)
        decided = head[:len(head) - keep]
        emit = decided.rstrip("\n")       # trailing newlines wait: an end tag would drop them
        self._held = decided[len(emit):] + head[len(head) - keep:]
        return self._reason(emit), ""

    def _reason(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip("\n")
            self._reasoning_started = bool(text)
        return text

    def _answer(self, text: str) -> str:
        if not self._content_started:
            text = text.lstrip("\n")
            self._content_started = bool(text)
        return text
