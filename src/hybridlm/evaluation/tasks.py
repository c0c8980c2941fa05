"""The bundled lm-eval tasks and `evaluate_tasks`: any lm-eval task on a `HybridLM`, in this process.

Bundled tasks (YAMLs in ``task_files/``; their documents are generated when the task loads, so
no data file and no download):

* ``hybridlm_kjv_verses`` (multiple_choice; metrics ``acc``, ``acc_norm``): finish a verse of the
  bundled King James Bible. The context is the verse line as the corpus has it ("Genesis 1:3 And
  God said, Let there be light: and") without its last ``kjv_words`` words; the choices are those
  words and the last ``kjv_words`` words of ``kjv_choices - 1`` other verses (chance:
  1 / kjv_choices). The corpus is also the bundled training corpus: this measures how well a
  model learnt it, not generalisation (restrict it with ``kjv_books`` to what a model did or did
  not see).
* ``hybridlm_reasoning`` (generate_until; metric ``exact_match``): the test split of
  `hybridlm.tasks.reasoning`, scored with its `is_correct` (the text after ``</think>``). The
  prompt is the model's chat template rendering of [system "/think" (or "/no_think"), user
  question] with the generation prompt, exactly the prefix SFT trains on
  (`hybridlm.tasks.reasoning.chat_messages`).

Their knobs are task metadata (``metadata={...}`` here, ``--metadata '{...}'`` in lm-eval, or
``dataset_kwargs`` in a copy of the YAML): ``kjv_docs`` (500), ``kjv_seed``, ``kjv_choices`` (4),
``kjv_words`` (4), ``kjv_books`` (comma-separated book names; default all), ``reasoning_docs``
(200), ``reasoning_seed``, ``reasoning_kind`` (count | add), ``reasoning_length``,
``reasoning_alphabet``, ``reasoning_digits`` (see `generate_problems`).

Other tasks: ``tasks`` may name any task lm-eval has installed (``arc_easy``, ``hellaswag``, ...; its
dataset must already be in the Hugging Face datasets cache when the machine is offline) or a task
in a directory of YAMLs passed as ``include_path`` (lm-eval's ``--include_path``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..model.lm import HybridLM
from ..tasks.reasoning import NO_THINK_SYSTEM, THINK_SYSTEM, Problem, generate_problems, is_correct
from ..training.corpus import default_corpus_path, read_documents
from ..training.tokenizer import Tokenizer
from .harness import import_lm_eval, task_manager

KJV_TASK = "hybridlm_kjv_verses"
REASONING_TASK = "hybridlm_reasoning"
BUNDLED_TASKS = (KJV_TASK, REASONING_TASK)
CHAT_TASKS = frozenset({REASONING_TASK})  # run with the chat template unless told otherwise
_VERSE = re.compile(r"^(?P<book>.+?) \d+:\d+ (?P<text>.+)$")


# ---- hybridlm_kjv_verses ----------------------------------------------------------------------------
@lru_cache(maxsize=1)
def kjv_verses() -> tuple[tuple[str, str], ...]:
    """(book, verse line) of every verse of the bundled corpus, in order."""
    lines = "\n".join(read_documents(default_corpus_path())).splitlines()
    return tuple((m["book"], line) for line in lines if (m := _VERSE.match(line)))


def kjv_verse_docs(n: int = 500, seed: int = 0, n_choices: int = 4, n_words: int = 4,
                   books: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
    """``n`` verse-completion documents ``{"context", "choices", "label", "verse"}`` (see the module
    docstring), a pure function of the arguments; ``books`` limits the verses to those books."""
    if n < 1 or n_choices < 2 or n_words < 1:
        raise ValueError(f"need n >= 1, n_choices >= 2 and n_words >= 1, got {n}, {n_choices}, {n_words}")
    wanted = {b.strip() for b in books.split(",")} if isinstance(books, str) else set(books or ())
    known = {book for book, _ in kjv_verses()}
    if wanted - known:
        raise ValueError(f"unknown book(s) {sorted(wanted - known)}; the corpus has e.g. {sorted(known)[:5]}")
    # a verse qualifies with at least 5 words (its reference, e.g. "Genesis 1:3", and 3 more) before the last n_words
    pool = [line for book, line in kjv_verses() if (not wanted or book in wanted)
            and len(line.split(" ")) >= 5 + n_words]
    endings = {" ".join(line.split(" ")[-n_words:]) for line in pool}
    if len(pool) < n or len(endings) < n_choices:
        raise ValueError(f"only {len(pool)} verses with {len(endings)} different endings qualify (books={books!r}, "
                         f"n_words={n_words}); asked for {n} documents of {n_choices} choices")
    rng = random.Random(f"hybridlm.evaluation.kjv:{seed}")
    docs = []
    for line in rng.sample(pool, n):
        words = line.split(" ")
        truth = " ".join(words[-n_words:])
        choices = [truth]
        while len(choices) < n_choices:
            other = " ".join(rng.choice(pool).split(" ")[-n_words:])
            if other not in choices:
                choices.append(other)
        rng.shuffle(choices)
        docs.append({"context": " ".join(words[:-n_words]), "choices": choices, "label": choices.index(truth),
                     "verse": line})
    return docs


def load_kjv_verses(kjv_docs: int = 500, kjv_seed: int = 0, kjv_choices: int = 4, kjv_words: int = 4,
                    kjv_books: str | None = None, **_metadata: Any) -> Any:
    """lm-eval ``custom_dataset`` of `KJV_TASK`: the documents as the ``test`` split."""
    import datasets
    docs = kjv_verse_docs(int(kjv_docs), int(kjv_seed), int(kjv_choices), int(kjv_words), kjv_books)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


# ---- hybridlm_reasoning -----------------------------------------------------------------------------
def load_reasoning(reasoning_docs: int = 200, reasoning_seed: int = 0, reasoning_kind: str = "count",
                   reasoning_length: Any = None, reasoning_alphabet: str | None = None, reasoning_digits: Any = None,
                   **_metadata: Any) -> Any:
    """lm-eval ``custom_dataset`` of `REASONING_TASK`: test-split problems (their `Problem` fields) as ``test``."""
    import datasets
    knobs = {k: v for k, v in (("length", reasoning_length), ("alphabet", reasoning_alphabet),
                               ("digits", reasoning_digits)) if v is not None}
    problems = generate_problems(int(reasoning_docs), "test", reasoning_kind, int(reasoning_seed), **knobs)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([p.to_dict() for p in problems])})


def reasoning_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """lm-eval ``process_results`` of `REASONING_TASK`: exact match of the one generation."""
    problem = Problem(**{f.name: doc[f.name] for f in fields(Problem)})
    return {"exact_match": float(is_correct(results[0], problem))}


# ---- running lm-eval --------------------------------------------------------------------------------
def evaluate_tasks(model: HybridLM, tokenizer: Tokenizer, tasks: Sequence[str] | str,
                   include_path: str | Path | Sequence[str | Path] | None = None, limit: int | float | None = None,
                   num_fewshot: int | None = None, batch_size: int = 8, gen_kwargs: dict[str, Any] | None = None,
                   apply_chat_template: bool | None = None, thinking: bool | None = True,
                   metadata: dict[str, Any] | None = None, max_length: int | None = None,
                   log_samples: bool = False, bootstrap_iters: int = 0, compile: bool = False) -> dict[str, Any]:
    """Run lm-eval tasks on ``model`` and return `lm_eval.simple_evaluate`'s results dict.

    ``tasks``: names (or one comma-separated string): the bundled tasks, any installed lm-eval
    task, or tasks of the YAML directories ``include_path``. ``limit``: documents per task (a
    float < 1: a fraction). ``gen_kwargs`` update the generate_until tasks' generation arguments
    (``max_gen_toks``, ``until``, ``do_sample``, ``temperature``, ``thinking_budget``, ...).
    ``apply_chat_template``: None renders the chat tasks (`CHAT_TASKS`) with the tokenizer's chat
    template and the others as plain text; True / False: all / none. Chat prompts get the system
    message "/think" (``thinking=True``), "/no_think" (False) or none (None). ``metadata`` goes to
    every task (the bundled tasks' knobs). ``results["results"][task]`` holds the metrics, e.g.
    ``"acc,none"``; `results_table` formats them. ``bootstrap_iters`` > 0 adds lm-eval's bootstrap
    standard errors; ``compile`` compiles generation's decode step. Unknown tasks: ValueError.
    """
    import_lm_eval()
    import lm_eval

    from .lm_eval_model import HybridLMEval

    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    manager = task_manager(names, include_path, metadata)
    lm = HybridLMEval(model, tokenizer, batch_size=batch_size, max_length=max_length, compile=compile)
    system = None if thinking is None else THINK_SYSTEM if thinking else NO_THINK_SYSTEM
    chat = [t for t in names if (t in CHAT_TASKS if apply_chat_template is None else apply_chat_template)]
    runs = []
    for group, use_chat in (([t for t in names if t not in chat], False), (chat, True)):
        if group:
            runs.append(lm_eval.simple_evaluate(
                model=lm, tasks=group, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                batch_size=batch_size, gen_kwargs=gen_kwargs or None, apply_chat_template=use_chat,
                system_instruction=system if use_chat else None, log_samples=log_samples,
                bootstrap_iters=bootstrap_iters, cache_requests=False))
    return merge_results(runs)


def merge_results(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several `simple_evaluate` runs over different tasks: the per-task
    sections ("results", "configs", "versions", "n-shot", "samples", ...) joined, the rest of the first."""
    merged = dict(runs[0])
    for run in runs[1:]:
        for key, value in run.items():
            if key != "config" and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
    return merged


def results_table(results: dict[str, Any]) -> str:
    """lm-eval's markdown table of the metrics in ``results``."""
    from lm_eval.utils import make_table
    return make_table(results)
