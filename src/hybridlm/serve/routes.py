"""The OpenAI-compatible endpoints: parse and check a request, queue it on the engine, relay its outputs.

* ``POST /v1/completions`` and ``POST /v1/chat/completions``: JSON, or with
  ``"stream": true`` server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``);
* ``POST /tokenize``, ``POST /detokenize`` (vLLM's shapes);
* ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``.

Status codes: 400 malformed JSON / invalid or unsupported fields / beyond the context
limit / more completions than the server can ever hold, 401 missing API key, 404 unknown
model, 413 body over ``max_request_bytes``, 415 not JSON, 429 queue full (retry later),
500 generation failed. Tokenizing, rendering the chat template and the token texts of
log-probs run in worker threads, never on the event loop; the engine thread does the model
work and the detokenizing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse

from .body import read_json_body
from .chat import chat_stop, render_chat
from .engine import Engine, QueueFull, Request
from .errors import APIError
from .reasoning import Tags, opens_thinking
from .relay import Call, collect, stream
from .sampling import SamplingParams
from .schemas import ChatBody, CommonBody, CompletionBody, parse_body, refuse_unsupported

NO_THINK = "/no_think"
# Error codes of the rules that involve several fields, which JSON Schema cannot state:
# context_length_exceeded (prompt + max_tokens), too_many_completions (prompts x n), and this one.
INVALID_COMBINATION = "invalid_combination"


@dataclass
class ServerSettings:
    model_name: str = "hybridlm"
    max_request_bytes: int = 1 << 20   # larger bodies get 413
    default_max_tokens: int = 256      # chat requests without max_tokens (capped by the context left)
    reasoning_tags: Tags | None = None  # --reasoning-parser: split <think> text into reasoning_content
    api_key: str | None = None         # Bearer token every route but /health, /docs, /openapi.json needs
    allowed_origins: list[str] | None = None  # CORS origins (None: no CORS)


class OpenAIRoutes:
    """The endpoint handlers over one engine and tokenizer (`add_routes` attaches them to an app)."""

    def __init__(self, engine: Engine, tokenizer, settings: ServerSettings) -> None:
        self.engine, self.tokenizer, self.settings = engine, tokenizer, settings
        self.created = int(time.time())
        self.token_text = lru_cache(maxsize=1 << 16)(lambda t: tokenizer.decode([t]))

    # ---- models and health ----------------------------------------------------------------
    def model_card(self) -> dict[str, Any]:
        return {"id": self.settings.model_name, "object": "model", "created": self.created,
                "owned_by": "hybridlm", "max_model_len": self.engine.max_model_len}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{self.settings.model_name}'", param="model", code="model_not_found")

    def health(self) -> dict[str, Any]:
        e = self.engine
        return {"status": "ok", "model": self.settings.model_name, "running": e.num_running,
                "waiting": e.num_waiting, "max_batch": e.max_batch, "max_queue": e.max_queue}

    async def read(self, request: HTTPRequest, schema: Any) -> Any:
        data = await read_json_body(request, self.settings.max_request_bytes)
        if schema in (CompletionBody, ChatBody):
            refuse_unsupported(data)
        return parse_body(schema, data)

    # ---- the two generation endpoints ---------------------------------------------------------
    async def completions(self, request: HTTPRequest):
        body: CompletionBody = await self.read(request, CompletionBody)
        self.check_model(body.model)
        check_stream_options(body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise APIError(400, "max_tokens 0 only scores the prompt: it needs echo", param="max_tokens",
                           code=INVALID_COMBINATION)
        prompts = await asyncio.to_thread(self.encode_prompts, body.prompt)
        echo = await asyncio.to_thread(self.prompt_texts, body.prompt, prompts) if body.echo else None
        scoring = body.logprobs if body.echo and body.logprobs is not None else (0 if max_tokens == 0 else None)
        params = dict(logprobs=body.logprobs, prompt_logprobs=scoring)
        call = self.new_call(request, body, prompts, max_tokens, body.stop_list(), False, params)
        call.logprobs, call.echo = body.logprobs is not None, echo
        return await self.respond(call, body)

    async def chat_completions(self, request: HTTPRequest):
        body: ChatBody = await self.read(request, ChatBody)
        self.check_model(body.model)
        check_stream_options(body)
        template = getattr(self.tokenizer, "chat_template", None)
        text = await asyncio.to_thread(render_chat, body.messages, template, **(body.chat_template_kwargs or {}))
        prompt = await asyncio.to_thread(self.tokenizer.encode, text)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(self.settings.default_max_tokens, self.engine.max_model_len - len(prompt)))
        budget = body.thinking_budget
        if budget is None and any(NO_THINK in str(m.content) for m in body.messages if m.role != "assistant"):
            budget = 0  # /no_think: a thinking block the model opens anyway is closed at once
        params = dict(logprobs=(body.top_logprobs or 0) if body.logprobs else None, thinking_budget=budget)
        call = self.new_call(request, body, [prompt], max_tokens, body.stop_list() + chat_stop(template), True, params)
        call.logprobs = bool(body.logprobs)
        if self.settings.reasoning_tags is not None:
            call.reasoning = (self.settings.reasoning_tags, opens_thinking(text, self.settings.reasoning_tags))
        return await self.respond(call, body)

    # ---- prompts ----------------------------------------------------------------------------
    def encode_prompts(self, prompt: Any) -> list[list[int]]:
        """Token ids of each prompt: a string, a list of strings, token ids or lists of token ids."""
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif all(isinstance(p, str) for p in prompt):
            prompts = self.tokenizer.encode_batch(prompt)
        elif all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        vocab = self.engine.model.cfg.vocab_size
        if any(t >= vocab for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return [p or self.start_token() for p in prompts]

    def prompt_texts(self, prompt: Any, ids: list[list[int]]) -> list[str]:
        """Each prompt's text (echo): the string sent, or the decoded token ids."""
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        return [self.tokenizer.decode(i) for i in ids]

    def start_token(self) -> list[int]:
        """An empty prompt starts a document: the EOS / separator token."""
        eos = getattr(self.tokenizer, "eos_id", None)
        if eos is None:
            raise APIError(400, "prompt is empty", param="prompt")
        return [eos]

    # ---- checking and queueing -----------------------------------------------------------------
    def check_request(self, body: CommonBody, max_tokens: int, prompts: list[list[int]]) -> None:
        """Every prompt's context length, and that the request could ever fit the server."""
        limit = self.engine.max_model_len
        for prompt_len in map(len, prompts):
            if prompt_len + max_tokens > limit:
                raise APIError(400, f"This model's maximum context length is {limit} tokens. "
                                    f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in "
                                    f"the prompt, {max_tokens} for the completion). Please reduce the prompt or "
                                    f"max_tokens.", param="messages" if isinstance(body, ChatBody) else "prompt",
                               code="context_length_exceeded")
        capacity = self.engine.max_batch + self.engine.max_queue
        if len(prompts) * body.n > capacity:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} completions exceed the {capacity} requests "
                                f"this server holds at once (max_batch + max_queue); send fewer per request",
                           param="prompt" if len(prompts) > 1 else "n", code="too_many_completions")

    def sampling(self, body: CommonBody, max_tokens: int, index: int, extra: dict) -> SamplingParams:
        """The engine's params for completion `index` (a seed gives each completion seed + index)."""
        seed = None if body.seed is None else body.seed + index
        return SamplingParams(max_new_tokens=max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                              top_p=body.top_p, seed=seed, eos_id=getattr(self.tokenizer, "eos_id", None), **extra)

    def new_call(self, http: HTTPRequest, body: CommonBody, prompts: list[list[int]], max_tokens: int,
                 stop: list[str], chat: bool, extra: dict) -> Call:
        """Queue `n` completions of every prompt (all or none) and return the call that relays them."""
        self.check_request(body, max_tokens, prompts)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "created": int(time.time()), "model": self.settings.model_name}
        call = Call(http, self.engine, [], head, chat, body.n, self.token_text)
        loop = asyncio.get_running_loop()
        for index in range(len(prompts) * body.n):
            def deliver(out, index: int = index) -> None:
                loop.call_soon_threadsafe(call.queue.put_nowait, (index, out))
            call.reqs.append(Request(prompts[index // body.n], self.sampling(body, max_tokens, index, extra), stop,
                                     on_output=deliver))
        self.submit_all(call.reqs)
        return call

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
                raise APIError(429, f"server is busy: {e}", type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": "1"}) from None
            raise APIError(400, str(e)) from None

    @staticmethod
    async def respond(call: Call, body: CommonBody):
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(stream(call, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await collect(call)


def check_stream_options(body: CommonBody) -> None:
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options",
                       code=INVALID_COMBINATION)
