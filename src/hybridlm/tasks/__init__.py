"""Bundled, generated tasks with verifiable answers (no download).

    reasoning.py  seeded multi-step problems (letter counting, digit-wise addition) with a `<think>` trace,
                  disjoint train/test splits, chat JSONL for SFT, an exact-match scorer
"""

from .reasoning import (
    KINDS,
    Problem,
    chat_messages,
    extract_answer,
    generate_problems,
    is_correct,
    median_trace_tokens,
    problem_split,
    write_chat_jsonl,
)

__all__ = ["KINDS", "Problem", "chat_messages", "extract_answer", "generate_problems", "is_correct",
           "median_trace_tokens", "problem_split", "write_chat_jsonl"]
