"""Every error the server answers, OpenAI-shaped, through one path that cannot raise.

Bodies are ``{"error": {"message", "type", "param", "code"}}``. `APIError` is what the
handlers raise; routing errors (404, 405 with its ``Allow`` header) get the same shape;
anything unexpected becomes a 500 inside `CatchAllErrors`, a plain ASGI middleware, so it
never reaches Starlette's ServerErrorMiddleware, which would re-raise it and make uvicorn
reset the keep-alive connection. Messages are made printable before they are encoded
(a client's lone surrogate cannot break the error path).
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def printable(text: Any) -> str | None:
    """`text` as a string that encodes to UTF-8 (lone surrogates become backslash escapes)."""
    if text is None:
        return None
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": printable(message), "type": type, "param": printable(param), "code": code}}


class SafeJSONResponse(Response):
    """A JSON response rendered with ASCII escapes: any Python string (even a lone surrogate) encodes."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> Response:
    return SafeJSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


INTERNAL_ERROR = error_body("internal server error", "server_error")


class CatchAllErrors:
    """ASGI middleware: an exception that escaped every handler becomes a 500 (if nothing was sent yet)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), printable(scope.get("path")))
            if not started:
                await SafeJSONResponse(INTERNAL_ERROR, status_code=500)(scope, receive, send)


def add_error_handlers(app: FastAPI) -> None:
    """OpenAI-shaped bodies for `APIError` and routing errors; `CatchAllErrors` for the rest."""

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, err: APIError) -> Response:
        return error_response(err.status, err.message, err.type, err.param, err.code, err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: HTTPRequest, err: StarletteHTTPException) -> Response:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error_response(err.status_code, str(err.detail), kind, headers=dict(err.headers or {}))

    app.add_middleware(CatchAllErrors)
