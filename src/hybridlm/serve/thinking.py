"""Thinking-budget control: end a request's `<think>` block after a number of tokens.

Nemotron Nano 2 controls how long it reasons at inference by closing the thinking
early. `ThinkingBudget` follows one request's generated text: thinking starts at the
beginning when the prompt ends inside an open `<think>` (a chat template's generation
prompt), or when the text opens with `<think>`. Once the model has produced `budget`
tokens inside the block without closing it, the engine forces the tokens of
`FORCED_CLOSE` (a newline, `</think>`, a blank line) instead of sampling, then the model
continues with its answer. A budget of 0 closes the block before any thinking token.
"""

from __future__ import annotations

from .reasoning import THINK_END, THINK_START

FORCED_CLOSE = "\n" + THINK_END + "\n\n"


class ThinkingBudget:
    """States: "before" (no thinking yet), "thinking", "closing" (forcing the close), "done"."""

    def __init__(self, budget: int, in_think: bool, close_ids: list[int]) -> None:
        if not close_ids:
            raise ValueError("the forced close of a thinking block needs at least one token")
        self.budget, self.close_ids = budget, list(close_ids)
        self.state = "thinking" if in_think else "before"
        self.spent = 0          # tokens generated inside the block
        self.scan_from = 0      # where to look for the closing tag in the generated text
        self.queue: list[int] = []

    def forced(self) -> int | None:
        """The token to emit instead of sampling at this step, or None to sample."""
        if self.state == "thinking" and self.spent >= self.budget:
            self.state, self.queue = "closing", list(self.close_ids)
        if self.state == "closing" and self.queue:
            return self.queue.pop(0)
        return None

    def observe(self, text: str) -> None:
        """After each accepted token; `text` is everything generated so far."""
        if self.state == "before":
            head = text.lstrip()
            if head.startswith(THINK_START):
                self.state, self.scan_from = "thinking", len(text) - len(head) + len(THINK_START)
            elif head and not THINK_START.startswith(head):
                self.state = "done"  # the answer began without thinking
        elif self.state == "thinking":
            if text.find(THINK_END, self.scan_from) >= 0:
                self.state = "done"
            else:
                self.spent += 1
                self.scan_from = max(self.scan_from, len(text) - len(THINK_END))
        elif self.state == "closing" and not self.queue:
            self.state = "done"
