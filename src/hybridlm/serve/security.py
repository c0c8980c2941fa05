"""Who may call the server: a Bearer API key, CORS origins, and a `/docs` page with no outside assets.

* `--api-key` (or ``HYBRIDLM_API_KEY``): every route except ``/health``, ``/docs`` and
  ``/openapi.json`` needs ``Authorization: Bearer <key>``; otherwise 401 (compared in
  constant time).
* `--allowed-origins`: CORS for those browser origins (``*`` for any); off by default,
  so browsers refuse to let other sites' pages read the answers.
* `/docs`: a small self-contained HTML page that lists the operations of ``/openapi.json``;
  it loads nothing from outside the machine (FastAPI's Swagger UI page would fetch its
  scripts from a CDN).
"""

from __future__ import annotations

import hmac
import os

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from starlette.middleware.cors import CORSMiddleware

from .errors import SafeJSONResponse, error_body

API_KEY_ENV = "HYBRIDLM_API_KEY"
OPEN_PATHS = ("/health", "/docs", "/openapi.json")


def api_key_from(flag: str | None) -> str | None:
    """The key from the flag, else from the environment, else None (no authentication)."""
    key = flag if flag is not None else os.environ.get(API_KEY_ENV)
    return key or None


class BearerAuth:
    """ASGI middleware: 401 unless the request carries ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        body = error_body("Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                          code="invalid_api_key")
        await SafeJSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)


def secure(app: FastAPI, api_key: str | None, allowed_origins: list[str] | None) -> None:
    """Add the API-key check and, when origins are given, CORS (outermost, so preflights pass)."""
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>hybridlm API</title>
<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}pre{background:#f4f4f4;padding:.5em;
overflow:auto;font-size:.8em}h2{font-size:1.1em;margin-top:1.5em}</style></head>
<body><h1>hybridlm: OpenAI-compatible API</h1>
<p>The machine-readable schema is <a href="openapi.json">openapi.json</a>. Operations:</p>
<div id="ops">loading...</div>
<script>
fetch("openapi.json").then(r => r.json()).then(spec => {
  const ops = document.getElementById("ops"); ops.textContent = "";
  for (const [path, item] of Object.entries(spec.paths)) for (const [method, op] of Object.entries(item)) {
    const h = document.createElement("h2"); h.textContent = method.toUpperCase() + " " + path; ops.append(h);
    const p = document.createElement("p"); p.textContent = op.summary || ""; ops.append(p);
    const body = op.requestBody && op.requestBody.content["application/json"];
    const pre = document.createElement("pre");
    pre.textContent = "responses: " + Object.keys(op.responses).join(", ") +
      (body ? "\\nrequest body: " + JSON.stringify(body.schema, null, 1) : ""); ops.append(pre);
  }
  const s = document.createElement("pre"); s.textContent = "schemas: " +
    JSON.stringify((spec.components || {}).schemas || {}, null, 1); ops.append(s);
});
</script></body></html>
"""


def add_docs_page(app: FastAPI) -> None:
    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(DOCS_PAGE)
