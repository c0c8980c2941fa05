"""The generated reasoning task: seeded, disjoint splits, traces that recompute, the exact-match scorer, chat JSONL."""

from __future__ import annotations

import json
import re

import pytest

from hybridlm.tasks.reasoning import KINDS, add_problem, chat_messages, count_problem, extract_answer
from hybridlm.tasks.reasoning import generate_problems, is_correct, median_trace_tokens, problem_split, write_chat_jsonl


# ---- independent recomputation of each kind from its question ---------------------------------------
def check_count(p) -> None:
    m = re.fullmatch(r"How many times does the letter (\S) occur in: (.+)\?", p.question)
    assert m, p.question
    target, numbered = m[1], m[2].split(" ")
    assert numbered[0::2] == [str(i) for i in range(1, len(numbered) // 2 + 1)]  # 1 x 2 y 3 z ...
    letters = numbered[1::2]
    assert p.answer == str(letters.count(target))
    *steps, final = p.trace.split(", ")
    assert final == f"so {p.answer}"
    assert len(steps) == len(letters)
    for i, step in enumerate(steps):
        assert step == f"{i + 1} {letters[i]}:{letters[:i + 1].count(target)}"
    assert steps[-1].split(":")[-1] == p.answer  # the walk's last running count is the answer


def check_add(p) -> None:
    m = re.fullmatch(r"What is ([\d ]+) \+ ([\d ]+)\?", p.question)
    assert m, p.question
    a, b = int(m[1].replace(" ", "")), int(m[2].replace(" ", ""))
    assert p.answer == " ".join(str(a + b))
    *steps, final = p.trace.split("; ")
    assert final == f"so {p.answer}"
    written, carry = [], 0
    for i, step in enumerate(steps):
        if step.startswith("write ") and i == len(steps) - 1 and carry:
            written.append(step.removeprefix("write "))
            continue
        x, y, c, s, d, k = map(int, re.fullmatch(r"(\d) \+ (\d) \+ (\d) = (\d+), write (\d) carry (\d)", step).groups())
        assert (x, y) == ((a // 10 ** i) % 10, (b // 10 ** i) % 10)  # column i from the right
        assert c == carry and s == x + y + c and d == s % 10 and k == s // 10
        written.append(str(d))
        carry = k
    assert " ".join(reversed(written)) == p.answer


CHECKS = {"count": check_count, "add": check_add}


@pytest.mark.parametrize("kind", KINDS)
def test_traces_and_answers_recompute(kind):
    for split in ("train", "test"):
        for p in generate_problems(300, split, kind, seed=3):
            assert p.kind == kind
            CHECKS[kind](p)
    CHECKS[kind](generate_problems(20, "train", kind, seed=0, **({"length": 30} if kind == "count"
                                                                  else {"digits": 9}))[0])


def test_hand_checked_examples():
    p = count_problem("baca", "a")
    assert (p.question, p.trace, p.answer) == (
        "How many times does the letter a occur in: 1 b 2 a 3 c 4 a?", "1 b:0, 2 a:1, 3 c:1, 4 a:2, so 2", "2")
    p = add_problem(47, 85)
    assert p.trace == "7 + 5 + 0 = 12, write 2 carry 1; 4 + 8 + 1 = 13, write 3 carry 1; write 1; so 1 3 2"
    assert p.answer == "1 3 2"


@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_seeded(kind):
    a = generate_problems(50, "train", kind, seed=7)
    assert a == generate_problems(50, "train", kind, seed=7)
    assert a != generate_problems(50, "train", kind, seed=8)
    assert len({p.key for p in a}) == 50  # distinct
    assert generate_problems(20, "train", kind, seed=7) == a[:20]  # a prefix: more problems, same first ones


@pytest.mark.parametrize("kind", KINDS)
def test_splits_are_disjoint(kind):
    train = {p.key for seed in (0, 1) for p in generate_problems(1500, "train", kind, seed=seed)}
    test = {p.key for seed in (0, 2) for p in generate_problems(400, "test", kind, seed=seed)}
    assert train and test and not train & test
    assert all(problem_split(k) == "train" for k in train) and all(problem_split(k) == "test" for k in test)
    # the hash sends about test_fraction of all problems to test
    keys = [f"{kind}:{i}" for i in range(5000)]
    assert sum(problem_split(k) == "test" for k in keys) / len(keys) == pytest.approx(0.2, abs=0.02)
    assert sum(problem_split(k, 0.5) == "test" for k in keys) / len(keys) == pytest.approx(0.5, abs=0.03)


def test_difficulty_knobs():
    lengths = {len(p.trace.split(", ")) - 1 for p in generate_problems(200, "train", "count", length=(3, 4))}
    assert lengths == {3, 4}
    letters = {c for p in generate_problems(100, "train", "count", alphabet="xy") for c in p.key.split(":")[2]}
    assert letters == {"x", "y"}
    sizes = {len(m) for p in generate_problems(200, "train", "add", digits=(2, 3))
             for m in re.fullmatch(r"What is ([\d ]+) \+ ([\d ]+)\?", p.question).groups()}
    assert sizes == {len("1 2"), len("1 2 3")}


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        generate_problems(1, kind="multiply")
    with pytest.raises(ValueError, match="split"):
        generate_problems(1, split="val")
    with pytest.raises(ValueError, match="knobs"):
        generate_problems(1, kind="add", length=3)
    with pytest.raises(ValueError, match="length"):
        generate_problems(1, kind="count", length=(5, 2))
    with pytest.raises(ValueError, match="alphabet"):
        generate_problems(1, kind="count", alphabet="aa")
    with pytest.raises(ValueError, match="widen"):  # 100 one-digit sums, ~20 of them in test
        generate_problems(50, "test", "add", digits=1)


def test_scorer():
    p = count_problem("abca", "a")
    assert p.answer == "2"
    for right in ["2", " 2\n", f"{p.trace}\n</think>\n\n2", f"<think>\n{p.trace}\n</think>\n\n2\n", "</think>2"]:
        assert extract_answer(right) == "2" and is_correct(right, p), right
    for wrong in ["3", "2.", "the answer is 2", f"<think>\n{p.trace}\n</think>\n\n3", "</think>\n\n2 2"]:
        assert not is_correct(wrong, p), wrong
    for missing in [None, "", "  \n", f"<think>\n{p.trace}\n</think>\n\n", "<think>1 a:1, so 2</think>"]:
        assert extract_answer(missing) is None and not is_correct(missing, p), missing
    assert not is_correct(f"<think>\n{p.trace}", p)  # a trace that never closes has no answer of its own
    q = add_problem(47, 85)
    assert is_correct("</think>\n\n1 3 2", q) and not is_correct("</think>\n\n132", q)


def test_write_chat_jsonl(tmp_path):
    problems = generate_problems(40, "train", "count", seed=1)
    path = write_chat_jsonl(tmp_path / "sub" / "all.jsonl", problems)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"messages": [{"role": "system", "content": "/think"}, {"role": "user", "content": p.question},
                                  {"role": "assistant", "reasoning_content": p.trace, "content": p.answer}]}
                    for p in problems]
    none_path = write_chat_jsonl(tmp_path / "none.jsonl", problems, 0.0)
    none = [json.loads(line) for line in none_path.read_text().splitlines()]
    assert none == [{"messages": chat_messages(p, think=False)} for p in problems]
    assert all("reasoning_content" not in r["messages"][2] and r["messages"][0]["content"] == "/no_think" for r in none)
    half = write_chat_jsonl(tmp_path / "half.jsonl", problems, 0.5, seed=3).read_text()
    assert half == write_chat_jsonl(tmp_path / "again.jsonl", problems, 0.5, seed=3).read_text()
    thinks = [r["messages"][0]["content"] == "/think" for r in map(json.loads, half.splitlines())]
    assert 5 < sum(thinks) < 35
    assert all(("reasoning_content" in json.loads(line)["messages"][2]) == t
               for line, t in zip(half.splitlines(), thinks))
    with pytest.raises(ValueError, match="think_fraction"):
        write_chat_jsonl(tmp_path / "bad.jsonl", problems, 1.5)


def test_median_trace_tokens():
    class Chars:  # one token per character
        def encode(self, text):
            return list(text)

    problems = generate_problems(51, "train", "count", seed=2)
    lengths = sorted(len(p.trace) for p in problems)
    assert median_trace_tokens(problems, Chars()) == lengths[25]
    with pytest.raises(ValueError):
        median_trace_tokens([], Chars())
