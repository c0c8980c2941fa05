"""Reading a request body: media type, size, JSON, text that is valid Unicode, all before any work.

415 unless the body is declared JSON (``application/json`` or ``application/*+json``), so a
web page cannot make a browser POST a "simple" ``text/plain`` request to a local server;
413 past the size limit (checked while reading, without trusting Content-Length); 400 for
anything `json.loads` refuses or that Python's JSON reader would accept but JSON does not
mean (``NaN``, ``Infinity``, integers longer than Python's 4300-digit limit) and for
strings with lone surrogates (``"\\ud800"``), which no tokenizer can encode.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import Request as HTTPRequest

from .errors import APIError

OFF_LOOP_BYTES = 64 * 1024   # bodies larger than this are parsed in a worker thread


def is_json_media_type(content_type: str | None) -> bool:
    media = (content_type or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _number(literal: str) -> int | float:
    """A JSON number with a fraction or exponent; integral values become ints, as JSON Schema's
    "integer" counts them (``3.0`` is an integer there, and a valid token id)."""
    value = float(literal)
    return int(value) if value.is_integer() else value


def _has_lone_surrogate(data: Any) -> bool:
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def parse_json(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`; APIError(400) for anything else (see the module docstring)."""
    try:
        data = json.loads(raw, parse_constant=_no_constants, parse_float=_number)
    except (ValueError, RecursionError, OverflowError) as e:  # JSONDecodeError, UnicodeDecodeError, digit limit, NaN
        raise APIError(400, f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    if _has_lone_surrogate(data):
        raise APIError(400, "request body contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not "
                            "valid Unicode text", code="invalid_unicode")
    return data


async def read_json_body(request: HTTPRequest, limit: int) -> dict[str, Any]:
    """The request's JSON object, checked as the module docstring says."""
    if not is_json_media_type(request.headers.get("content-type")):
        raise APIError(415, "request body must be JSON: send the header 'Content-Type: application/json'",
                       code="unsupported_media_type")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body of {length} bytes exceeds the limit of {limit} bytes",
                       code="request_too_large")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    if len(raw) > OFF_LOOP_BYTES:
        return await asyncio.to_thread(parse_json, bytes(raw))
    return parse_json(bytes(raw))
