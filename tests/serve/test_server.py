"""`hybridlm serve`: the official openai client against a real uvicorn server on 127.0.0.1.

Streaming and not, completions and chat, every bad input's status and JSON body,
disconnects freeing slots, the queue limit, and a bounded load test.
"""

import concurrent.futures
import json
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from hybridlm.serve.app import BackgroundServer, ServerSettings, create_app
from hybridlm.serve.chat import CHAT_STOP, chat_prompt
from hybridlm.serve.engine import Engine, wait_idle
from hybridlm.serve.generation import generate
from hybridlm.serve.sampling import SamplingParams
from hybridlm.serve.schemas import ChatMessage

from helpers import SERVED_CONTEXT, SERVED_NAME

NAME, CONTEXT = SERVED_NAME, SERVED_CONTEXT  # the `server` fixture (tests/serve/conftest.py)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference_text(model, tok, prompt: str, max_tokens: int, stop: list[str] = ()) -> tuple[str, str]:
    """Greedy text of the prompt alone, with the plain `generate` (no engine, no server)."""
    new = generate(model, [tok.encode(prompt)], SamplingParams(max_new_tokens=max_tokens, temperature=0,
                                                              eos_id=tok.eos_id))[0]
    reason = "length"
    if tok.eos_id in new:
        new, reason = new[: new.index(tok.eos_id)], "stop"
    text = tok.decode(new)
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    if hits:
        text, reason = text[: min(hits)], "stop"
    return text, reason


# ---- happy paths with the official client --------------------------------------------------
def test_completion_non_streaming_equals_generate(client, model, tok):
    prompt = "In the beginning God created the heaven"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
    text, reason = reference_text(model, tok, prompt, 12)
    assert r.object == "text_completion" and r.model == NAME
    assert r.choices[0].text == text and r.choices[0].finish_reason == reason
    assert r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_streaming_equals_non_streaming(client):
    kw = dict(model=NAME, prompt="And God said, Let there be", max_tokens=15, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_completion_batch_of_prompts_and_token_ids(client, tok):
    prompts = ["The LORD is my shepherd", "Blessed are the meek"]
    r = client.completions.create(model=NAME, prompt=prompts, max_tokens=6, temperature=0)
    alone = [client.completions.create(model=NAME, prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == alone
    ids = client.completions.create(model=NAME, prompt=tok.encode(prompts[0]), max_tokens=6, temperature=0)
    assert ids.choices[0].text == alone[0]


def test_chat_streaming_and_not(client, model, tok):
    messages = [{"role": "system", "content": "You answer in the style of the King James Bible."},
                {"role": "user", "content": "Who made the heaven and the earth?"}]
    r = client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0)
    prompt = chat_prompt([ChatMessage(**m) for m in messages])
    assert prompt.startswith("System: You answer") and prompt.endswith("\n\nAssistant:")
    text, reason = reference_text(model, tok, prompt, 20, CHAT_STOP)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text and r.choices[0].finish_reason == reason
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reason


def test_n_completions_use_consecutive_seeds(client):
    kw = dict(model=NAME, prompt="In the beginning", max_tokens=8, temperature=1.0)
    r = client.completions.create(n=3, seed=10, **kw)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts == [client.completions.create(seed=10 + i, **kw).choices[0].text for i in range(3)]
    assert r.usage.prompt_tokens == client.completions.create(seed=1, **kw).usage.prompt_tokens


def test_seeded_sampling_is_reproducible(client):
    kw = dict(model=NAME, prompt="In the beginning", max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    assert a == client.completions.create(seed=7, **kw).choices[0].text
    assert a == "".join(c.choices[0].text for c in client.completions.create(seed=7, stream=True, **kw))
    assert a != client.completions.create(seed=8, **kw).choices[0].text


def test_stop_string(client):
    kw = dict(model=NAME, prompt="And the earth was", max_tokens=30, temperature=0)
    text = client.completions.create(**kw).choices[0].text
    stop = text[8:12]
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].text == text[: text.find(stop)] and r.choices[0].finish_reason == "stop"


def test_health_and_models(server, client):
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["model"] == NAME
    assert [m.id for m in client.models.list().data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


# ---- bad input ---------------------------------------------------------------------------------
LONG = "word " * (CONTEXT + 10)
BAD = [
    ("/v1/completions", b'{"model": "tiny-test", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", b"\xff\xfe not utf-8", 400, "not valid JSON"),
    ("/v1/completions", b"[1, 2, 3]", 400, "JSON object"),
    ("/v1/completions", b"[" * 50_000, 400, "not valid JSON"),  # nesting deeper than the parser's recursion
    ("/v1/completions", {"prompt": "hi"}, 400, "'model'"),
    ("/v1/completions", {"model": NAME}, 400, "'prompt'"),
    ("/v1/chat/completions", {"model": NAME}, 400, "'messages'"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "'messages.0.content.0.type'"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": -1},
     400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": 7}, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": 50}, 400, "'n'"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "seed": 2 ** 64}, 400, "'seed'"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "seed": -(2 ** 63) - 1}, 400, "'seed'"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "hi", "seed": ' + b"7" * 5000 + b"}", 400,
     "not valid JSON"),  # longer than Python's 4300-digit int limit
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "hi", "temperature": NaN}', 400, "not valid JSON"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "\\ud800"}', 400, "surrogate"),
    ("/v1/chat/completions", b'{"model": "tiny-test", "messages": [{"role": "user", "content": "a\\udfff"}]}', 400, "surrogate"),
    ("/v1/completions", b'{"model": "\\ud800", "prompt": "hi"}', 400, "surrogate"),
    ("/v1/completions", {"model": NAME, "prompt": ["hi"] * 200}, 400, "at once"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream": True, "stream_options": 3}, 400, "stream_options"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, 400, "'stream'"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "5"}, 400, "'max_tokens'"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 21}, 400, "'logprobs'"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "presence_penalty": 0.5}, 400, "not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "best_of": 3}, 400, "not supported"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logit_bias": {"5": 1.0}},
     400, "not supported"),
    ("/v1/completions", {"model": NAME, "prompt": [1, 99999]}, 400, "token ids"),
    ("/v1/completions", {"model": NAME, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": LONG, "max_tokens": 1}, 400, "maximum context length"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": CONTEXT}, 400, "maximum context length"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": LONG}]}, 400,
     "maximum context length"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "does not exist"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, 404,
     "does not exist"),
    ("/v1/completions", {"model": NAME, "prompt": "x" * 70_000}, 413, "exceeds the limit"),
]


@pytest.mark.parametrize("path,body,status,message", BAD, ids=[f"{i}-{b[3]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_4xx_with_json_error(server, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert message in err["message"] and set(err) == {"message", "type", "param", "code"}
    assert httpx.get(server.url + "/health").status_code == 200  # still up


def test_bad_input_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=LONG, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_wrong_method_and_route(server):
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and "error" in r.json() and r.headers["allow"] == "POST"
    r = httpx.delete(server.url + "/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    r = httpx.post(server.url + "/v1/nothing", json={})
    assert r.status_code == 404 and "error" in r.json()


def test_chunked_body_over_the_limit(server):
    def body():
        for _ in range(100):
            yield b"x" * 1024  # no Content-Length: the limit is enforced while reading
    r = httpx.post(server.url + "/v1/completions", content=body(), headers={"content-type": "application/json"})
    assert r.status_code == 413


# ---- disconnects and limits -------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_slot(server):
    engine = server.engine
    aborted = engine.stats["aborted"]
    body = {"model": NAME, "prompt": "In the beginning", "max_tokens": CONTEXT - 10, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]
        assert got[0].startswith("data: {")
        assert engine.num_running == 1
    assert wait_idle(engine)
    assert engine.stats["aborted"] == aborted + 1


def test_disconnect_while_waiting_for_json_frees_the_slot(server):
    engine = server.engine
    aborted = engine.stats["aborted"]
    body = json.dumps({"model": NAME, "prompt": "In the beginning", "max_tokens": CONTEXT - 10,
                       "temperature": 0}).encode()
    with socket.create_connection((server.host, server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        end = time.monotonic() + 10
        while engine.num_running == 0 and time.monotonic() < end:
            time.sleep(0.005)
        assert engine.num_running == 1
    assert wait_idle(engine)
    assert engine.stats["aborted"] == aborted + 1


def test_queue_full_gets_429(model, tok):
    engine = Engine(model, tok, max_batch=1, max_queue=0, max_model_len=100_000)
    with BackgroundServer(create_app(engine, tok, ServerSettings(model_name=NAME))) as srv:
        body = {"model": NAME, "prompt": "In the beginning", "max_tokens": 50_000, "stream": True}
        with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()  # keep it: a dropped iterator closes the connection
            assert next(lines).startswith("data: ")
            busy = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2})
            assert busy.status_code == 429 and busy.json()["error"]["code"] == "queue_full"
        assert wait_idle(engine)
        ok = httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        assert ok.status_code == 200


# ---- load ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_load_200_requests_16_concurrent(server, client):
    """200 mixed requests (stream or not, completion or chat) from 16 threads: none lost, none failed."""
    engine = server.engine
    finished_before = engine.stats["finished"]

    def one(i: int) -> tuple[int, int, str]:
        n = 1 + i % 6
        if i % 2 == 0:
            kw = dict(model=NAME, prompt=f"Verse {i}: and it came to pass", max_tokens=n, temperature=0.8, seed=i)
            if i % 4 == 0:
                return i, n, "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
            r = client.completions.create(**kw)
            assert r.usage.completion_tokens <= n
            return i, n, r.choices[0].text
        kw = dict(model=NAME, messages=[{"role": "user", "content": f"Question {i}?"}], max_tokens=n, seed=i)
        if i % 4 == 1:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            return i, n, "".join(c.choices[0].delta.content or "" for c in chunks)
        r = client.chat.completions.create(**kw)
        assert r.choices[0].finish_reason in ("stop", "length")
        return i, n, r.choices[0].message.content

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200), timeout=120))
    assert sorted(r[0] for r in results) == list(range(200))
    assert all(isinstance(r[2], str) for r in results)
    assert wait_idle(engine)
    assert engine.stats["finished"] - finished_before == 200
    print(f"200 requests in {time.monotonic() - start:.1f} s")


# ---- the command ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_command_end_to_end(tmp_path, model):
    """`hybridlm serve --ckpt DIR` in a subprocess: answers, names the model after DIR, stops on SIGINT."""
    from hybridlm.interop.checkpoint import save_model

    ckpt = save_model(model, tmp_path / "my-model")
    with socket.socket() as s:  # a free port (released again for the server)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "hybridlm.cli", "serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--threads", "1", "--log-level", "warning", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < end, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.2)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "my-model"
        r = httpx.post(url + "/v1/completions", json={"model": "my-model", "prompt": "In the", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"http://127.0.0.1:{port}/v1" in out


def test_serve_command_bad_input(capsys):
    from hybridlm.cli import main

    assert main(["serve", "--ckpt", "/nonexistent/ck"]) == 1
    assert "directory not found: /nonexistent/ck" in capsys.readouterr().err
    assert main(["serve", "--preset", "tiny", "--max-batch", "0"]) == 1
    assert "--max-batch" in capsys.readouterr().err
