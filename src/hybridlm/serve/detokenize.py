"""Tokens to text while they are generated: incremental detokenization and stop strings.

A UTF-8 character split over several tokens is held back until it is complete, and text
that could still turn into a stop string is held back until it cannot; the text then
stops right before the stop string.
"""

from __future__ import annotations

from typing import Sequence


class IncrementalDetokenizer:
    """Text of a growing token list, piece by piece.

    Each new piece is decode(window + new) minus decode(window), with a window of a few
    earlier tokens, so tokenizers whose decoding depends on the neighbours (leading
    spaces) come out right; a piece ending in an incomplete UTF-8 character ("\\ufffd")
    waits for the next tokens (at most `MAX_HOLD` of them).
    """

    CONTEXT = 4
    MAX_HOLD = 6

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT:])
        self.prefix, self.read = 0, len(self.ids)  # window start; end of what was already returned

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._piece(final=False)

    def flush(self) -> str:
        """Whatever is still held back (at the end of the request)."""
        return self._piece(final=True)

    def _piece(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        now = self.tokenizer.decode(self.ids[self.prefix:])
        if not final and now.endswith("\ufffd") and len(self.ids) - self.read < self.MAX_HOLD:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]


class TextState:
    """Generated text of one request: stop strings, and how much of it may be sent yet."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self.stop = [s for s in stop if s]
        self.longest = max((len(s) for s in self.stop), default=0)
        self.text = ""
        self.sent = 0

    def add(self, token_id: int) -> bool:
        """Add a token; True once a stop string appeared (the text then ends before it)."""
        return self._append(self.detok.add(token_id))

    def flush(self) -> bool:
        return self._append(self.detok.flush())

    def _append(self, piece: str) -> bool:
        if not piece:
            return False
        start = max(0, len(self.text) - self.longest + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def take(self, final: bool) -> str:
        """The next text to send; unless `final`, minus a tail that may begin a stop string."""
        end = len(self.text) if final else len(self.text) - self._held()
        end = max(end, self.sent)
        out, self.sent = self.text[self.sent:end], end
        return out

    def _held(self) -> int:
        for k in range(min(self.longest - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                return k
        return 0
