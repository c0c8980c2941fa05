"""The routes of the app and the OpenAPI document that describes them as they really are.

The handlers read their bodies themselves (media type, size, strict JSON, then the
pydantic model), so the request bodies are added to `/openapi.json` here from the same
models, with every status a route can answer (errors in the `ErrorBody` shape), `model` as the
one served name, and the Bearer scheme when an API key is set; FastAPI's generic 422 entries are removed, since
every validation error is a 400.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.openapi.utils import get_openapi
from pydantic import TypeAdapter

from .routes import OpenAIRoutes
from .schemas import ChatBody, CompletionBody, DetokenizeBody, ErrorBody, TokenizeBody
from .tokenize import detokenize, tokenize, tokenizer_info

ERRORS = {400: "invalid request", 404: "unknown model", 413: "body too large", 415: "body not JSON",
          429: "queue full, retry later", 500: "generation failed"}
# With stream: true, server-sent events; in OpenAPI 3.1 the schema describes one event.
SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a JSON chunk, an {\"error\": ...} object, or [DONE]"},
    "event": {"type": "string"}}}
STREAM_OK = {200: {"description": "JSON, or with stream: true server-sent events",
                   "content": {"text/event-stream": {"schema": SSE_EVENT}}}}
BODIES = {("/v1/completions", "post"): CompletionBody, ("/v1/chat/completions", "post"): ChatBody,
          ("/tokenize", "post"): TokenizeBody, ("/detokenize", "post"): DetokenizeBody}


def errors(*codes: int, auth: bool) -> dict[int | str, dict[str, Any]]:
    picked = {c: {"model": ErrorBody, "description": ERRORS[c]} for c in codes}
    if auth:
        picked[401] = {"model": ErrorBody, "description": "missing or wrong API key"}
    return picked


def add_routes(app: FastAPI, routes: OpenAIRoutes) -> None:
    """Attach the endpoints of `routes` to `app`, and the OpenAPI document."""
    auth = bool(routes.settings.api_key)  # as `secure`: an empty key is no key
    post = (400, 404, 413, 415)

    @app.get("/health", summary="liveness and load")
    async def health() -> dict[str, Any]:
        return routes.health()

    @app.get("/v1/models", summary="the served model", responses=errors(auth=auth))
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [routes.model_card()]}

    @app.get("/v1/models/{model_id:path}", summary="one model", responses=errors(404, auth=auth))
    async def model(model_id: str) -> dict[str, Any]:
        routes.check_model(model_id)
        return routes.model_card()

    @app.post("/v1/completions", summary="text completion", responses={**STREAM_OK, **errors(*post, 429, 500, auth=auth)})
    async def completions(request: HTTPRequest):
        return await routes.completions(request)

    @app.post("/v1/chat/completions", summary="chat completion",
              responses={**STREAM_OK, **errors(*post, 429, 500, auth=auth)})
    async def chat_completions(request: HTTPRequest):
        return await routes.chat_completions(request)

    @app.post("/tokenize", summary="text or chat -> token ids", responses=errors(*post, auth=auth))
    async def tokenize_route(request: HTTPRequest):
        return await tokenize(routes, request)

    @app.post("/detokenize", summary="token ids -> text", responses=errors(*post, auth=auth))
    async def detokenize_route(request: HTTPRequest):
        return await detokenize(routes, request)

    engine = routes.engine
    limits = {"vocab": engine.model.cfg.vocab_size - 1, "context": engine.max_model_len,
              "capacity": engine.max_batch + engine.max_queue}
    @app.get("/tokenizer_info", summary="special tokens and chat template (vLLM's)", responses=errors(auth=auth))
    async def tokenizer_info_route() -> dict[str, Any]:
        return tokenizer_info(routes)

    app.openapi = lambda: openapi_document(app, auth, routes.settings.model_name, limits)


def apply_limits(node: Any, limits: dict[str, int]) -> None:
    """Turn each "x-limit" marker (see serve.schemas) into a maximum / maxItems, recursively."""
    if isinstance(node, list):
        for item in node:
            apply_limits(item, limits)
        return
    if not isinstance(node, dict):
        return
    key = node.pop("x-limit", None)
    if key is not None:
        for branch in node.get("anyOf", [node]):
            if branch.get("type") == "integer":
                branch["maximum"] = limits[key]
            elif branch.get("type") == "array":
                branch["maxItems"] = limits[key]
    for value in node.values():
        apply_limits(value, limits)


def only_model(spec: dict[str, Any], name: str) -> None:
    """Document `model` (bodies and the /v1/models/{id} path) as the one name this server serves."""
    for schema in spec["components"]["schemas"].values():
        prop = schema.get("properties", {}).get("model")
        if prop is not None:
            nullable = "anyOf" in prop
            prop.clear()
            prop.update({"anyOf": [{"type": "string", "enum": [name]}, {"type": "null"}]} if nullable
                        else {"type": "string", "enum": [name]})
    for param in spec["paths"]["/v1/models/{model_id}"]["get"].get("parameters", []):
        param["schema"] = {"type": "string", "enum": [name]}


def openapi_document(app: FastAPI, auth: bool, model_name: str, limits: dict[str, int]) -> dict[str, Any]:
    """FastAPI's document plus the request bodies and security, minus the 422 responses (cached)."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for (path, method), model in BODIES.items():
        body = TypeAdapter(model).json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(body.pop("$defs", {}))
        if "properties" in body:  # a model: a component of its own, so its `model` field can be pinned
            schemas[body["title"]] = body
            body = {"$ref": f"#/components/schemas/{body['title']}"}
        spec["paths"][path][method]["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    for item in spec["paths"].values():
        for op in item.values():
            op.get("responses", {}).pop("422", None)
            if auth and op is not spec["paths"]["/health"].get("get"):
                op["security"] = [{"bearer": []}]
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    only_model(spec, model_name)
    apply_limits(spec, limits)
    if auth:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    app.openapi_schema = spec
    return spec
