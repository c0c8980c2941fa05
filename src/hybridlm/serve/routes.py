"""The OpenAI-compatible endpoints: parse and check a request, queue it on the engine, relay its outputs.

* ``POST /v1/completions`` and ``POST /v1/chat/completions``: JSON, or with
  ``"stream": true`` server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``);
* ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``.

Status codes: 400 malformed JSON / missing or invalid fields / prompt beyond the context
limit, 404 unknown model, 413 body over ``max_request_bytes``, 429 queue full
(``max_batch`` running + ``max_queue`` waiting), 500 generation failed. A client that
disconnects, mid-stream or while waiting for a JSON answer, has its requests aborted:
their slots are free at the next engine step. Handlers only tokenize, queue and relay;
the engine thread does the model work.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from .chat import CHAT_STOP, chat_prompt
from .engine import Engine, QueueFull, Request, RequestOutput
from .sampling import SamplingParams
from .schemas import (APIError, ChatBody, CommonBody, CompletionBody, choice, chunk_choice, error_body,
                      role_chunk_choices, sse, usage, validation_message)

DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks that its client is still there


@dataclass
class ServerSettings:
    model_name: str = "hybridlm"
    max_request_bytes: int = 1 << 20   # larger bodies get 413
    default_max_tokens: int = 256      # chat requests without max_tokens (capped by the context left)
    max_n: int = 8                     # completions per prompt (`n`) at most


@dataclass
class _Call:
    """One HTTP request in flight: its engine requests (prompt-major, `n` per prompt) and their outputs."""

    http: HTTPRequest
    queue: asyncio.Queue                # (index into reqs, RequestOutput) from the engine thread
    reqs: list[Request]
    head: dict[str, Any]                # id, created, model of every response body / chunk
    chat: bool
    n: int

    def usage(self, final: dict[int, RequestOutput]) -> dict[str, int]:
        return usage([len(r.prompt_ids) for r in self.reqs[::self.n]], final)


class OpenAIRoutes:
    """The endpoint handlers over one engine and tokenizer (`add_routes` attaches them to an app)."""

    def __init__(self, engine: Engine, tokenizer, settings: ServerSettings) -> None:
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.created = int(time.time())

    # ---- models and health ----------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.created,
                "owned_by": "hybridlm", "max_model_len": self.engine.max_model_len}

    def check_model(self, name: str) -> None:
        if name != self.settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{self.settings.model_name}'", param="model", code="model_not_found")

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "ok", "model": self.settings.model_name, "running": e.num_running,
                "waiting": e.num_waiting, "max_batch": e.max_batch, "max_queue": e.max_queue}

    # ---- the two generation endpoints ---------------------------------------------------------
    async def completions(self, request: HTTPRequest):
        body: CompletionBody = await self.read_body(request, CompletionBody)
        self.check_model(body.model)
        if body.echo or body.best_of not in (None, 1) or body.suffix or body.logprobs not in (None, 0):
            raise APIError(400, "echo, best_of, suffix and logprobs are not supported")
        prompts = self.encode_prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return await self.run(request, body, prompts, max_tokens, body.stop_list(), chat=False)

    async def chat_completions(self, request: HTTPRequest):
        body: ChatBody = await self.read_body(request, ChatBody)
        self.check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        prompt = self.tokenizer.encode(chat_prompt(body.messages))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(self.settings.default_max_tokens, self.engine.max_model_len - len(prompt)))
        return await self.run(request, body, [prompt], max_tokens, body.stop_list() + CHAT_STOP, chat=True)

    # ---- reading and checking a request ---------------------------------------------------------
    async def read_body(self, request: HTTPRequest, schema: type[BaseModel]) -> Any:
        """The JSON body validated by `schema`; 413 when it is too large, 400 when it is not valid."""
        limit = self.settings.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                           code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            message, param = validation_message(e)
            raise APIError(400, message, param=param) from None

    def encode_prompts(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of strings, token ids or lists of token ids."""
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
        vocab = self.engine.model.cfg.vocab_size
        for p in prompts:
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return [p or self.start_token() for p in prompts]

    def start_token(self) -> list[int]:
        """An empty prompt starts a document: the EOS / separator token."""
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is None:
            raise APIError(400, "prompt is empty", param="prompt")
        return [eos]

    def check_request(self, body: CommonBody, max_tokens: int, prompts: list[list[int]]) -> None:
        """The sampling fields and every prompt's context length (once per HTTP request)."""
        limit = self.engine.max_model_len
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        for prompt_len in map(len, prompts):
            if prompt_len + max_tokens > limit:
                raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                                    f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in "
                                    f"the prompt, {max_tokens} for the completion). Please reduce the prompt or "
                                    f"max_tokens.", param="messages" if isinstance(body, ChatBody) else "prompt",
                               code="context_length_exceeded")
        if body.n > self.settings.max_n:
            raise APIError(400, f"n must be at most {self.settings.max_n}, got {body.n}", param="n")
        if body.presence_penalty or body.frequency_penalty or body.logit_bias:
            raise APIError(400, "presence_penalty, frequency_penalty and logit_bias are not supported")
        if body.top_k is not None and body.top_k < -1:
            raise APIError(400, f"top_k must be -1 (off) or >= 1, got {body.top_k}", param="top_k")

    def sampling(self, body: CommonBody, max_tokens: int, index: int) -> SamplingParams:
        """The engine's params for completion `index` (a seed gives each completion seed + index)."""
        seed = None if body.seed is None else body.seed + index
        return SamplingParams(max_new_tokens=max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                              top_p=body.top_p, seed=seed, eos_id=getattr(self.tokenizer, "eos_id", None))

    # ---- running it ---------------------------------------------------------------------------
    async def run(self, request: HTTPRequest, body: CommonBody, prompts: list[list[int]], max_tokens: int,
                  stop: list[str], chat: bool):
        """Queue `n` completions of every prompt; a JSON response, or a stream of server-sent events."""
        self.check_request(body, max_tokens, prompts)
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        reqs = []
        for index in range(len(prompts) * body.n):
            def deliver(out: RequestOutput, index: int = index) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, (index, out))
            reqs.append(Request(prompts[index // body.n], self.sampling(body, max_tokens, index), stop,
                                on_output=deliver))
        self.submit_all(reqs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        call = _Call(request, queue, reqs, {"id": rid, "created": int(time.time()), "model": self.settings.model_name},
                     chat, body.n)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.stream(call, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.collect(call)

    def submit_all(self, reqs: list[Request]) -> None:
        """Submit every request, or none: 429 when the queue is full, 400 for what the engine refuses."""
        submitted: list[str] = []
        try:
            for r in reqs:
                submitted.append(self.engine.submit(r))
        except (QueueFull, ValueError) as e:
            for rid in submitted:
                self.engine.abort(rid)
            if isinstance(e, QueueFull):
                raise APIError(429, f"server is busy: {e}", type="rate_limit_error", code="queue_full") from None
            raise APIError(400, str(e)) from None

    @staticmethod
    async def next_output(call: _Call) -> tuple[int, RequestOutput] | None:
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

    def abort_unfinished(self, call: _Call, final: dict[int, RequestOutput]) -> None:
        for i, r in enumerate(call.reqs):
            if i not in final:
                self.engine.abort(r.request_id)

    async def collect(self, call: _Call):
        """The whole JSON response (499 when the client left before it was ready)."""
        texts = [""] * len(call.reqs)
        final: dict[int, RequestOutput] = {}
        try:
            while len(final) < len(call.reqs):
                item = await self.next_output(call)
                if item is None:
                    return JSONResponse({}, status_code=499)  # nobody is listening any more
                index, out = item
                texts[index] += out.text
                if out.finished:
                    final[index] = out
        finally:  # frees the slots of a client that left
            self.abort_unfinished(call, final)
        failed = [o for o in final.values() if o.finish_reason in ("error", "abort")]
        if failed:
            raise APIError(500, f"generation failed: {failed[0].error or failed[0].finish_reason}",
                           type="server_error")
        choices = [choice(i, texts[i], final[i].finish_reason, call.chat) for i in range(len(call.reqs))]
        return {**call.head, "object": "chat.completion" if call.chat else "text_completion", "choices": choices,
                "usage": call.usage(final)}

    async def stream(self, call: _Call, include_usage: bool) -> AsyncIterator[str]:
        """Server-sent events: one chunk per piece of text, the finish reasons, usage if asked, [DONE]."""
        obj = "chat.completion.chunk" if call.chat else "text_completion"
        final: dict[int, RequestOutput] = {}

        def event(choices: list[dict], **extra: Any) -> str:
            return sse({**call.head, "object": obj, "choices": choices, **extra})

        try:
            if call.chat:
                yield event(role_chunk_choices(len(call.reqs)))
            while len(final) < len(call.reqs):
                item = await self.next_output(call)
                if item is None:
                    return
                index, out = item
                if out.finished:
                    final[index] = out
                if out.finish_reason == "error":
                    yield sse(error_body(f"generation failed: {out.error}", "server_error"))
                elif out.text or out.finished:
                    reason = out.finish_reason if out.finished else None
                    yield event([chunk_choice(index, out.text, reason, call.chat)])
            if include_usage:
                yield event([], usage=call.usage(final))
            yield sse("[DONE]")
        finally:  # the client went away (or the server stops): free the slots of what is unfinished
            self.abort_unfinished(call, final)


def add_routes(app: FastAPI, routes: OpenAIRoutes) -> None:
    """Attach the endpoints of `routes` to `app`."""

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return routes.health()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [routes.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        routes.check_model(model_id)
        return routes.model_card()

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await routes.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await routes.chat_completions(request)
