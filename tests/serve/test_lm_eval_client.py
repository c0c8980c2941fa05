"""lm-evaluation-harness's own `local-completions` client scores a multiple-choice task through `hybridlm serve`.

lm-eval (0.4.x) tokenizes each (context, " " + choice) pair itself with a Hugging Face
tokenizer (ours, written as a local folder: no hub), sends the token ids of several pairs per
request as `{"prompt": [[ids], ...], "max_tokens": 1, "logprobs": 1, "echo": true,
"temperature": 0, "seed": 1234}` and sums `choices[i].logprobs.token_logprobs[ctxlen:-1]`
(the last entry is the one generated token); `is_greedy` compares each of those with
`max(top_logprobs[j].values())`. Every number it gets must equal a plain forward pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import requests
import torch

from hybridlm.training.tokenizer import DEFAULT_TOKENIZER_PATH, EOS_TOKEN

from helpers import SERVED_CONTEXT, SERVED_NAME

NAME, CONTEXT = SERVED_NAME, SERVED_CONTEXT  # the `server` fixture (tests/serve/conftest.py)
TASK = "hybridlm_kjv_mc"
TASK_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"
BATCH = 4  # prompts per request: lm-eval sends this many (context + continuation) token lists at once
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory) -> Path:
    """The bundled tokenizer as a folder `transformers.AutoTokenizer.from_pretrained` loads offline."""
    path = tmp_path_factory.mktemp("hf_tokenizer")
    shutil.copy(DEFAULT_TOKENIZER_PATH, path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN, "model_max_length": CONTEXT}))
    return path


def test_hf_tokenizer_dir_encodes_like_ours(hf_tokenizer_dir, tok):
    """What lm-eval loads (AutoTokenizer; `add_special_tokens` follows its add_bos_token) is our tokenizer."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(hf_tokenizer_dir))
    assert (hf.eos_token, hf.eos_token_id, hf.bos_token_id) == (EOS_TOKEN, tok.eos_id, None)
    for s in ["In the beginning God created the heaven", " and the earth.", "  two\n\nlines\t", "Noël — ünïcode ✓",
              EOS_TOKEN + "Amen", ""]:
        for special in (False, True):
            assert hf(s, add_special_tokens=special).input_ids == tok.encode(s), (s, special)
    assert hf.batch_decode([tok.encode("Jesus wept.")]) == ["Jesus wept."]


# ---- the reference: what lm-eval asks for, computed with the model directly ----------------------
def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm_eval's TemplateLM._encode_pair for causal models: trailing whitespace of the context moves to
    the continuation; the continuation's ids are those of the whole text after the context's ids."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def log_probs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float32 log-softmax of one unpadded forward pass."""
    return torch.log_softmax(model(torch.tensor([ids])).float()[0], dim=-1)


def reference_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool, float]:
    """(sum of the continuation's log-probs, is every one the argmax, the argmax decision's smallest margin)."""
    rows = log_probs(model, ctx + cont)[len(ctx) - 1: len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    chosen = rows.gather(1, target[:, None])[:, 0]
    others = rows.scatter(1, target[:, None], float("-inf")).max(-1).values
    return float(chosen.sum()), bool((chosen > others).all()), float((chosen - others).abs().min())


def greedy_docs(model, tok, contexts: list[str], lengths=(1, 2, 3)) -> list[dict]:
    """Documents whose right answer is the model's own greedy continuation (so lm-eval's is_greedy is
    True for it): its first `n` greedy tokens, kept when they start with a space (lm-eval's delimiter),
    re-tokenize as themselves and win every argmax by a clear margin."""
    docs = []
    for context, n in zip(contexts, lengths):
        ids = tok.encode(context)
        for _ in range(n):
            ids.append(int(log_probs(model, ids)[-1].argmax()))
        text = tok.decode(ids[len(tok.encode(context)):])
        ctx, cont = encode_pair(tok, context, text)
        if not text.startswith(" ") or ctx + cont != ids or reference_loglikelihood(model, ctx, cont)[2] < 1e-3:
            continue
        docs.append({"context": context, "choices": [text[1:], "the LORD."], "label": 0})
    return docs


# ---- lm-eval against the server ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def extra_docs(model, tok, tmp_path_factory) -> Path:
    contexts = ["And God called the light Day, and the darkness he called", "Thou shalt not", "Amen, and"]
    docs = greedy_docs(model, tok, contexts)
    assert docs, "no greedy continuation of the contexts re-tokenizes as itself"
    path = tmp_path_factory.mktemp("lm_eval_docs") / "greedy.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    return path


def evaluate(server, extra_docs, **tokenizer_args):
    """One `lm_eval.simple_evaluate` of the task (and `extra_docs`) through the server; also every body
    lm-eval posted to /v1/completions."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    bodies, post = [], requests.post

    def recording_post(url, *args, **kwargs):  # lm-eval's synchronous path posts with requests.post
        bodies.append((url, kwargs.get("json")))
        return post(url, *args, **kwargs)

    model_args = dict(model=NAME, base_url=server.url + "/v1/completions", tokenized_requests=True,
                      num_concurrent=1, max_retries=1, max_length=CONTEXT, timeout=60, **tokenizer_args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(requests, "post", recording_post)
        results = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args, tasks=[TASK], batch_size=BATCH,
            task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                                     metadata={"extra_docs": str(extra_docs)}),
            log_samples=True, bootstrap_iters=0, cache_requests=False)
    return results, bodies


@pytest.fixture(scope="module")
def lm_eval_run(server, hf_tokenizer_dir, extra_docs):
    return evaluate(server, extra_docs, tokenizer=str(hf_tokenizer_dir), tokenizer_backend="huggingface")


def test_lm_eval_tokenizes_through_the_server(server, extra_docs, lm_eval_run):
    """With no local tokenizer, lm-eval's remote backend uses /tokenizer_info, /tokenize and /detokenize:
    the same requests and the same loglikelihoods."""
    results, bodies = evaluate(server, extra_docs, tokenizer_backend="remote")
    local, local_bodies = lm_eval_run
    assert [b for _, b in bodies if "echo" in (b or {})] == [b for _, b in local_bodies]
    assert [s["filtered_resps"] for s in results["samples"][TASK]] == \
        [s["filtered_resps"] for s in local["samples"][TASK]]


def test_lm_eval_sends_batched_token_ids(lm_eval_run, tok):
    results, bodies = lm_eval_run
    samples = results["samples"][TASK]
    n_requests = sum(len(s["arguments"]) for s in samples)
    assert bodies and all(url.endswith("/v1/completions") for url, _ in bodies)
    assert sum(len(b["prompt"]) for _, b in bodies) == n_requests
    assert max(len(b["prompt"]) for _, b in bodies) == BATCH  # several prompts per request
    for _, body in bodies:
        assert {k: v for k, v in body.items() if k != "prompt"} == {
            "model": NAME, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
        assert all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in body["prompt"])
    sent = sorted(map(tuple, (p for _, b in bodies for p in b["prompt"])))
    expected = sorted(tuple(sum(encode_pair(tok, *a), [])) for s in samples for a in s["arguments"])
    assert sent == expected


def test_lm_eval_loglikelihoods_equal_the_model(lm_eval_run, model, tok, extra_docs):
    results, _ = lm_eval_run
    samples = results["samples"][TASK]
    docs = [json.loads(line) for path in (TASK_DIR / "kjv_mc.jsonl", extra_docs)
            for line in path.read_text().splitlines() if line.strip()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(docs)))
    greedy_flags = set()
    for s in samples:
        doc = docs[s["doc_id"]]
        assert [tuple(a) for a in s["arguments"]] == [(doc["context"], " " + c) for c in doc["choices"]]
        for (context, continuation), (got_ll, got_greedy) in zip(s["arguments"], s["filtered_resps"],
                                                                 strict=True):
            ctx, cont = encode_pair(tok, context, continuation)
            assert ctx and cont
            ll, greedy, margin = reference_loglikelihood(model, ctx, cont)
            assert got_ll == pytest.approx(ll, abs=TOL), (context, continuation)
            if margin > 10 * TOL:  # (a near tie may fall either way within the tolerance)
                assert got_greedy == greedy, (context, continuation)
                greedy_flags.add(greedy)
        lls = [r[0] for r in s["filtered_resps"]]
        assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == doc["label"])
    assert greedy_flags == {True, False}  # both kinds checked
    acc = results["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0 and acc == pytest.approx(sum(s["acc"] for s in samples) / len(samples))


# ---- the same request body, without lm-eval -------------------------------------------------------
def check_echo_logprobs(choice: dict, model, tok, ids: list[int]) -> None:
    """A vLLM-shaped `logprobs` of `ids` + the one greedy token, equal to a plain forward pass."""
    nxt = int(log_probs(model, ids)[-1].argmax())
    full = ids + [nxt]
    ref = log_probs(model, full)
    lp = choice["logprobs"]
    assert set(lp) >= {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    tokens, token_lps, tops, offsets = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], lp["text_offset"]
    assert len(tokens) == len(token_lps) == len(tops) == len(offsets) == len(ids) + 1
    assert token_lps[0] is None and tops[0] is None
    assert tokens[:-1] == [tok.decode([t]) for t in ids]
    if "\ufffd" not in tok.decode([nxt]):  # (a partial UTF-8 byte token may be spelled otherwise)
        assert tokens[-1] == tok.decode([nxt])
        assert choice["text"] == tok.decode(full)  # echo: the prompt's text, then the completion's
    assert offsets[0] == 0 and offsets[1:] == [offsets[i] + len(tokens[i]) for i in range(len(ids))]
    for i in range(1, len(full)):
        assert token_lps[i] == pytest.approx(float(ref[i - 1, full[i]]), abs=TOL), i
        top = tops[i]
        assert isinstance(top, dict) and 1 <= len(top) <= 2  # the top-1 token, and the chosen one if other
        if i < len(ids) or "\ufffd" not in tokens[i]:
            assert top.get(tokens[i]) == token_lps[i], (i, tokens[i], top)  # the chosen token is in it
        best = int(ref[i - 1].argmax())
        assert max(top.values()) == pytest.approx(float(ref[i - 1, best]), abs=TOL)
        if "\ufffd" not in tok.decode([best]):
            assert top.get(tok.decode([best])) == max(top.values()), (i, tok.decode([best]), top)
        if best == full[i]:  # lm-eval's is_greedy: token_logprobs[i] == max(top_logprobs[i].values()), exactly
            assert token_lps[i] == max(top.values())
    assert choice["finish_reason"] == "length"


def test_echo_logprobs_exact_lm_eval_body(server, model, tok):
    ids = tok.encode("In the beginning God created the heaven and the earth.")
    body = {"model": NAME, "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "text_completion" and out["model"] == NAME
    assert [c["index"] for c in out["choices"]] == [0]
    check_echo_logprobs(out["choices"][0], model, tok, ids)
    assert out["usage"]["prompt_tokens"] == len(ids) and out["usage"]["completion_tokens"] == 1


def test_echo_logprobs_batch_of_different_lengths(server, model, tok):
    texts = ["Jesus wept.", "And God said, Let there be light: and there was light.", " the"]
    prompts = [tok.encode(t) for t in texts]
    assert len(prompts[2]) == 1  # one token: its only logprob entry is the generated token's
    body = {"model": NAME, "prompt": prompts, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
            "seed": 1234}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for choice, ids in zip(choices, prompts, strict=True):
        check_echo_logprobs(choice, model, tok, ids)
