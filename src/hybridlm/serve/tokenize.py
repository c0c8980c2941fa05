"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes.

/tokenize takes ``{"prompt": str}`` or ``{"messages": [...], "add_generation_prompt": bool}``
(rendered with the same chat template as /v1/chat/completions) and answers
``{"count", "max_model_len", "tokens", "token_strs"}``; /detokenize takes ``{"tokens": [ids]}``
and answers ``{"prompt": text}``. ``model`` is optional; when given it must be the served one.
Both do their tokenizer work in a worker thread.
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


async def tokenize(routes: OpenAIRoutes, request: HTTPRequest) -> dict[str, Any]:
    body = await routes.read(request, TokenizeBody)
    routes.check_model(body.model)
    if isinstance(body, TokenizeChatBody):
        text = await asyncio.to_thread(chat_text, routes, body)
    else:
        text = body.prompt
    ids = await asyncio.to_thread(routes.tokenizer.encode, text)
    strs = [routes.token_text(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": routes.engine.max_model_len, "tokens": ids, "token_strs": strs}


async def detokenize(routes: OpenAIRoutes, request: HTTPRequest) -> dict[str, Any]:
    body = await routes.read(request, DetokenizeBody)
    routes.check_model(body.model)
    vocab = routes.tokenizer.vocab_size
    if any(t >= vocab for t in body.tokens):
        raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens")
    return {"prompt": await asyncio.to_thread(routes.tokenizer.decode, body.tokens)}
