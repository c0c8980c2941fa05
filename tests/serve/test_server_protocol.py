"""`hybridlm serve` over real HTTP (httpx and the official openai client): the protocol details.

Extreme sampling values next to a greedy stream, keep-alive across every bad request,
media types and methods, log-probabilities (equal to a full forward's log_softmax),
/tokenize and /detokenize, the API key, CORS, a self-contained /docs and an exact
/openapi.json, tokenizer work off the event loop, a checkpoint's chat template with the
reasoning parser and the thinking budget, and the `serve` flags that configure them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import shutil
import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest
import torch

from hybridlm.cli import build_parser, load_tokenizer_for
from hybridlm.serve import security
from hybridlm.serve.chat import chat_prompt
from hybridlm.serve.generation import generate
from hybridlm.serve.reasoning import reasoning_parser
from hybridlm.serve.routes import OpenAIRoutes
from hybridlm.serve.sampling import SamplingParams
from hybridlm.serve.schemas import ChatMessage
from hybridlm.serve.thinking import FORCED_CLOSE
from hybridlm.training.tokenizer import Tokenizer, default_tokenizer

from helpers import SERVED_CONTEXT, SERVED_NAME, serving, sse_payloads
from test_engine_safety import forcing
from test_server import BAD

NAME, CONTEXT = SERVED_NAME, SERVED_CONTEXT  # the `server` fixture (tests/serve/conftest.py)
TOL = 1e-4
TEMPLATE = Path(__file__).parents[1] / "data" / "nano2_like_chat_template.jinja"
USER = [{"role": "user", "content": "Who made the heaven and the earth?"}]


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def post(client: httpx.Client, path: str, **body) -> httpx.Response:
    return client.post(path, json={"model": NAME, **body})


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def stream_payloads(client: httpx.Client, path: str, **body) -> list:
    """Every payload of a streamed answer; asserts 200, no error event and the final [DONE]."""
    with client.stream("POST", path, json={"model": NAME, "stream": True, **body}) as r:
        assert r.status_code == 200
        payloads = sse_payloads(r.iter_lines())
    assert payloads[-1] == "[DONE]" and not any("error" in p for p in payloads[:-1]), payloads
    return payloads[:-1]


def streamed_text(payloads: list) -> str:
    return "".join(p["choices"][0]["text"] for p in payloads if p["choices"])


def greedy_ids(model, tok, prompt_ids: list[int], n: int) -> list[int]:
    """The greedy continuation of the prompt alone, with the plain `generate` (cut at EOS)."""
    new = generate(model, [prompt_ids], SamplingParams(max_new_tokens=n, temperature=0, eos_id=tok.eos_id))[0]
    return new[: new.index(tok.eos_id)] if tok.eos_id in new else new


def full_forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over the whole sequence in one forward (len, vocab), float32."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]


@pytest.fixture(scope="module")
def ids_of_text(tok) -> dict[str, set[int]]:
    """Token text -> the ids that decode to it (several byte tokens all decode to U+FFFD)."""
    out: dict[str, set[int]] = {}
    for i in range(tok.vocab_size):
        out.setdefault(tok.decode([i]), set()).add(i)
    return out


# ---- 1. extreme sampling values next to a greedy stream (the bug report) -------------------------
GREEDY = dict(prompt="In the beginning God created", max_tokens=150, temperature=0)
PROBE = dict(prompt="probe 0", max_tokens=40, seed=0)


@pytest.fixture(scope="module")
def solo(http):
    """The greedy stream's text and the probe's temperature-0 text, each run alone."""
    return (ok(post(http, "/v1/completions", **GREEDY))["choices"][0]["text"],
            ok(post(http, "/v1/completions", **{**PROBE, "temperature": 0}))["choices"][0]["text"])


def probes_next_to_a_greedy_stream(server, settings: list[dict]) -> tuple[str, list[str]]:
    """Stream GREEDY; once it runs, stream one PROBE per settings (concurrently) to their end, then
    read the rest of GREEDY. (greedy text, probe texts); asserts that GREEDY was still running."""
    with httpx.Client(base_url=server.url, timeout=60) as a, httpx.Client(base_url=server.url, timeout=60) as b:
        with a.stream("POST", "/v1/completions", json={"model": NAME, "stream": True, **GREEDY}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            head = sse_payloads([next(lines)])
            with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
                probes = list(pool.map(lambda s: stream_payloads(b, "/v1/completions", **PROBE, **s), settings))
            assert server.engine.num_running == 1  # the greedy stream shared its batches with the probes
            rest = sse_payloads(lines)
    assert rest[-1] == "[DONE]" and not any("error" in p for p in head + rest[:-1])
    return streamed_text(head + rest[:-1]), [streamed_text(p) for p in probes]


def test_subnormal_temperature_next_to_a_greedy_stream(server, solo):
    """The bug report: temperature 3.5e-39 overflowed float32 and failed every request of the batch."""
    greedy, (probe,) = probes_next_to_a_greedy_stream(server, [dict(temperature=3.5e-39)])
    assert greedy == solo[0]
    assert probe == solo[1]


def test_top_p_rounding_to_zero_and_tiny_temperature_are_greedy(server, solo):
    greedy, probes = probes_next_to_a_greedy_stream(server, [dict(top_p=5e-324), dict(temperature=1e-39)])
    assert greedy == solo[0]
    assert probes == [solo[1], solo[1]]


# ---- 2. keep-alive survives every bad request ------------------------------------------------
def local_port(response: httpx.Response) -> int:
    """The client-side port of the connection that carried `response` (the same port: the same connection)."""
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def chunked_over_the_limit():
    for _ in range(100):
        yield b"x" * 1024  # no Content-Length: the 413 comes while the body is still being sent


EXTRA_BAD = [("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "x"}', {"content-type": "text/plain"}, 415),
             ("POST", "/v1/completions", b'{"model": "tiny-test", "prompt": "x"}', {}, 415),
             ("GET", "/v1/completions", None, {}, 405),
             ("POST", "/v1/nothing", b"{}", {"content-type": "application/json"}, 404),
             ("POST", "/detokenize", b'{"tokens": [99999]}', {"content-type": "application/json"}, 400),
             ("POST", "/v1/completions", chunked_over_the_limit, {"content-type": "application/json"}, 413)]


def test_keep_alive_survives_every_bad_request(server):
    """Each bad request, then a good one, on ONE connection: every answer comes back on it (never reset)."""
    bad = [("POST", path, body if isinstance(body, bytes) else json.dumps(body).encode(),
            {"content-type": "application/json"}, status) for path, body, status, _ in BAD] + EXTRA_BAD
    good = json.dumps({"model": NAME, "prompt": "hi", "max_tokens": 1}).encode()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        port = local_port(client.get("/health"))
        for method, path, content, headers, status in bad:
            what = (path, content[:80] if isinstance(content, bytes) else content)
            r = client.request(method, path, content=content() if callable(content) else content, headers=headers)
            assert r.status_code == status, (*what, r.text)
            assert r.headers.get("connection") != "close" and local_port(r) == port, what
            r = client.post("/v1/completions", content=good, headers={"content-type": "application/json"})
            assert r.status_code == 200 and local_port(r) == port


def test_connections_have_tcp_nodelay(server):
    """Headers and body are two writes: without TCP_NODELAY every keep-alive answer waits for a delayed ACK."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        client.get("/health")
        sockets = [c.transport.get_extra_info("socket") for c in server.server.server_state.connections]
        assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)


# ---- 3. media types and methods ---------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["text/plain", None, "application/x-www-form-urlencoded"])
def test_body_that_is_not_declared_json_gets_415(http, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        r = http.post(path, content=b'{"model": "tiny-test", "prompt": "x"}', headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_wrong_method_gets_405_with_allow(http):
    for method, path, allow in [("GET", "/v1/completions", "POST"), ("GET", "/tokenize", "POST"),
                                ("POST", "/v1/models", "GET"), ("PUT", "/health", "GET")]:
        r = http.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- 4. log-probabilities ---------------------------------------------------------------------
PROMPT = "And God said, Let there be light"


def check_top(top: dict, row: torch.Tensor, chosen: str, chosen_logprob: float, n: int, tok, ids_of_text) -> None:
    """A completions `top_logprobs` dict: the n most likely tokens and the chosen one (keys are token
    texts, so tokens with the same text share an entry), each value the log-prob of a token with that text."""
    assert chosen in top and top[chosen] == chosen_logprob and len(top) <= n + 1
    for text, value in top.items():
        assert min(abs(value - row[i].item()) for i in ids_of_text[text]) < TOL, text
    assert {tok.decode([i]) for i in torch.topk(row, n).indices.tolist()} <= set(top)


def test_completion_logprobs_equal_the_full_forward(http, model, tok, ids_of_text):
    r = ok(post(http, "/v1/completions", prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3))
    prompt = tok.encode(PROMPT)
    new = greedy_ids(model, tok, prompt, 8)
    ref = full_forward_logprobs(model, prompt + new)
    lp, text = r["choices"][0]["logprobs"], r["choices"][0]["text"]
    assert lp["tokens"] == [tok.decode([t]) for t in new] and "".join(lp["tokens"]) == text
    for j, t in enumerate(new):
        row = ref[len(prompt) - 1 + j]
        assert abs(lp["token_logprobs"][j] - row[t].item()) < TOL
        check_top(lp["top_logprobs"][j], row, lp["tokens"][j], lp["token_logprobs"][j], 3, tok, ids_of_text)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert [b - a for a, b in zip(offsets, offsets[1:])] == [len(t) for t in lp["tokens"][:-1]]


def test_echo_logprobs_score_the_prompt_first(http, model, tok):
    r = ok(post(http, "/v1/completions", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=1, echo=True))
    prompt = tok.encode(PROMPT)
    new = greedy_ids(model, tok, prompt, 4)
    ref = full_forward_logprobs(model, prompt + new)
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"] == PROMPT + tok.decode(new)
    assert len(lp["tokens"]) == len(prompt) + len(new) == len(lp["token_logprobs"]) == len(lp["text_offset"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["tokens"] == [tok.decode([t]) for t in prompt + new]
    for i, t in enumerate(prompt + new):
        if i:
            assert abs(lp["token_logprobs"][i] - ref[i - 1, t].item()) < TOL
    assert lp["text_offset"][len(prompt)] == len(PROMPT)


def test_max_tokens_zero_scores_the_prompt_only(http, model, tok):
    r = ok(post(http, "/v1/completions", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2))
    prompt = tok.encode(PROMPT)
    ref = full_forward_logprobs(model, prompt)
    choice = r["choices"][0]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
    assert r["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) and lp["token_logprobs"][0] is None
    assert all(abs(v - ref[i, t].item()) < TOL for i, (v, t) in enumerate(zip(lp["token_logprobs"][1:], prompt[1:])))
    assert all(len(top) <= 3 for top in lp["top_logprobs"][1:])


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_join_to_the_whole_ones(http, echo):
    kw = dict(prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2, echo=echo)
    whole = ok(post(http, "/v1/completions", **kw))["choices"][0]
    joined: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for p in stream_payloads(http, "/v1/completions", **kw):
        for key in joined:
            joined[key] += p["choices"][0]["logprobs"][key]
    assert joined == whole["logprobs"]  # the same numbers: both ran alone, greedy


def test_chat_logprobs_equal_the_full_forward(http, server, model, tok):
    r = ok(post(http, "/v1/chat/completions", messages=USER, max_tokens=8, temperature=0, logprobs=True,
                top_logprobs=2))
    prompt = tok.encode(chat_prompt([ChatMessage(**m) for m in USER]))
    new = greedy_ids(model, tok, prompt, 8)
    ref = full_forward_logprobs(model, prompt + new)
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length"  # no stop string hit: the tokens are the whole answer
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for j, (e, t) in enumerate(zip(content, new, strict=True)):
        row = ref[len(prompt) - 1 + j]
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["token"] == tok.decode([t]) and e["bytes"] == list(e["token"].encode())
        assert abs(e["logprob"] - row[t].item()) < TOL
        top = torch.topk(row, 2)
        assert [x["token"] for x in e["top_logprobs"]] == [tok.decode([i]) for i in top.indices.tolist()]
        assert [x["logprob"] for x in e["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=TOL)
    streamed = [e for p in stream_payloads(http, "/v1/chat/completions", messages=USER, max_tokens=8, temperature=0,
                                           logprobs=True, top_logprobs=2) if p["choices"][0]["logprobs"]
                for e in p["choices"][0]["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    typed = client.chat.completions.create(model=NAME, messages=USER, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=2).choices[0]
    assert [e.token for e in typed.logprobs.content] == [e["token"] for e in content]
    assert [e.logprob for e in typed.logprobs.content] == pytest.approx([e["logprob"] for e in content], abs=1e-6)
    assert all(len(e.top_logprobs) == 2 and e.bytes == list(e.token.encode()) for e in typed.logprobs.content)


def test_logprobs_only_when_asked_and_within_limits(http):
    r = ok(post(http, "/v1/chat/completions", messages=USER, max_tokens=3, top_logprobs=2))
    assert r["choices"][0]["logprobs"] is None
    r = ok(post(http, "/v1/chat/completions", messages=USER, max_tokens=3, logprobs=False, top_logprobs=2))
    assert r["choices"][0]["logprobs"] is None
    assert ok(post(http, "/v1/completions", prompt="hi", max_tokens=3))["choices"][0]["logprobs"] is None
    for path, extra in [("/v1/completions", dict(prompt="hi", logprobs=21)),
                        ("/v1/chat/completions", dict(messages=USER, logprobs=True, top_logprobs=21))]:
        r = post(http, path, max_tokens=3, **extra)
        assert r.status_code == 400 and r.json()["error"]["param"] in ("logprobs", "top_logprobs")


# ---- 5. /tokenize and /detokenize -------------------------------------------------------------
TEXTS = ["In the beginning God created the heaven", "  two\n\nlines\t", "Noël — ünïcode ✓ 日本語", "<|endoftext|>x"]


def test_tokenize_a_prompt(http, tok):
    for text in TEXTS:
        r = ok(http.post("/tokenize", json={"prompt": text}))
        assert r == {"count": len(tok.encode(text)), "max_model_len": CONTEXT, "tokens": tok.encode(text),
                     "token_strs": None}
        assert ok(http.post("/detokenize", json={"tokens": r["tokens"]})) == {"prompt": text}
    r = ok(http.post("/tokenize", json={"model": NAME, "prompt": TEXTS[0], "return_token_strs": True}))
    assert r["token_strs"] == [tok.decode([t]) for t in r["tokens"]]
    assert "".join(r["token_strs"]) == TEXTS[0]


def test_tokenize_messages_with_the_plain_template(http, tok):
    messages = [{"role": "system", "content": "Be brief."}, *USER]
    text = chat_prompt([ChatMessage(**m) for m in messages])
    with_prompt = ok(http.post("/tokenize", json={"messages": messages, "return_token_strs": True}))
    assert with_prompt["tokens"] == tok.encode(text) and tok.decode(with_prompt["tokens"]).endswith("Assistant:")
    assert with_prompt["count"] == len(with_prompt["tokens"]) == len(with_prompt["token_strs"])
    without = ok(http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}))
    assert without["tokens"] == tok.encode(text.removesuffix("Assistant:"))
    chat = ok(post(http, "/v1/chat/completions", messages=messages, max_tokens=1))
    assert chat["usage"]["prompt_tokens"] == with_prompt["count"]  # /tokenize counts what the chat sends


def test_tokenize_and_detokenize_refuse_bad_ids_and_models(http, tok):
    for tokens in ([tok.vocab_size], [5, 1 << 40]):
        r = http.post("/detokenize", json={"tokens": tokens})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
    for path, body in [("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [5]}),
                       ("/tokenize", {"messages": USER})]:
        r = http.post(path, json={**body, "model": "gpt-4"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert http.post(path, json={**body, "model": NAME}).status_code == 200


# ---- 6. the API key; 7. CORS --------------------------------------------------------------------
ORIGIN = "http://localhost:3000"


@pytest.fixture(scope="module")
def guarded(model, tok):
    with serving(model, tok, model_name=NAME, api_key="k", allowed_origins=[ORIGIN]) as srv:
        yield srv


def test_api_key_is_required_except_on_open_routes(guarded):
    calls = [("GET", "/v1/models", None),
             ("POST", "/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2}),
             ("POST", "/v1/chat/completions", {"model": NAME, "messages": USER, "max_tokens": 2}),
             ("POST", "/tokenize", {"prompt": "hi"})]
    with httpx.Client(base_url=guarded.url, timeout=60) as client:
        for method, path, body in calls:
            for auth in ({}, {"authorization": "Bearer wrong"}, {"authorization": "k"}):
                r = client.request(method, path, json=body, headers=auth)
                assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, auth)
                assert r.json()["error"]["code"] == "invalid_api_key"
            r = client.request(method, path, json=body, headers={"authorization": "Bearer k"})
            assert r.status_code == 200, (path, r.text)
        for path in ("/health", "/docs", "/openapi.json"):
            assert client.get(path).status_code == 200
    good = openai.OpenAI(base_url=guarded.url + "/v1", api_key="k", max_retries=0, timeout=60)
    assert [m.id for m in good.models.list().data] == [NAME]
    assert good.completions.create(model=NAME, prompt="hi", max_tokens=2).usage.completion_tokens <= 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.url + "/v1", api_key="nope", max_retries=0).models.list()
    spec = httpx.get(guarded.url + "/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert "security" not in spec["paths"]["/health"]["get"]
    assert spec["paths"]["/v1/completions"]["post"]["security"] == [{"bearer": []}]
    assert "401" in spec["paths"]["/v1/models"]["get"]["responses"]


def test_an_empty_api_key_is_no_key(model, tok):
    """The middleware and /openapi.json agree: an empty key turns authentication off (as $HYBRIDLM_API_KEY="")."""
    with serving(model, tok, model_name=NAME, api_key="") as srv:
        assert httpx.get(srv.url + "/v1/models").status_code == 200
        spec = httpx.get(srv.url + "/openapi.json").json()
    assert "securitySchemes" not in spec["components"]
    operations = [op for item in spec["paths"].values() for op in item.values()]
    assert not any("security" in op or "401" in op["responses"] for op in operations)


def test_api_key_from_flag_or_environment(monkeypatch):
    monkeypatch.delenv(security.API_KEY_ENV, raising=False)
    assert security.api_key_from(None) is None
    monkeypatch.setenv(security.API_KEY_ENV, "from-env")
    assert security.api_key_from(None) == "from-env"
    assert security.api_key_from("from-flag") == "from-flag"
    monkeypatch.setenv(security.API_KEY_ENV, "")
    assert security.api_key_from(None) is None


def preflight(url: str, origin: str) -> httpx.Response:
    return httpx.options(url + "/v1/chat/completions", headers={
        "origin": origin, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type"})


def test_cors_only_for_the_allowed_origins(server, guarded):
    assert "access-control-allow-origin" not in preflight(server.url, ORIGIN).headers  # no CORS by default
    assert "access-control-allow-origin" not in httpx.get(server.url + "/v1/models", headers={"origin": ORIGIN}).headers
    r = preflight(guarded.url, ORIGIN)  # a preflight carries no key, and passes
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in preflight(guarded.url, "http://evil.example").headers
    r = httpx.get(guarded.url + "/v1/models", headers={"origin": ORIGIN, "authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.get(guarded.url + "/v1/models", headers={"origin": "http://evil.example", "authorization": "Bearer k"})
    assert "access-control-allow-origin" not in r.headers


# ---- 8. /docs and /openapi.json ---------------------------------------------------------------
def test_docs_page_loads_nothing_from_outside(http):
    r = http.get("/docs")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http://" not in html and "https://" not in html and "//cdn" not in html
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=", html, re.I)
    assert not re.search(r"<(img|iframe)[^>]*\bsrc\s*=", html, re.I)


def test_openapi_documents_bodies_errors_and_the_model(http):
    spec = ok(http.get("/openapi.json"))
    schemas = spec["components"]["schemas"]
    error = {"$ref": "#/components/schemas/ErrorBody"}
    routes = {"/v1/completions": (400, 404, 413, 415, 429), "/v1/chat/completions": (400, 404, 413, 415, 429),
              "/tokenize": (400, 404, 413, 415), "/detokenize": (400, 404, 413, 415)}
    for path, codes in routes.items():
        op = spec["paths"][path]["post"]
        body = op["requestBody"]
        assert body["required"] and "schema" in body["content"]["application/json"]
        for ref in re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(body)):
            assert ref in schemas, (path, ref)
        for code in codes:
            assert op["responses"][str(code)]["content"]["application/json"]["schema"] == error, (path, code)
    assert set(schemas["ErrorBody"]["properties"]) == {"error"}
    for item in spec["paths"].values():
        for op in item.values():
            assert "422" not in op["responses"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    enum = {"type": "string", "enum": [NAME]}
    assert schemas["CompletionBody"]["properties"]["model"] == enum
    assert schemas["ChatBody"]["properties"]["model"] == enum
    for name in ("TokenizeCompletionBody", "TokenizeChatBody", "DetokenizeBody"):
        assert schemas[name]["properties"]["model"] == {"anyOf": [enum, {"type": "null"}]}
        assert "model" not in schemas[name].get("required", [])
    assert spec["paths"]["/v1/models/{model_id}"]["get"]["parameters"][0]["schema"] == enum


# ---- 9. tokenizer work off the event loop -----------------------------------------------------
GATED_CHARS = 100_000   # encodes of longer texts wait at the spy's gate while it is closed


class SpyTokenizer:
    """A tokenizer that records the thread of every encode / encode_batch / decode call; while
    `gate` is clear, encoding a text longer than GATED_CHARS first counts itself in `entered`
    and waits for the gate."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner, self.calls, self.lock = inner, [], threading.Lock()
        self.gate, self.entered = threading.Event(), threading.Semaphore(0)
        self.gate.set()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def record(self, name: str) -> None:
        with self.lock:
            self.calls.append((name, threading.get_ident()))

    def encode(self, text: str) -> list[int]:
        self.record("encode")
        if len(text) > GATED_CHARS and not self.gate.is_set():
            self.entered.release()
            self.gate.wait(timeout=60)
        return self.inner.encode(text)

    def encode_batch(self, texts) -> list[list[int]]:
        self.record("encode_batch")
        return self.inner.encode_batch(texts)

    def decode(self, ids) -> str:
        self.record("decode")
        return self.inner.decode(ids)


@pytest.fixture(scope="module")
def spied(model, tok):
    spy = SpyTokenizer(tok)
    with serving(model, spy, model_name=NAME, max_request_bytes=4 << 20) as srv:
        yield srv, spy


def test_tokenizer_never_runs_on_the_event_loop(spied):
    srv, spy = spied
    loop_thread = srv.thread.ident  # uvicorn runs its event loop in the BackgroundServer's thread
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        ok(post(client, "/v1/completions", prompt="In the beginning", max_tokens=4, logprobs=2, echo=True))
        ok(post(client, "/v1/completions", prompt=["In the beginning", "And God said"], max_tokens=2))
        stream_payloads(client, "/v1/completions", prompt="Let there be", max_tokens=3, logprobs=1)
        ok(post(client, "/v1/chat/completions", messages=USER, max_tokens=4, logprobs=True, top_logprobs=2))
        stream_payloads(client, "/v1/chat/completions", messages=USER, max_tokens=3, logprobs=True)
        ok(client.post("/tokenize", json={"prompt": "Noël ✓", "return_token_strs": True}))
        ok(client.post("/tokenize", json={"messages": USER, "return_token_strs": True}))
        ok(client.post("/detokenize", json={"tokens": [100, 200, 300]}))
    names = {name for name, _ in spy.calls}
    assert {"encode", "encode_batch", "decode"} <= names
    on_loop = [name for name, thread in spy.calls if thread == loop_thread]
    assert on_loop == [], f"{len(on_loop)} tokenizer calls on the event loop: {sorted(set(on_loop))}"


def test_health_answers_while_big_prompts_tokenize(spied):
    srv, spy = spied
    body = {"model": NAME, "prompt": "word " * 82_000, "max_tokens": 1}  # ~400 KiB, far beyond the context
    spy.gate.clear()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        try:
            answers = [pool.submit(httpx.post, srv.url + "/v1/completions", json=body, timeout=120) for _ in range(4)]
            for _ in answers:
                assert spy.entered.acquire(timeout=60)  # all four are inside encode, in worker threads
            assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
        finally:
            spy.gate.set()
        for answer in answers:
            r = answer.result()
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# ---- 10. a chat template, the reasoning parser and the thinking budget -------------------------
@pytest.fixture(scope="module")
def template_tok(tmp_path_factory) -> Tokenizer:
    """The bundled tokenizer as a checkpoint-style directory with a Nano-2-like chat_template.jinja."""
    d = tmp_path_factory.mktemp("tokenizer_with_template")
    default_tokenizer().save(d / "tokenizer.json")
    shutil.copy(TEMPLATE, d / "chat_template.jinja")
    tok = Tokenizer.from_file(d)
    assert tok.chat_template is not None and tok.chat_template.eos_token == tok.eos_token
    return tok


@pytest.fixture(scope="module")
def thinker(model, template_tok):
    with serving(model, template_tok, model_name=NAME, reasoning_tags=reasoning_parser("think")) as srv:
        yield srv


def chat(system: str) -> list[dict]:
    return [{"role": "system", "content": system}, *USER]


def force(monkeypatch, sequence: list[int]) -> None:
    """Make every completion the server samples follow `sequence` (a logits processor on each request)."""
    sampling = OpenAIRoutes.sampling

    def forced(self, *args, **kwargs) -> SamplingParams:
        params = sampling(self, *args, **kwargs)
        params.logits_processors = [forcing(sequence)]
        return params
    monkeypatch.setattr(OpenAIRoutes, "sampling", forced)


THINK_WORD, ANSWER = " and", " Amen, so be it."


def test_the_served_prompt_is_the_rendered_template(thinker, template_tok):
    with httpx.Client(base_url=thinker.url, timeout=60) as client:
        for system, generation_prompt in [("/think", True), ("/no_think", True), ("Be brief.", False)]:
            messages = chat(system)
            text = template_tok.chat_template.render(messages, add_generation_prompt=generation_prompt)
            r = ok(client.post("/tokenize", json={"messages": messages, "add_generation_prompt": generation_prompt}))
            assert r["tokens"] == template_tok.encode(text)
        assert template_tok.decode(r["tokens"]).endswith("\n<extra_id_2>\n")
        on = ok(client.post("/tokenize", json={"messages": chat("/think")}))["tokens"]
        off = ok(client.post("/tokenize", json={"messages": chat("/no_think")}))["tokens"]
    assert template_tok.decode(on).endswith("Assistant\n<think>\n")
    assert template_tok.decode(off).endswith("Assistant\n<think></think>")


def reasoning_and_content(client: httpx.Client, **body) -> tuple[dict, tuple[str, str]]:
    """The whole message, and the joined reasoning_content / content deltas of the same request streamed."""
    whole = ok(post(client, "/v1/chat/completions", temperature=0, **body))["choices"][0]
    deltas = [p["choices"][0]["delta"] for p in stream_payloads(client, "/v1/chat/completions", temperature=0, **body)
              if p["choices"]]
    return whole, ("".join(d.get("reasoning_content", "") for d in deltas),
                   "".join(d.get("content", "") for d in deltas))


def test_thinking_budget_ends_the_reasoning(thinker, template_tok, monkeypatch):
    tok, budget = template_tok, 5
    close, answer = tok.encode(FORCED_CLOSE), tok.encode(ANSWER)
    # `budget` thinking tokens; then the engine forces the close (the processor's choice is overridden
    # for those steps, placeholders here); then the answer and EOS
    force(monkeypatch, tok.encode(THINK_WORD) * budget + [0] * len(close) + answer + [tok.eos_id])
    with httpx.Client(base_url=thinker.url, timeout=60) as client:
        whole, streamed = reasoning_and_content(client, messages=chat("/think"), max_tokens=40,
                                                thinking_budget=budget)
    assert whole["message"]["reasoning_content"] == THINK_WORD * budget
    assert whole["message"]["content"] == ANSWER and whole["finish_reason"] == "stop"
    assert streamed == (THINK_WORD * budget, ANSWER)

    client = openai.OpenAI(base_url=thinker.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    typed = client.chat.completions.create(model=NAME, messages=chat("/think"), max_tokens=40, temperature=0,
                                           extra_body={"thinking_budget": budget}).choices[0].message
    assert (typed.content, typed.reasoning_content) == (ANSWER, THINK_WORD * budget)


def test_no_think_gives_no_reasoning(thinker, template_tok, monkeypatch):
    tok = template_tok
    force(monkeypatch, tok.encode(ANSWER) + [tok.eos_id])
    with httpx.Client(base_url=thinker.url, timeout=60) as client:
        whole, streamed = reasoning_and_content(client, messages=chat("/no_think"), max_tokens=40)
        assert "reasoning_content" not in whole["message"] and whole["message"]["content"] == ANSWER
        assert streamed == ("", ANSWER)
        # a model that opens a block anyway has it closed at once (/no_think: a budget of 0)
        opener, close = tok.encode("<think>"), tok.encode(FORCED_CLOSE)
        force(monkeypatch, opener + [0] * len(close) + tok.encode(ANSWER) + [tok.eos_id])
        whole = ok(post(client, "/v1/chat/completions", messages=chat("/no_think"), max_tokens=40))["choices"][0]
    assert whole["message"].get("reasoning_content") is None and whole["message"]["content"] == ANSWER


def test_without_a_budget_the_model_thinks_until_max_tokens(thinker, template_tok, monkeypatch):
    force(monkeypatch, template_tok.encode(THINK_WORD) * 100)
    with httpx.Client(base_url=thinker.url, timeout=60) as client:
        whole, streamed = reasoning_and_content(client, messages=chat("/think"), max_tokens=12)
    assert whole["message"]["reasoning_content"] == THINK_WORD * 12
    assert whole["message"]["content"] is None and whole["finish_reason"] == "length"
    assert streamed == (THINK_WORD * 12, "")


# ---- the command's flags ------------------------------------------------------------------------
def test_serve_help_lists_the_security_and_chat_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--api-key", "--allowed-origins", "--reasoning-parser", "--chat-template"):
        assert flag in out


def tokenizer_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"ckpt": None, "hf": None, "tokenizer": None, "chat_template": None, **kw})


def test_load_tokenizer_for_finds_the_checkpoint_template_and_the_flag_overrides(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert load_tokenizer_for(tokenizer_args(ckpt=str(ckpt))).chat_template is None
    shutil.copy(TEMPLATE, ckpt / "chat_template.jinja")
    tok = load_tokenizer_for(tokenizer_args(ckpt=str(ckpt)))
    assert tok.chat_template.source == TEMPLATE.read_text() and tok.chat_template.eos_token == tok.eos_token
    other = tmp_path / "other.jinja"
    other.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    for where in (dict(ckpt=str(ckpt)), {}):
        tok = load_tokenizer_for(tokenizer_args(chat_template=str(other), **where))
        assert tok.chat_template.render(USER, add_generation_prompt=True) == f"[user] {USER[0]['content']}\n"
    default_tokenizer().save(ckpt / "tokenizer.json")  # the checkpoint's own tokenizer, template beside it
    assert load_tokenizer_for(tokenizer_args(ckpt=str(ckpt))).chat_template.source == TEMPLATE.read_text()
    assert load_tokenizer_for(tokenizer_args(ckpt=str(ckpt), chat_template=str(other))).chat_template.source \
        == other.read_text()
