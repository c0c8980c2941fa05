"""A generated reasoning task: multi-step problems with a verifiable answer and a written-out trace.

This module owns the problems (:class:`Problem`, :func:`generate_problems`), their split
(:func:`problem_split`), their chat form for SFT (:func:`chat_messages`,
:func:`write_chat_jsonl`), the scorer (:func:`extract_answer`, :func:`is_correct`) and the
typical trace length (:func:`median_trace_tokens`, for thinking budgets).

Kinds (``KINDS``), each with its difficulty knobs:

* ``count`` - how many times a letter occurs in a short random string (knobs ``length=(lo, hi)``
  letters, ``alphabet``). The letters are numbered in the question, and the trace walks the
  string keeping a running count, one ``index letter:count`` step per letter::

      question: How many times does the letter a occur in: 1 b 2 a 3 c 4 a?
      trace:    1 b:0, 2 a:1, 3 c:1, 4 a:2, so 2
      answer:   2

  Each trace step is local: the next index, the letter after that index in the question (an
  induction-head lookup: the index tokens " 3" are unique in the question), the previous count
  plus one on a match; so a tiny model can learn it, while the answer alone needs the whole
  string counted at once. Counts follow a colon ("1", not " 1") so that their tokens never look
  like an index to that lookup.
* ``add`` - the sum of two numbers (knob ``digits=(lo, hi)`` per operand), digits written apart;
  the trace adds column by column, least significant digit first, with the carry::

      question: What is 4 7 + 8 5?
      trace:    7 + 5 + 0 = 12, write 2 carry 1; 4 + 8 + 1 = 13, write 3 carry 1; write 1; so 1 3 2
      answer:   1 3 2

Every trace ends with ``so <answer>``. A problem's split is a hash of its identity (``key``)
alone, so the train and test splits never share a problem, whatever the seed or the knobs.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..serve.reasoning import THINK_END

KINDS = ("count", "add")
SPLITS = ("train", "test")
THINK_SYSTEM, NO_THINK_SYSTEM = "/think", "/no_think"  # Nemotron Nano 2's system-prompt switches
DEFAULT_TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Problem:
    """One problem: ``key`` is its identity (it decides the split), ``trace`` the reasoning, ``answer`` the target."""

    kind: str
    key: str
    question: str
    trace: str
    answer: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


# ---- the kinds ------------------------------------------------------------------------------------
def count_problem(letters: str, target: str) -> Problem:
    """The ``count`` problem: occurrences of ``target`` in ``letters`` (single characters, no spaces)."""
    if not letters or not target or any(c.isspace() for c in letters + target) or len(target) != 1:
        raise ValueError("count_problem needs a non-empty string of letters and one target letter, no spaces")
    numbered = " ".join(f"{i} {c}" for i, c in enumerate(letters, 1))
    steps, count = [], 0
    for i, c in enumerate(letters, 1):
        count += c == target
        steps.append(f"{i} {c}:{count}")
    answer = str(count)
    return Problem("count", f"count:{target}:{letters}",
                   f"How many times does the letter {target} occur in: {numbered}?",
                   ", ".join(steps) + f", so {answer}", answer)


def spaced_digits(n: int) -> str:
    """``472`` -> ``"4 7 2"``: one token per digit for the bundled tokenizer."""
    return " ".join(str(n))


def add_problem(a: int, b: int) -> Problem:
    """The ``add`` problem ``a + b`` (non-negative integers), with a least-significant-digit-first carry trace."""
    if a < 0 or b < 0:
        raise ValueError(f"add_problem needs non-negative operands, got {a} and {b}")
    da, db = [int(d) for d in reversed(str(a))], [int(d) for d in reversed(str(b))]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        total = x + y + carry
        steps.append(f"{x} + {y} + {carry} = {total}, write {total % 10} carry {total // 10}")
        carry = total // 10
    if carry:
        steps.append(f"write {carry}")
    answer = spaced_digits(a + b)
    return Problem("add", f"add:{a}+{b}", f"What is {spaced_digits(a)} + {spaced_digits(b)}?",
                   "; ".join(steps) + f"; so {answer}", answer)


def _span(value: int | Sequence[int], name: str, low: int = 1) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    if not (isinstance(lo, int) and isinstance(hi, int) and low <= lo <= hi):
        raise ValueError(f"{name} must be an integer or a (min, max) pair with {low} <= min <= max, got {value!r}")
    return lo, hi


def _count_drawer(length: int | Sequence[int] = (5, 12), alphabet: str = "abcde") -> Callable[[random.Random], Problem]:
    lo, hi = _span(length, "length")
    letters = sorted(set(alphabet))
    if len(letters) < 2 or any(c.isspace() for c in letters):
        raise ValueError(f"alphabet needs at least two distinct non-space characters, got {alphabet!r}")
    return lambda rng: count_problem("".join(rng.choices(letters, k=rng.randint(lo, hi))), rng.choice(letters))


def _add_drawer(digits: int | Sequence[int] = (2, 4)) -> Callable[[random.Random], Problem]:
    lo, hi = _span(digits, "digits")

    def number(rng: random.Random) -> int:
        n = rng.randint(lo, hi)
        return rng.randint(10 ** (n - 1) if n > 1 else 0, 10 ** n - 1)
    return lambda rng: add_problem(number(rng), number(rng))


_DRAWERS: dict[str, Callable[..., Callable[[random.Random], Problem]]] = {"count": _count_drawer, "add": _add_drawer}


# ---- splits and generation ------------------------------------------------------------------------
def problem_split(key: str, test_fraction: float = DEFAULT_TEST_FRACTION) -> str:
    """"test" or "train": the first 8 bytes of SHA-256(key) as a fraction of 2**64, below ``test_fraction`` = test."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    return "test" if h < test_fraction else "train"


def generate_problems(n: int, split: str = "train", kind: str = "count", seed: int = 0,
                      test_fraction: float = DEFAULT_TEST_FRACTION, **knobs: Any) -> list[Problem]:
    """``n`` distinct problems of ``kind`` in ``split``, a pure function of the arguments.

    Knobs: ``count``: ``length`` (letters, an int or (min, max); default (5, 12)), ``alphabet``
    (default "abcde"); ``add``: ``digits`` (per operand, an int or (min, max); default (2, 4)).
    Candidates are drawn from a generator seeded by (kind, split, seed) and kept when
    :func:`problem_split` puts them in ``split``. ValueError for unknown arguments, and when the
    knobs allow fewer than ``n`` distinct problems in the split.
    """
    if kind not in _DRAWERS:
        raise ValueError(f"unknown problem kind {kind!r}; choose one of: {', '.join(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    try:
        draw = _DRAWERS[kind](**knobs)
    except TypeError:
        raise ValueError(f"unknown knobs for kind {kind!r}: {sorted(knobs)}") from None
    rng = random.Random(f"hybridlm.tasks.reasoning:{kind}:{split}:{seed}")
    out: dict[str, Problem] = {}
    misses, patience = 0, max(2000, 50 * n)  # draws in a row that brought nothing new
    while len(out) < n:
        p = draw(rng)
        if p.key in out or problem_split(p.key, test_fraction) != split:
            misses += 1
            if misses > patience:
                raise ValueError(f"could only find {len(out)} distinct {split} problems of kind {kind!r} with "
                                 f"{knobs or 'the default knobs'}; asked for {n} (widen the knobs)")
            continue
        out[p.key], misses = p, 0
    return list(out.values())


# ---- chat form --------------------------------------------------------------------------------------
def chat_messages(problem: Problem, think: bool = True) -> list[dict[str, str]]:
    """The conversation: system "/think" (or "/no_think"), the question, the assistant's (trace and) answer."""
    assistant: dict[str, str] = {"role": "assistant"}
    if think:
        assistant["reasoning_content"] = problem.trace
    assistant["content"] = problem.answer
    return [{"role": "system", "content": THINK_SYSTEM if think else NO_THINK_SYSTEM},
            {"role": "user", "content": problem.question}, assistant]


def write_chat_jsonl(path: str | Path, problems: Iterable[Problem], think_fraction: float = 1.0,
                     seed: int = 0) -> Path:
    """Write one ``{"messages": chat_messages(p, think)}`` line per problem; returns the path.

    Each problem is a thinking example with probability ``think_fraction`` (a generator seeded by
    ``seed``; 1.0: all of them, 0.0: none), else a "/no_think" example without reasoning_content
    (Nemotron Nano 2 trains on both).
    """
    if not 0.0 <= think_fraction <= 1.0:
        raise ValueError(f"think_fraction must be in [0, 1], got {think_fraction}")
    rng = random.Random(f"hybridlm.tasks.reasoning.think:{seed}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            think = rng.random() < think_fraction
            f.write(json.dumps({"messages": chat_messages(p, think)}, ensure_ascii=False) + "\n")
    return path


# ---- scoring ----------------------------------------------------------------------------------------
def extract_answer(text: str | None) -> str | None:
    """The final answer in a generation: the text after the first ``</think>`` (all of it when there is
    none), stripped; None when that is empty."""
    if text is None:
        return None
    _, closed, after = text.partition(THINK_END)
    answer = (after if closed else text).strip()
    return answer or None


def is_correct(text: str | None, problem: Problem) -> bool:
    """Exact match of :func:`extract_answer` with the problem's answer."""
    return extract_answer(text) == problem.answer


def median_trace_tokens(problems: Iterable[Problem], tokenizer: Any) -> int:
    """The median number of tokens (``tokenizer.encode``) of the problems' traces, rounded up: a
    thinking budget for the task is a small multiple of it."""
    lengths = [len(tokenizer.encode(p.trace)) for p in problems]
    if not lengths:
        raise ValueError("median_trace_tokens needs at least one problem")
    return int(-(-statistics.median(lengths) // 1))
