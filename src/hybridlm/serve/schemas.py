"""The OpenAI request bodies (pydantic, strict): what the server validates and what `/openapi.json` documents.

Fields we do not use (``user``, ``metadata``, ...) are ignored; fields whose meaning we do
not implement (``presence_penalty``, ``logit_bias``, ``best_of`` > 1, ...) are refused by the
routes with a 400 (docs/serving.md lists each). Validation is strict: ``"5"`` is not an
integer and ``1`` is not a boolean, exactly as the published schema says.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .errors import APIError
from .sampling import MAX_LOGPROBS

INT64_MAX = (1 << 63) - 1
INT64 = dict(ge=-(1 << 63), le=INT64_MAX)
MAX_N = 8                     # completions per prompt (`n`) at most
MAX_STOPS, MAX_STOP_CHARS = 16, 512   # stop strings are matched on the engine thread: bounded
StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]
# "x-limit" marks bounds that depend on the served model: /openapi.json documents them as the
# vocabulary size, the context length or the requests the server holds at once (`serve.api`).
VOCAB, CONTEXT, CAPACITY = ({"x-limit": k} for k in ("vocab", "context", "capacity"))
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX, json_schema_extra=VOCAB)]
Tokens = Annotated[list[TokenId], Field(min_length=1, json_schema_extra=CONTEXT)]


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None   # accepted, ignored


class CommonBody(Body):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: int | None = Field(None, ge=0, le=INT64_MAX, json_schema_extra=CONTEXT)
    temperature: float | None = Field(None, ge=0, le=2)   # below 1e-5: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=INT64_MAX)  # extension (as in vLLM); -1 / 0: off
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOPS)] | None = None
    seed: int | None = Field(None, **INT64)
    presence_penalty: float | None = Field(None, ge=0, le=0, description="not supported: only 0")
    frequency_penalty: float | None = Field(None, ge=0, le=0, description="not supported: only 0")
    logit_bias: dict[str, float] | None = Field(None, max_length=0, description="not supported: only {}")
    user: str | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionBody(CommonBody):
    prompt: str | Annotated[list[str], Field(min_length=1, json_schema_extra=CAPACITY)] | Tokens \
        | Annotated[list[Tokens], Field(min_length=1, json_schema_extra=CAPACITY)]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1, le=1, description="not supported: only 1")
    suffix: str | None = Field(None, max_length=0, description="not supported: only empty")


class TextPart(Body):
    """One content part; only text parts are understood (images etc. are refused with a 400)."""
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart] | None = None
    reasoning_content: str | None = None       # an earlier assistant turn's thinking (vLLM's field)


class ChatBody(CommonBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT64_MAX, json_schema_extra=CONTEXT)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT64_MAX, json_schema_extra=CONTEXT)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # used when logprobs is true
    thinking_budget: int | None = Field(None, ge=0, le=INT64_MAX)  # extension: tokens of <think> at most
    chat_template_kwargs: dict[str, Any] | None = None  # extension (vLLM): extra template variables


class TokenizeCompletionBody(Body):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True    # accepted; our tokenizers add none
    return_token_strs: bool = False


class TokenizeChatBody(Body):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


TokenizeBody = Union[TokenizeCompletionBody, TokenizeChatBody]


class DetokenizeBody(Body):
    model: str | None = None
    tokens: list[TokenId]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every error response."""
    error: ErrorDetail


def _union_tag(part: Any) -> bool:
    """pydantic names a union member in an error location by its type ('str', 'list[int]', ...)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "dict", "list", "none"))


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """(message, param) of the most telling problem pydantic found: for a union (``prompt``,
    ``content``), the deepest constraint that failed rather than "not a string"."""
    def path(e: dict) -> list:
        return [p for p in e.get("loc", ()) if not _union_tag(p)]
    errors = err.errors()
    deepest = max(len(path(e)) for e in errors)
    candidates = [e for e in errors if len(path(e)) == deepest]
    first = next((e for e in candidates if not e.get("type", "").endswith("_type")), candidates[0])
    param = ".".join(str(p) for p in path(first)) or None
    if first.get("type") == "missing":
        return f"missing required field '{param}'", param
    return f"invalid value for '{param}': {first.get('msg', 'invalid value')}", param


# Fields whose meaning is not implemented: the schema allows only their neutral value, and any
# other value gets this 400 (checked before the schema, for a clearer message).
UNSUPPORTED = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logit_bias": ({}, None),
               "best_of": (1, None), "suffix": ("", None)}


def refuse_unsupported(data: dict[str, Any]) -> None:
    for name, neutral in UNSUPPORTED.items():
        if name in data and not any(data[name] == v and type(data[name]) is type(v) for v in neutral):
            raise APIError(400, f"{name} is not supported (only {neutral[0]!r} or null)", param=name,
                           code="unsupported_parameter")


def parse_body(schema: Any, data: Any) -> Any:
    """`data` validated as `schema` (a model class or a union); a 400 naming the first bad field."""
    try:
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return schema.model_validate(data)
        return TypeAdapter(schema).validate_python(data)
    except ValidationError as e:
        message, param = validation_message(e)
        raise APIError(400, message, param=param) from None
