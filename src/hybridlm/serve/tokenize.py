"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes.

/tokenize takes ``{"prompt": str}`` or ``{"messages": [...], "add_generation_prompt": bool}``
(rendered with the same chat template as /v1/chat/completions) and answers
``{"count", "max_model_len", "tokens", "token_strs"}``; /detokenize takes ``{"tokens": [ids]}``
and answers ``{"prompt": text}``. ``model`` is optional; when given it must be the served one.
Both do their tokenizer work in a worker thread. ``GET /tokenizer_info`` (vLLM's) names the
special tokens and the chat template, so clients such as lm-evaluation-harness can
tokenize through the server with no local copy of the tokenizer.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request as HTTPRequest

from .chat import chat_prompt, render_chat, template_messages
from .errors import APIError
from .routes import OpenAIRoutes
from .schemas import DetokenizeBody, TokenizeBody, TokenizeChatBody

PLAIN_GENERATION_PROMPT = "Assistant:"


def chat_text(routes: OpenAIRoutes, body: TokenizeChatBody) -> str:
    """The prompt text of a chat, with or without the generation prompt."""
    template = getattr(routes.tokenizer, "chat_template", None)
    kwargs = body.chat_template_kwargs or {}
    if body.add_generation_prompt:
        return render_chat(body.messages, template, **kwargs)
    if template is None:
        return chat_prompt(body.messages).removesuffix(PLAIN_GENERATION_PROMPT)
    try:
        return template.render(template_messages(body.messages), add_generation_prompt=False, **kwargs)
    except (ValueError, TypeError) as err:  # ChatTemplateError, or a clash with a reserved variable
        raise APIError(400, f"could not apply the chat template: {err}", param="messages") from None


def encode(routes: OpenAIRoutes, text: str, with_strs: bool) -> tuple[list[int], list[str] | None]:
    """The token ids of `text`, and each token's text when asked (a worker thread calls this)."""
    ids = routes.tokenizer.encode(text)
    return ids, [routes.token_text(t) for t in ids] if with_strs else None


async def tokenize(routes: OpenAIRoutes, request: HTTPRequest) -> dict[str, Any]:
    body = await routes.read(request, TokenizeBody)
    routes.check_model(body.model)
    if isinstance(body, TokenizeChatBody):
        text = await asyncio.to_thread(chat_text, routes, body)
    else:
        text = body.prompt
    ids, strs = await asyncio.to_thread(encode, routes, text, body.return_token_strs)
    return {"count": len(ids), "max_model_len": routes.engine.max_model_len, "tokens": ids, "token_strs": strs}


async def detokenize(routes: OpenAIRoutes, request: HTTPRequest) -> dict[str, Any]:
    body = await routes.read(request, DetokenizeBody)
    routes.check_model(body.model)
    vocab = routes.tokenizer.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
    return {"prompt": await asyncio.to_thread(routes.tokenizer.decode, body.tokens)}


def tokenizer_info(routes: OpenAIRoutes) -> dict[str, Any]:
    tok = routes.tokenizer
    template = getattr(tok, "chat_template", None)
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": getattr(tok, "eos_token", None),
            "bos_token": template.bos_token if template is not None else None, "pad_token": None,
            "chat_template": template.source if template is not None else None,
            "model_max_length": routes.engine.max_model_len, "vocab_size": tok.vocab_size}
