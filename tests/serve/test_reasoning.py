"""hybridlm.serve.reasoning: the `<think>` split of whole texts and of streamed pieces.

The streaming contract is checked as a property: for every way of cutting a short text
into pieces (all 2**(n-1) cut sets) and for random cuts of longer random texts, the joined
deltas of `ReasoningStream` equal `split_reasoning` of the whole text.
"""

from __future__ import annotations

import itertools
import random

import pytest

from hybridlm.serve.reasoning import (
    PARSERS, THINK_END, THINK_START, ReasoningStream, opens_thinking, reasoning_parser,
    split_reasoning,
)


def stream(pieces, in_think: bool, tags=(THINK_START, THINK_END)) -> tuple[str, str]:
    s = ReasoningStream(in_think, tags)
    reasoning, content = [], []
    for piece in pieces:
        r, c = s.feed(piece)
        assert isinstance(r, str) and isinstance(c, str)
        reasoning.append(r)
        content.append(c)
    r, c = s.finish()
    reasoning.append(r)
    content.append(c)
    return "".join(reasoning), "".join(content)


def expected(text: str, in_think: bool, tags=(THINK_START, THINK_END)) -> tuple[str, str]:
    reasoning, content = split_reasoning(text, in_think, tags)
    return reasoning or "", content or ""


def cut(text: str, positions) -> list[str]:
    bounds = [0, *positions, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def all_cuts(text: str):
    inner = range(1, len(text))
    for k in range(len(text)):
        for positions in itertools.combinations(inner, k):
            yield cut(text, positions)


# --- tags, parsers, prompts ------------------------------------------------------------

def test_tags():
    assert THINK_START == "<think>" and THINK_END == "</think>"


@pytest.mark.parametrize("name", ["think", "deepseek_r1", "qwen3"])
def test_parsers_are_think_tags(name):
    assert name in PARSERS
    assert reasoning_parser(name) == ("<think>", "</think>")


def test_unknown_parser_lists_choices():
    with pytest.raises(ValueError) as err:
        reasoning_parser("granite")
    message = str(err.value)
    assert "granite" in message
    for name in PARSERS:
        assert name in message


@pytest.mark.parametrize("prompt, opens", [
    ("<extra_id_1>Assistant\n<think>\n", True),
    ("System\n\nUser\nhi\nAssistant\n<think>", True),
    ("<think>", True),
    ("Assistant\n<think></think>", False),
    ("Assistant\n<think>\n</think>\n\n", False),
    ("Assistant\n", False),
    ("", False),
    ("</think>", False),
    ("<think>a</think>b\n<think>\n", True),          # an earlier turn's block, then a new one
    ("<think>a</think>b\n<think>\nc</think>", False),
    ("</think><think>", True),
    ("<think></think></think>", False),
])
def test_opens_thinking(prompt, opens):
    assert opens_thinking(prompt) is opens


# --- split_reasoning -------------------------------------------------------------------

@pytest.mark.parametrize("text, in_think, want", [
    # started inside the block (prompt ended with "<think>\n")
    ("I think.\n</think>\n\nAnswer.", True, ("I think.", "Answer.")),
    ("\n\nI think.\n\n</think>Answer.\n\n", True, ("I think.", "Answer.\n\n")),
    ("</think>Answer", True, (None, "Answer")),
    ("\n</think>\n", True, (None, None)),
    ("still thinking\n", True, ("still thinking", None)),
    ("still thinking</thi", True, ("still thinking</thi", None)),
    ("", True, (None, None)),
    ("\n\n", True, (None, None)),
    ("a</think>b</think>c", True, ("a", "b</think>c")),
    ("<think>a</think>b", True, ("<think>a", "b")),      # only the end tag is special inside
    ("a\n\nb\n</think> \n c", True, ("a\n\nb", " \n c")),
    ("  a  </think>  b", True, ("  a  ", "  b")),         # only newlines are stripped
    ("\r\na\r\n</think>b", True, ("\r\na\r", "b")),
    # not started inside: a <think> at the very start opens the block
    ("<think>\nhmm\n</think>\n\nYes.", False, ("hmm", "Yes.")),
    (" \n\t<think>hmm</think>Yes.", False, ("hmm", "Yes.")),
    ("<think>never closed", False, ("never closed", None)),
    ("<think>", False, (None, None)),
    ("<think></think>", False, (None, None)),
    ("Yes. <think>no</think>", False, (None, "Yes. <think>no</think>")),
    ("a</think>b", False, (None, "a</think>b")),
    ("\n\nHello\n", False, (None, "Hello\n")),
    ("  Hello", False, (None, "  Hello")),
    ("<thinking>x", False, (None, "<thinking>x")),
    ("<thi", False, (None, "<thi")),
    ("", False, (None, None)),
    ("\n", False, (None, None)),
    (" ", False, (None, " ")),
    ("<think>思考🙂\n</think>\n答え", False, ("思考🙂", "答え")),
    ("\u3000<think>x</think>y", False, ("x", "y")),   # any whitespace may precede <think>
])
def test_split_reasoning(text, in_think, want):
    assert split_reasoning(text, in_think) == want


def test_split_never_returns_empty_strings():
    rng = random.Random(0)
    for _ in range(2000):
        text = random_text(rng, rng.randint(0, 12))
        for in_think in (False, True):
            reasoning, content = split_reasoning(text, in_think)
            assert reasoning != "" and content != ""
            assert content is None or not content.startswith("\n")
            assert reasoning is None or not (reasoning.startswith("\n") or reasoning.endswith("\n"))


# --- ReasoningStream: the property -----------------------------------------------------

SHORT_TEXTS = [
    "", "a", "\n", "\n\n", "ab\nc", "<", "</", "</thi", "</think>", "<think>", "<think",
    "</think>a", "a</think>", "\n</think>\n", "a\n</think>\nb", "\n\n</think>\n\n",
    "a\n</thinkb", "a</thi\nnk>", "</</think>", "<</think>x", "<think></th", "<think>\n",
    " <think>a", "\n<think>\n", "\t <thi", "x<think>y", "<think>a</t", " <think>\n</",
    "<think>\n\n</", "\n\n<think>", " \n ", "é\n</think>\nü", "🙂</think>🙂", "<thinkx",
    "a\n\nb\n", "\n</\n", "</think></", "</think>\n</t",
]

MEDIUM_TEXTS = [
    "<think>\nhmm\n</think>\n\nYes.", "a</think>b</think>c", "</think></think>",
    "<think></think>", "<think>a</think>", " \n<think>\n\n</think>\n\n\n",
    "x\n\n</thi\n</think>\n<think>", "\u3000<think>é</th🙂</think>ü",
]


@pytest.mark.parametrize("in_think", [True, False])
def test_stream_equals_split_for_every_cut_of_short_texts(in_think):
    runs = 0
    for text in SHORT_TEXTS:
        assert len(text) <= 13
        want = expected(text, in_think)
        for pieces in all_cuts(text) if text else [[""]]:
            assert stream(pieces, in_think) == want, (text, pieces)
            runs += 1
    assert runs > 1000


@pytest.mark.parametrize("in_think", [True, False])
def test_stream_equals_split_for_every_cut_of_medium_texts_into_up_to_4_pieces(in_think):
    for text in MEDIUM_TEXTS:
        want = expected(text, in_think)
        for k in range(4):
            for positions in itertools.combinations(range(1, len(text)), k):
                pieces = cut(text, positions)
                assert stream(pieces, in_think) == want, (text, pieces)


ATOMS = ["a", "b", "é", "思", "🙂", " ", "\t", "\n", "\n", "\n\n", "<", "/", ">", "</", "<t",
         "</thi", "<thi", "think", "<think>", "</think>", "<think>", "</think>", "\u3000", "\r"]


def random_text(rng: random.Random, n_atoms: int) -> str:
    return "".join(rng.choice(ATOMS) for _ in range(n_atoms))


def test_stream_equals_split_for_every_cut_of_small_random_texts():
    """Exhaustive cuts of random texts of up to 12 characters built from tag fragments."""
    rng = random.Random(1)
    done = 0
    while done < 150:
        text = random_text(rng, rng.randint(1, 5))
        if len(text) > 12:
            continue
        done += 1
        for in_think in (False, True):
            want = expected(text, in_think)
            for pieces in all_cuts(text):
                assert stream(pieces, in_think) == want, (text, pieces, in_think)


def test_stream_equals_split_for_random_cuts_of_long_texts():
    rng = random.Random(2)
    for _ in range(1500):
        text = random_text(rng, rng.randint(0, 40))
        if rng.random() < 0.3:     # a realistic shape too
            text = rng.choice(["", " ", "\n", "<think>", "\n<think>\n"]) + text
        in_think = rng.random() < 0.5
        want = expected(text, in_think)
        k = rng.randint(0, max(0, len(text) - 1))
        positions = sorted(rng.sample(range(1, len(text)), k)) if len(text) > 1 else []
        pieces = cut(text, positions)
        # empty pieces (a token that decodes to nothing) change nothing either
        for _ in range(rng.randint(0, 3)):
            pieces.insert(rng.randint(0, len(pieces)), "")
        assert stream(pieces, in_think) == want, (text, pieces, in_think)
        assert stream(list(text), in_think) == want, (text, in_think)   # one character at a time
        assert stream([text], in_think) == want, (text, in_think)       # all at once


def test_stream_with_other_tags():
    tags = ("<reason>", "<\\reason>")
    rng = random.Random(3)
    atoms = ["x", "\n", "<", "<\\rea", "<reason>", "<\\reason>", " "]
    for _ in range(500):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 12)))
        for in_think in (False, True):
            positions = sorted(rng.sample(range(1, len(text)), rng.randint(0, max(0, len(text) - 1)))) \
                if len(text) > 1 else []
            assert stream(cut(text, positions), in_think, tags) == expected(text, in_think, tags)
    assert split_reasoning("<reason>a<\\reason>b", False, tags) == ("a", "b")


# --- ReasoningStream: it holds back only what is undecided ------------------------------

def test_stream_returns_decided_text_at_once():
    s = ReasoningStream(in_think=True)
    assert s.feed("\nLet me") == ("Let me", "")
    assert s.feed(" see.\n") == (" see.", "")          # the newline waits: an end tag drops it
    assert s.feed("\nOk") == ("\n\nOk", "")
    assert s.feed("</thi") == ("", "")                 # maybe an end tag
    assert s.thinking
    assert s.feed("nk>\n\n") == ("", "")               # leading newlines of the content go
    assert not s.thinking
    assert s.feed("Hi") == ("", "Hi")
    assert s.feed("\n</think>\n") == ("", "\n</think>\n")  # after the block nothing is special
    assert s.finish() == ("", "")


def test_stream_partial_end_tag_that_is_not_one():
    s = ReasoningStream(in_think=True)
    assert s.feed("a</th") == ("a", "")
    assert s.feed("ing") == ("</thing", "")
    assert s.feed("<") == ("", "")
    assert s.finish() == ("<", "")                     # never closed: all of it is reasoning


def test_stream_not_in_think():
    s = ReasoningStream(in_think=False)
    assert s.feed(" \n") == ("", "")                   # a <think> may still follow
    assert s.feed("<th") == ("", "")
    assert s.feed("ink>\nhmm") == ("hmm", "")
    assert s.feed("</think>ok") == ("", "ok")

    s = ReasoningStream(in_think=False)
    assert s.feed("  <th") == ("", "")
    assert s.feed("e") == ("", "  <the")               # not a <think>: content, verbatim
    assert s.feed(" end</think>") == ("", " end</think>")

    s = ReasoningStream(in_think=False)
    assert s.feed("Hello") == ("", "Hello")            # content flows without delay
    assert s.feed(" <think>") == ("", " <think>")
    assert s.finish() == ("", "")


def test_stream_finish_twice_and_held_at_end():
    s = ReasoningStream(in_think=False)
    assert s.feed("\n<thi") == ("", "")
    assert s.finish() == ("", "<thi")
    assert s.finish() == ("", "")


def test_stream_held_text_is_bounded():
    """Besides runs of newlines and the opening whitespace, at most len(end tag) - 1 chars wait."""
    rng = random.Random(4)
    for _ in range(300):
        text = random_text(rng, rng.randint(0, 30)).replace("\n", "x").replace("\r", "x")
        s = ReasoningStream(in_think=True)
        fed = emitted = 0
        for ch in text:
            r, c = s.feed(ch)
            fed += 1
            emitted += len(r) + len(c)
            if s.thinking:                             # no end tag yet: only a tag's start waits
                assert fed - emitted <= len(THINK_END) - 1, text[:fed]
