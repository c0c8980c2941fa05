"""OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

Endpoints

* ``POST /v1/completions`` and ``POST /v1/chat/completions``: JSON, or with
  ``"stream": true`` server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``);
* ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``.

Every error is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``:
400 malformed JSON / missing or invalid fields / prompt beyond the context limit,
404 unknown model or route, 405 wrong method, 413 body over ``max_request_bytes``,
429 queue full (``max_batch`` running + ``max_queue`` waiting), 500 generation failed.
A client that disconnects, mid-stream or while waiting for a JSON answer, has its
requests aborted: their slots are free at the next engine step.

Chat template (for base models, which know no chat format): each message becomes
``"{Role}: {content}\\n\\n"`` (System / User / Assistant), then ``"Assistant:"`` is
appended; generation also stops at ``"\\nUser:"`` and ``"\\nSystem:"``.

The engine runs in its own thread (started and stopped with the app); request handlers
only tokenize, queue and relay, so the server keeps answering while the model works.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, QueueFull, Request, RequestOutput
from .generation import SamplingParams

log = logging.getLogger(__name__)

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = ["\nUser:", "\nSystem:"]


@dataclass
class ServerSettings:
    model_name: str = "hybridlm"
    max_request_bytes: int = 1 << 20   # larger bodies get 413
    default_max_tokens: int = 256      # chat requests without max_tokens (capped by the context left)
    max_n: int = 8                     # completions per prompt (`n`) at most


# ---- errors --------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ---- request bodies ----------------------------------------------------------------------
class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # fields we do not use (user, metadata, ...) are ignored

    model: str
    max_tokens: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = None                   # extension (as in vLLM); None / -1 / 0: off
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None


class CompletionBody(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


def _validation_message(err: ValidationError) -> tuple[str, str | None]:
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return f"missing required field '{param}'", param
    return f"invalid value for '{param}': {msg}", param


# ---- the app --------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app; it starts the engine thread on startup and stops it on shutdown."""
    settings = settings or ServerSettings()
    if tokenizer.vocab_size > engine.model.cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{engine.model.cfg.vocab_size}")
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="hybridlm", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.type, err.param, err.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), kind)

    @app.exception_handler(Exception)
    async def _internal(_: HTTPRequest, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}", "server_error")

    def model_card() -> dict[str, Any]:
        return {"id": settings.model_name, "object": "model", "created": created, "owned_by": "hybridlm",
                "max_model_len": engine.max_model_len}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": settings.model_name, "running": engine.num_running,
                "waiting": engine.num_waiting, "max_batch": engine.max_batch, "max_queue": engine.max_queue}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id)
        return model_card()

    def check_model(name: str) -> None:
        if name != settings.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves "
                                f"'{settings.model_name}'", param="model", code="model_not_found")

    async def read_body(request: HTTPRequest, schema: type[BaseModel]) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_request_bytes:
            raise APIError(413, f"request body of {length} bytes exceeds the limit of "
                                f"{settings.max_request_bytes} bytes", code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > settings.max_request_bytes:
                raise APIError(413, f"request body exceeds the limit of {settings.max_request_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object", code="invalid_json")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param=param) from None

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body: CompletionBody = await read_body(request, CompletionBody)
        check_model(body.model)
        if body.echo or body.best_of not in (None, 1) or body.suffix or body.logprobs not in (None, 0):
            raise APIError(400, "echo, best_of, suffix and logprobs are not supported")
        prompts = encode_prompts(body.prompt)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        return await run(request, body, prompts, max_tokens, list_of(body.stop), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body: ChatBody = await read_body(request, ChatBody)
        check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")
        prompt = tokenizer.encode(chat_prompt(body.messages))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = max(1, min(settings.default_max_tokens, engine.max_model_len - len(prompt)))
        return await run(request, body, [prompt], max_tokens, list_of(body.stop) + CHAT_STOP, chat=True)

    def encode_prompts(prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [tokenizer.encode(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [tokenizer.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
        vocab = engine.model.cfg.vocab_size
        for p in prompts:
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
        return [p or start_token() for p in prompts]

    def start_token() -> list[int]:
        """An empty prompt starts a document: the EOS / separator token."""
        eos = getattr(tokenizer, "eos_id", None)
        if eos is None:
            raise APIError(400, "prompt is empty", param="prompt")
        return [eos]

    def check_request(body: _Common, max_tokens: int, prompts: list[list[int]]) -> None:
        """The sampling fields and every prompt's context length (once per HTTP request)."""
        if max_tokens < 1:
            raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        for prompt_len in map(len, prompts):
            if prompt_len + max_tokens > engine.max_model_len:
                raise APIError(400, f"This model's maximum context length is {engine.max_model_len} tokens. "
                                    f"However, you requested {prompt_len + max_tokens} tokens ({prompt_len} in "
                                    f"the prompt, {max_tokens} for the completion). Please reduce the prompt or "
                                    f"max_tokens.", param="messages" if isinstance(body, ChatBody) else "prompt",
                               code="context_length_exceeded")
        if body.n > settings.max_n:
            raise APIError(400, f"n must be at most {settings.max_n}, got {body.n}", param="n")
        if body.presence_penalty or body.frequency_penalty or body.logit_bias:
            raise APIError(400, "presence_penalty, frequency_penalty and logit_bias are not supported")
        if body.top_k is not None and body.top_k < -1:
            raise APIError(400, f"top_k must be -1 (off) or >= 1, got {body.top_k}", param="top_k")

    def sampling(body: _Common, max_tokens: int, index: int) -> SamplingParams:
        seed = None if body.seed is None else body.seed + index
        return SamplingParams(max_new_tokens=max_tokens,
                              temperature=1.0 if body.temperature is None else body.temperature,
                              top_k=body.top_k if body.top_k and body.top_k > 0 else None,
                              top_p=body.top_p, seed=seed, eos_id=getattr(tokenizer, "eos_id", None))

    async def run(request: HTTPRequest, body: _Common, prompts: list[list[int]], max_tokens: int,
                  stop: list[str], chat: bool):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        check_request(body, max_tokens, prompts)
        reqs: list[Request] = []
        for i, prompt in enumerate(prompts):
            for j in range(body.n):
                index = i * body.n + j
                params = sampling(body, max_tokens, index)

                def deliver(out: RequestOutput, index: int = index) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (index, out))
                reqs.append(Request(prompt, params, stop, on_output=deliver))
        submitted: list[str] = []
        try:
            for r in reqs:
                submitted.append(engine.submit(r))
        except QueueFull as e:
            for rid in submitted:
                engine.abort(rid)
            raise APIError(429, f"server is busy: {e}", type="rate_limit_error", code="queue_full") from None
        except ValueError as e:
            for rid in submitted:
                engine.abort(rid)
            raise APIError(400, str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        head = {"id": rid, "created": int(time.time()), "model": settings.model_name}
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(request, queue, reqs, head, chat, include_usage, body.n),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await collect(request, queue, reqs, head, chat, body.n)

    async def next_output(request: HTTPRequest, queue: asyncio.Queue) -> tuple[int, RequestOutput] | None:
        """The next engine output, or None once the client has gone away (checked every 0.25 s)."""
        state = request.state
        while True:
            now = time.monotonic()
            if now - getattr(state, "checked", 0.0) > 0.25:
                state.checked = now
                if await request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.25)
            except asyncio.TimeoutError:
                pass

    async def collect(request: HTTPRequest, queue: asyncio.Queue, reqs: list[Request], head: dict, chat: bool,
                      n: int):
        texts = [""] * len(reqs)
        final: dict[int, RequestOutput] = {}
        try:
            while len(final) < len(reqs):
                item = await next_output(request, queue)
                if item is None:
                    return JSONResponse({}, status_code=499)  # nobody is listening any more
                index, out = item
                texts[index] += out.text
                if out.finished:
                    final[index] = out
        finally:  # frees the slots of a client that left
            for i, r in enumerate(reqs):
                if i not in final:
                    engine.abort(r.request_id)
        failed = [o for o in final.values() if o.finish_reason in ("error", "abort")]
        if failed:
            raise APIError(500, f"generation failed: {failed[0].error or failed[0].finish_reason}",
                           type="server_error")
        choices = []
        for i in range(len(reqs)):
            reason = final[i].finish_reason
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]},
                                "logprobs": None, "finish_reason": reason})
            else:
                choices.append({"index": i, "text": texts[i], "logprobs": None, "finish_reason": reason})
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": usage(reqs, final, n)}

    async def stream(request: HTTPRequest, queue: asyncio.Queue, reqs: list[Request], head: dict,
                     chat: bool, include_usage: bool, n: int) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        final: dict[int, RequestOutput] = {}

        def event(choices: list[dict], **extra: Any) -> str:
            return f"data: {json.dumps({**head, 'object': obj, 'choices': choices, **extra})}\n\n"

        try:
            if chat:
                yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(reqs))])
            while len(final) < len(reqs):
                item = await next_output(request, queue)
                if item is None:
                    return
                index, out = item
                if out.finished:
                    final[index] = out
                if out.finish_reason == "error":
                    err = {"message": f"generation failed: {out.error}", "type": "server_error",
                           "param": None, "code": None}
                    yield f"data: {json.dumps({'error': err})}\n\n"
                    continue
                if not out.text and not out.finished:
                    continue
                reason = out.finish_reason if out.finished else None
                if chat:
                    delta = {"content": out.text} if out.text else {}
                    yield event([{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}])
                else:
                    yield event([{"index": index, "text": out.text, "logprobs": None, "finish_reason": reason}])
            if include_usage:
                yield event([], usage=usage(reqs, final, n))
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or the server stops): free the slots of what is unfinished
            for i, r in enumerate(reqs):
                if i not in final:
                    engine.abort(r.request_id)

    def usage(reqs: list[Request], final: dict[int, RequestOutput], n: int) -> dict[str, int]:
        prompt = sum(len(r.prompt_ids) for r in reqs[::n])  # each prompt once, however many completions
        completion = sum(o.completion_tokens for o in final.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    return app


def list_of(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def chat_prompt(messages: list[ChatMessage]) -> str:
    """The documented plain-text chat template (see the module docstring)."""
    parts = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):  # OpenAI content parts: only text parts are understood
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages.{i}.content")
                texts.append(part["text"])
            content = "".join(texts)
        role = CHAT_ROLES.get(m.role, "System")  # "developer" is OpenAI's new name for system
        parts.append(f"{role}: {content or ''}\n\n")
    return "".join(parts) + "Assistant:"


# ---- running it ------------------------------------------------------------------------------
def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted (Ctrl-C)."""
    import uvicorn
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


class BackgroundServer:
    """uvicorn serving `app` on host:port (0 = a free port) in a thread; a context manager.

        with BackgroundServer(app) as srv:
            httpx.get(srv.url + "/health")
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
