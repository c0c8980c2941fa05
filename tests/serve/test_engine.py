"""Continuous-batching engine: batched == alone, join/leave, stops, aborts, the slot cache."""

import threading
import time

import pytest
import torch

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.serve.detokenize import IncrementalDetokenizer
from hybridlm.serve.engine import Engine, QueueFull, Request, wait_idle
from hybridlm.serve.generation import generate
from hybridlm.serve.sampling import SamplingParams
from hybridlm.training.tokenizer import default_tokenizer

from helpers import TINY_MODEL, small_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], [20, 21, 22, 23, 24], [7] * 30, [1, 2, 3],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
LENGTHS = [10, 25, 5, 17, 30, 12]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return small_model(mamba_proj_bias=True)


@pytest.fixture(scope="module")
def text_model():
    """The default vocabulary, so the bundled tokenizer can turn its tokens into text."""
    torch.manual_seed(3)
    return HybridLM(HybridConfig(**TINY_MODEL)).eval()


def alone(model, prompt, params):
    return generate(model, [prompt], params)[0]


def greedy_request(engine, got, prompt, n):
    """Submit a greedy request whose tokens collect in got[request_id]."""
    r = Request(prompt, SamplingParams(max_new_tokens=n, temperature=0),
                on_output=lambda o: got.setdefault(o.request_id, []).extend(o.token_ids))
    engine.submit(r)
    return r


def test_cache_join_select_trim_equals_separate_caches(model):
    """Reference: every sequence decoded on its own cache. Joined (right-aligned, masked) rows must agree."""
    prompts, steps = PROMPTS[:3], [[1, 2], [3, 4], [5, 6]]
    single, joined = [], None
    with torch.no_grad():
        for p in prompts:
            c = model.new_cache(1, capacity=len(p) + 1)
            model(torch.tensor([p]), c)
            single.append(c)
            c2 = model.new_cache(1, capacity=len(p) + 1)
            model(torch.tensor([p]), c2)
            joined = c2 if joined is None else (joined.add_rows(c2) or joined)
        assert joined.seen == max(map(len, prompts)) and joined.has_padding
        assert joined.mask.sum(1).tolist() == [len(p) for p in prompts]
        ref = torch.cat([model(torch.tensor([[s[0]]]), c)[:, -1] for s, c in zip(steps, single)])
        got = model(torch.tensor([[s[0]] for s in steps]), joined)[:, -1]
        assert (got - ref).abs().max() < 1e-5
        # the longest sequence leaves: its columns go, the others are unchanged
        joined.select(torch.tensor([1, 2]))
        joined.trim()
        assert joined.seen == len(prompts[2]) + 1
        ref = torch.cat([model(torch.tensor([[s[1]]]), c)[:, -1] for s, c in zip(steps[1:], single[1:])])
        got = model(torch.tensor([[s[1]] for s in steps[1:]]), joined)[:, -1]
        assert (got - ref).abs().max() < 1e-5


def test_batched_greedy_equals_single_requests(model):
    """3 slots for 6 requests: they queue, join mid-generation and leave at different steps."""
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in LENGTHS]
    engine = Engine(model, max_batch=3)
    out = engine.generate(PROMPTS, params)
    for p, sp, res in zip(PROMPTS, params, out):
        assert res.token_ids == alone(model, p, sp)
        assert res.finish_reason == "length" and res.completion_tokens == sp.max_new_tokens
        assert res.prompt_tokens == len(p)
    assert engine.num_running == 0 and engine.stats["decode_tokens"] == sum(LENGTHS) - len(LENGTHS)


def test_seeded_sampling_equals_single_requests(model):
    """Each request has its own generator: its samples do not depend on its batch mates."""
    params = [SamplingParams(max_new_tokens=n, temperature=t, top_k=k, top_p=tp, seed=100 + i)
              for i, (n, t, k, tp) in enumerate(zip(LENGTHS, [1.0, 0.7, 1.3, 0.9, 1.0, 0],
                                                    [None, 20, 30, None, 10, None], [0.9, None, 0.95, None, None, None]))]
    out = Engine(model, max_batch=4).generate(PROMPTS, params)
    for p, sp, res in zip(PROMPTS, params, out):
        assert res.token_ids == alone(model, p, sp)
    again = Engine(model, max_batch=2).generate(PROMPTS, params)
    assert [r.token_ids for r in again] == [r.token_ids for r in out]


def test_join_and_leave_between_steps(model):
    engine = Engine(model, max_batch=4)
    got: dict[str, list[int]] = {}

    def request(prompt, n):
        return greedy_request(engine, got, prompt, n)

    a = request(PROMPTS[3], 20)
    for _ in range(5):
        engine.step()
    assert engine.num_running == 1 and len(got[a.request_id]) == 6  # prefill token + 5 decode steps
    b, c = request(PROMPTS[1], 4), request(PROMPTS[0], 30)
    engine.step()
    assert engine.num_running == 3
    for _ in range(4):
        engine.step()
    assert engine.num_running == 2  # b left after its 4 tokens
    d = request(PROMPTS[5], 3)
    engine.run_until_idle()
    for r in (a, b, c, d):
        assert got[r.request_id] == alone(model, r.prompt_ids, r.params)
    assert engine._cache is None  # an idle engine holds no cache


def test_long_prompt_joins_without_stalling_running_streams(model):
    """Chunked prefill under a token budget: while a 40-token prompt joins (4-token chunks, 8 tokens
    a step), the running request still gets one token every step."""
    engine = Engine(model, max_batch=2, prefill_chunk=4, prefill_tokens_per_step=8)
    got: dict[str, list[int]] = {}

    def request(prompt, n):
        return greedy_request(engine, got, prompt, n)

    a = request(PROMPTS[1], 30)
    engine.step()
    assert len(got[a.request_id]) == 2
    long = request([(7 * i) % 97 for i in range(40)], 5)
    for i in range(5):  # 40 prompt tokens, 8 per step
        chunks = engine.stats["prefill_chunks"]
        engine.step()
        assert engine.stats["prefill_chunks"] == chunks + 2
        assert len(got[a.request_id]) == 3 + i                       # a never waited
        assert len(got.get(long.request_id, [])) == (2 if i == 4 else 0)  # first token + this step's decode
    engine.run_until_idle()
    for r in (a, long):
        assert got[r.request_id] == alone(model, r.prompt_ids, r.params)


def test_a_join_copies_no_running_request(model):
    """Joining writes into a free slot: the shared buffers stay where they are, the running slot's
    cached keys are untouched."""
    engine = Engine(model, max_batch=3)
    first = Request(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0))
    engine.submit(first)
    engine.step()
    kv = next(layer for layer in engine._cache.layers if hasattr(layer, "k"))
    pointer, keys = kv.k.data_ptr(), kv.k[0, :, :12].clone()
    engine.submit(Request(PROMPTS[3], SamplingParams(max_new_tokens=5, temperature=0)))
    engine.step()
    assert engine.num_running == 2 and kv.k.data_ptr() == pointer and engine._cache.layers[1] is kv
    assert torch.equal(kv.k[0, :, :12], keys)
    engine.run_until_idle()


def test_compiled_engine_equals_single_requests():
    model = small_model(seed=2, pattern="M*-", d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=32)
    params = [SamplingParams(max_new_tokens=n, temperature=0.8 if i % 2 else 0, seed=i)
              for i, n in enumerate(LENGTHS[:4])]
    engine = Engine(model, max_batch=2, compile=True)
    out = engine.generate(PROMPTS[:4], params)
    assert [r.token_ids for r in out] == [alone(model, p, sp) for p, sp in zip(PROMPTS[:4], params)]
    assert engine.compile_seconds > 0


def test_eos_finishes_a_request(model):
    free = alone(model, PROMPTS[1], SamplingParams(max_new_tokens=12, temperature=0))
    eos = free[4]
    (res,) = Engine(model).generate([PROMPTS[1]], SamplingParams(max_new_tokens=12, temperature=0, eos_id=eos))
    assert res.finish_reason == "stop"
    assert res.token_ids == free[: free.index(eos)]  # the EOS itself is not returned...
    assert res.completion_tokens == free.index(eos) + 1  # ...but counted


def test_stop_strings_and_streamed_text(text_model):
    tok = default_tokenizer()
    prompt = tok.encode("In the beginning God created")
    engine = Engine(text_model, tok)
    greedy = SamplingParams(max_new_tokens=40, temperature=0, eos_id=None)
    (full,) = engine.generate([prompt], greedy)
    assert full.text == tok.decode(full.token_ids) and full.finish_reason == "length"
    text = full.text
    stop = text[10:14]
    pieces: list[str] = []
    r = Request(prompt, greedy, stop=["zzzz-never", stop], on_output=lambda o: pieces.append(o.text))
    engine.submit(r)
    engine.run_until_idle()
    assert "".join(pieces) == text[: text.find(stop)]
    assert all(stop not in p for p in pieces)
    # a stop string that never appears changes nothing; the held-back tail is sent at the end
    (same,) = engine.generate([prompt], greedy, stop=[text[-3:] + "\x00"])
    assert same.text == text and same.finish_reason == "length"


def test_incremental_detokenizer_matches_full_decode():
    tok = default_tokenizer()
    text = "héllo wörld — naïve café, 日本語 🙂 and plain ASCII at the end."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_abort_frees_the_slot(model):
    engine = Engine(model, max_batch=2, max_model_len=100_000)
    engine.start()
    try:
        seen, finished = [], threading.Event()
        reasons = []

        def on_output(o):
            seen.append(o)
            if o.finished:
                reasons.append(o.finish_reason)
                finished.set()
        r = Request(PROMPTS[0], SamplingParams(max_new_tokens=50_000, temperature=0), on_output=on_output)
        engine.submit(r)
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        engine.abort(r.request_id)
        assert finished.wait(10) and reasons == ["abort"]
        assert wait_idle(engine) and engine._cache is None and engine.stats["aborted"] == 1
        # the engine goes on serving
        (res,) = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=5, temperature=0))
        assert res.token_ids == alone(model, PROMPTS[1], SamplingParams(max_new_tokens=5, temperature=0))
    finally:
        engine.stop()


def test_stop_aborts_what_is_left(model):
    engine = Engine(model, max_batch=1, max_model_len=100_000)
    reasons = []
    for p in PROMPTS[:3]:
        engine.submit(Request(p, SamplingParams(max_new_tokens=50_000, temperature=0),
                              on_output=lambda o: o.finished and reasons.append(o.finish_reason)))
    engine.step()
    engine.stop()
    assert reasons == ["abort"] * 3 and engine.num_running == engine.num_waiting == 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompt_ids=[]), "at least one token"),
    (dict(prompt_ids=[1, 500]), r"\[0, 97\)"),
    (dict(params=SamplingParams(max_new_tokens=0)), "max_new_tokens"),
    (dict(params=SamplingParams(temperature=-1)), "temperature"),
    (dict(params=SamplingParams(max_new_tokens=2046)), "context limit"),
    (dict(stop=["x"]), "tokenizer"),
])
def test_bad_requests_rejected(model, kwargs, match):
    engine = Engine(model)
    req = Request(**{"prompt_ids": [1, 2, 3], **kwargs})
    with pytest.raises(ValueError, match=match):
        engine.submit(req)
    assert engine.num_waiting == 0


def test_queue_limit(model):
    engine = Engine(model, max_batch=1, max_queue=2)
    for _ in range(3):
        engine.submit(Request([1, 2], SamplingParams(max_new_tokens=2, temperature=0)))
    with pytest.raises(QueueFull):
        engine.submit(Request([1, 2], SamplingParams(max_new_tokens=2, temperature=0)))
    engine.run_until_idle()
    engine.submit(Request([1, 2], SamplingParams(max_new_tokens=2, temperature=0)))  # room again


def test_generate_on_the_engine_thread(model):
    engine = Engine(model, max_batch=2)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=6, temperature=0)
        out = engine.generate(PROMPTS, params)
        assert [r.token_ids for r in out] == [alone(model, p, params) for p in PROMPTS]
    finally:
        engine.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_equals_single_requests_on_cuda():
    model = small_model(mamba_proj_bias=True).cuda()
    greedy = [SamplingParams(max_new_tokens=n, temperature=0) for n in LENGTHS]
    seeded = [SamplingParams(max_new_tokens=n, temperature=0.8, top_k=20, seed=i) for i, n in enumerate(LENGTHS)]
    engine = Engine(model, max_batch=3)
    for params in (greedy, seeded):
        out = engine.generate(PROMPTS, params)
        assert [r.token_ids for r in out] == [alone(model, p, sp) for p, sp in zip(PROMPTS, params)]
