"""From engine outputs to HTTP answers: one whole JSON body, or a stream of server-sent events.

A `Call` is one HTTP request in flight: its engine requests (prompt-major, `n` per
prompt), the queue their outputs arrive on (from the engine thread), and how to shape
the answer (chat or completion, echo, log-probs, the reasoning split). A client that
disconnects has its unfinished requests aborted: their slots are free at the next step.
Answers with log-probs are shaped in a worker thread: their token texts come from the
tokenizer, which never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse

from .engine import Engine, Request, RequestOutput
from .errors import APIError, error_body
from .logprobs import TokenLogprob
from .reasoning import ReasoningStream, Tags, split_reasoning
from .responses import (TokenText, chat_logprobs, choice, chunk_choice, completion_logprobs, role_chunk_choices,
                        sse, usage)

DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


@dataclass
class Call:
    http: HTTPRequest
    engine: Engine
    reqs: list[Request]
    head: dict[str, Any]                 # id, created, model of every response body / chunk
    chat: bool
    n: int
    token_text: TokenText
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)  # (index into reqs, RequestOutput)
    logprobs: bool = False               # the answer carries log-probs
    echo: list[str] | None = None        # completions with echo: each prompt's text
    reasoning: tuple[Tags, bool] | None = None   # chat with a reasoning parser: (tags, starts in <think>)

    def prompt_ids(self, index: int) -> list[int]:
        return self.reqs[index].prompt_ids

    def usage(self, final: dict[int, RequestOutput]) -> dict[str, int]:
        return usage([len(r.prompt_ids) for r in self.reqs[::self.n]], final)

    def abort_unfinished(self, final: dict[int, RequestOutput]) -> None:
        for i, r in enumerate(self.reqs):
            if i not in final:
                self.engine.abort(r.request_id)


def logprob_pairs(call: Call, index: int, prompt: list | None, generated: list[TokenLogprob]) -> list[tuple]:
    """(token id, log-probs) pairs of a completion choice: the echoed prompt first (its first token: None)."""
    pairs: list[tuple[int, TokenLogprob | None]] = []
    if prompt is not None:
        pairs.append((call.prompt_ids(index)[0], None))
        pairs += [(e.token_id, e) for e in prompt[1:]]
    return pairs + [(e.token_id, e) for e in generated]


async def next_output(call: Call) -> tuple[int, RequestOutput] | None:
    """The next engine output, or None once the client has gone away (checked every 0.25 s)."""
    state = call.http.state
    while True:
        now = time.monotonic()
        if now - getattr(state, "checked", 0.0) > DISCONNECT_POLL_S:
            state.checked = now
            if await call.http.is_disconnected():
                return None
        try:
            return await asyncio.wait_for(call.queue.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            pass


def whole_choice(call: Call, i: int, text: str, out: RequestOutput, prompt_lps, lps) -> dict[str, Any]:
    if call.chat:
        body_lps = chat_logprobs(lps, call.token_text) if call.logprobs else None
        if call.reasoning is None:
            return choice(i, text, out.finish_reason, True, body_lps)
        tags, in_think = call.reasoning
        reasoning, content = split_reasoning(text, in_think, tags)
        return choice(i, content, out.finish_reason, True, body_lps, reasoning=reasoning)
    if call.echo is not None:
        text = call.echo[i // call.n] + text
    body_lps = None
    if call.logprobs:
        body_lps, _ = completion_logprobs(logprob_pairs(call, i, prompt_lps, lps), call.token_text, 0)
    return choice(i, text, out.finish_reason, False, body_lps)


async def collect(call: Call):
    """The whole JSON response (499 when the client left before it was ready)."""
    count = len(call.reqs)
    texts, lps, prompt_lps = [""] * count, [[] for _ in range(count)], [None] * count
    final: dict[int, RequestOutput] = {}
    try:
        while len(final) < count:
            item = await next_output(call)
            if item is None:
                return JSONResponse({}, status_code=499)  # nobody is listening any more
            index, out = item
            texts[index] += out.text
            lps[index] += out.logprobs or []
            if out.prompt_logprobs is not None:
                prompt_lps[index] = out.prompt_logprobs
            if out.finished:
                final[index] = out
    finally:  # frees the slots of a client that left
        call.abort_unfinished(final)
    failed = [o for o in final.values() if o.finish_reason in ("error", "abort")]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error or failed[0].finish_reason}", type="server_error")
    def shape() -> list[dict[str, Any]]:
        return [whole_choice(call, i, texts[i], final[i], prompt_lps[i], lps[i]) for i in range(count)]
    choices = await asyncio.to_thread(shape) if call.logprobs else shape()
    return {**call.head, "object": "chat.completion" if call.chat else "text_completion", "choices": choices,
            "usage": call.usage(final)}


class ChoiceStream:
    """Turns one choice's engine outputs into stream-chunk choices (text, log-probs, reasoning deltas)."""

    def __init__(self, call: Call, index: int) -> None:
        self.call, self.index, self.offset, self.echoed = call, index, 0, False
        self.split = ReasoningStream(call.reasoning[1], call.reasoning[0]) if call.reasoning else None

    def chunk(self, out: RequestOutput) -> dict[str, Any] | None:
        """The chunk choice for `out`, or None when it carries nothing to send yet."""
        call, reason = self.call, out.finish_reason if out.finished else None
        if call.chat:
            body = chat_logprobs(out.logprobs, call.token_text) if call.logprobs and out.logprobs else None
            reasoning, content = self.split.feed(out.text) if self.split else ("", out.text)
            if out.finished and self.split:
                tail = self.split.finish()
                reasoning, content = reasoning + tail[0], content + tail[1]
            if reasoning or content or body or out.finished:
                return chunk_choice(self.index, content, reason, True, body, reasoning=reasoning)
            return None
        text, body = out.text, None
        if call.echo is not None and not self.echoed:
            text, self.echoed = call.echo[self.index // call.n] + text, True
        if call.logprobs:
            prompt = out.prompt_logprobs if call.echo is not None else None
            pairs = logprob_pairs(call, self.index, prompt, out.logprobs or [])
            body, self.offset = completion_logprobs(pairs, call.token_text, self.offset)
        if text or out.finished or (body and body["tokens"]):
            return chunk_choice(self.index, text, reason, False, body)
        return None


async def stream(call: Call, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: the chunks of every choice, the finish reasons, usage if asked, [DONE].
    A choice that fails sends an error event; the others go on."""
    obj = "chat.completion.chunk" if call.chat else "text_completion"
    final: dict[int, RequestOutput] = {}
    shapers = [ChoiceStream(call, i) for i in range(len(call.reqs))]

    def event(choices: list[dict], **extra: Any) -> str:
        return sse({**call.head, "object": obj, "choices": choices, **extra})

    try:
        if call.chat:
            yield event(role_chunk_choices(len(call.reqs)))
        while len(final) < len(call.reqs):
            item = await next_output(call)
            if item is None:
                return
            index, out = item
            if out.finished:
                final[index] = out
            if out.finish_reason == "error":
                yield sse(error_body(f"generation failed: {out.error}", "server_error"))
                continue
            shaper = shapers[index]
            piece = await asyncio.to_thread(shaper.chunk, out) if call.logprobs else shaper.chunk(out)
            if piece is not None:
                yield event([piece])
        if include_usage:
            yield event([], usage=call.usage(final))
        yield sse("[DONE]")
    finally:  # the client went away (or the server stops): free the slots of what is unfinished
        call.abort_unfinished(final)
