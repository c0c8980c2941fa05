"""The OpenAI protocol shapes: request bodies (pydantic), errors, and the response / stream chunk bodies.

Every error is OpenAI-shaped, ``{"error": {"message", "type", "param", "code"}}``.
Request fields we do not use (``user``, ``metadata``, ...) are ignored; fields whose
meaning we do not implement are refused by the routes with a 400.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .engine import RequestOutput


# ---- errors ---------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(status: int, message: str, type: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status)


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """(message, param) of the first problem pydantic found."""
    first = err.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ())) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "missing":
        return f"missing required field '{param}'", param
    return f"invalid value for '{param}': {msg}", param


# ---- request bodies -------------------------------------------------------------------------
class CommonBody(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

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

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionBody(CommonBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]] | None = None


class ChatBody(CommonBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None


# ---- response bodies ------------------------------------------------------------------------
def choice(index: int, text: str, finish_reason: str | None, chat: bool) -> dict[str, Any]:
    """One entry of a non-streamed response's `choices`."""
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def chunk_choice(index: int, text: str, finish_reason: str | None, chat: bool) -> dict[str, Any]:
    """One entry of a stream chunk's `choices` (chat: a `delta`, empty when there is no new text)."""
    if chat:
        return {"index": index, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


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
    """One server-sent event line: ``data: {json}`` (or a literal such as ``[DONE]``)."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
