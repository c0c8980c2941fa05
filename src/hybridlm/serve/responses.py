"""The OpenAI response shapes: choices, stream chunks, usage, server-sent events, log-probabilities.

Log-probabilities follow vLLM's shapes. Completions: ``{"tokens", "token_logprobs",
"top_logprobs", "text_offset"}`` (with ``echo`` the prompt comes first and its first
entry is null; each ``top_logprobs`` dict holds the requested top tokens and the chosen
one). Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.
A log-probability of -inf is written as -9999.0 (JSON has no infinity), as vLLM does.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable

from .engine import RequestOutput
from .logprobs import TokenLogprob

TokenText = Callable[[int], str]   # token id -> its text (the server caches tokenizer.decode([id]))


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else -9999.0


def completion_logprobs(entries: list[tuple[int, TokenLogprob | None]], text: TokenText,
                        offset: int) -> tuple[dict, int]:
    """The completions `logprobs` object of (token id, its log-probs or None) pairs whose text starts
    at `offset`; also the offset after them. None: the prompt's first token, which nothing predicts."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, e in entries:
        piece = text(token_id)
        out["tokens"].append(piece)
        out["text_offset"].append(offset)
        offset += len(piece)
        if e is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(finite(e.logprob))
        top = {text(t): finite(lp) for t, lp in e.top}
        top.setdefault(piece, finite(e.logprob))
        out["top_logprobs"].append(top)
    return out, offset


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> dict[str, Any]:
    """The chat `logprobs` object: one entry per generated token, with its `top_logprobs` list."""
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        piece = text(token_id)
        return {"token": piece, "logprob": finite(logprob), "bytes": list(piece.encode("utf-8", "replace"))}
    return {"content": [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}


def choice(index: int, text: str, finish_reason: str | None, chat: bool, logprobs: dict | None = None,
           reasoning: str | None = None) -> dict[str, Any]:
    """One entry of a non-streamed response's `choices` (chat: `reasoning` is vLLM's reasoning_content)."""
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chunk_choice(index: int, text: str, finish_reason: str | None, chat: bool, logprobs: dict | None = None,
                 reasoning: str = "") -> dict[str, Any]:
    """One entry of a stream chunk's `choices` (chat: a `delta`, empty when there is no new text)."""
    if chat:
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if text:
            delta["content"] = text
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def role_chunk_choices(n: int) -> list[dict[str, Any]]:
    """The first chat stream chunk: the assistant role for every choice."""
    return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
            for i in range(n)]


def usage(prompt_lens: list[int], final: dict[int, RequestOutput]) -> dict[str, int]:
    """Token counts: each prompt once (however many completions), every completion's tokens."""
    prompt = sum(prompt_lens)
    completion = sum(o.completion_tokens for o in final.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event line: ``data: {json}`` (or a literal such as ``[DONE]``); ASCII escapes."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=True)}\n\n"
