"""Engine: every accepted sampling value is safe, one failing row ends its request alone,
log-probs equal the full forward's log_softmax, prompt scoring, and the thinking budget."""

import math

import pytest
import torch

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.serve.engine import Engine, Request
from hybridlm.serve.generation import generate
from hybridlm.serve.sampling import SamplingParams
from hybridlm.serve.thinking import FORCED_CLOSE
from hybridlm.training.tokenizer import default_tokenizer

from helpers import TINY_MODEL, small_model

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


@pytest.fixture(scope="module")
def model():
    return small_model()


def greedy(n, **kw):
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


def collect(engine, reqs):
    """Submit requests, run the engine, return each one's outputs."""
    outs = {r.request_id: [] for r in reqs}
    for r in reqs:
        r.on_output = outs[r.request_id].append
        engine.submit(r)
    engine.run_until_idle()
    return [outs[r.request_id] for r in reqs]


def tokens(outputs):
    return [t for o in outputs for t in o.token_ids]


@pytest.mark.parametrize("settings", [dict(temperature=3.5e-39), dict(temperature=1e-39), dict(temperature=1e-6),
                                      dict(temperature=1.0, top_p=5e-324), dict(temperature=2.0, top_p=1e-45)])
def test_extreme_sampling_values_are_greedy_and_harm_no_batch_mate(model, settings):
    """A subnormal temperature used to overflow float32 and fail the whole batch; a top_p that
    rounds to 0 used to drop every token. Both are greedy now."""
    reqs = [Request(PROMPTS[0], SamplingParams(max_new_tokens=40, seed=0, **settings)),
            Request(PROMPTS[1], greedy(40))]
    out = collect(Engine(model, max_batch=2), reqs)
    assert [o[-1].finish_reason for o in out] == ["length", "length"]
    assert tokens(out[0]) == generate(model, [PROMPTS[0]], greedy(40))[0]
    assert tokens(out[1]) == generate(model, [PROMPTS[1]], greedy(40))[0]


def nan_after(k):
    def processor(ids, logits):
        return logits if len(ids) < k else torch.full_like(logits, float("nan"))
    return processor


def raise_after(k):
    def processor(ids, logits):
        if len(ids) >= k:
            raise RuntimeError("boom")
        return logits
    return processor


@pytest.mark.parametrize("bad", [nan_after(3), raise_after(5)])
def test_a_failing_row_ends_its_request_alone(model, bad):
    seeded = SamplingParams(max_new_tokens=20, temperature=1.0, top_k=30, seed=11)
    reqs = [Request(PROMPTS[0], greedy(20)), Request(PROMPTS[1], greedy(20, logits_processors=[bad])),
            Request(PROMPTS[2], seeded)]
    out = collect(Engine(model, max_batch=3), reqs)
    assert out[1][-1].finish_reason == "error" and out[1][-1].error
    assert len(tokens(out[1])) in (3, 5)
    assert [o[-1].finish_reason for o in (out[0], out[2])] == ["length", "length"]
    assert tokens(out[0]) == generate(model, [PROMPTS[0]], greedy(20))[0]
    assert tokens(out[2]) == generate(model, [PROMPTS[2]], seeded)[0]


def full_forward_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float(), dim=-1)[0]   # (len, vocab)


def test_sampled_token_logprobs_equal_the_full_forward(model):
    reqs = [Request(p, SamplingParams(max_new_tokens=12, temperature=0.8, seed=i, logprobs=3))
            for i, p in enumerate(PROMPTS)]
    for req, out in zip(reqs, collect(Engine(model, max_batch=2), reqs)):
        entries = [lp for o in out for lp in o.logprobs]
        ids = req.prompt_ids + [e.token_id for e in entries]
        ref = full_forward_logprobs(model, ids)
        assert tokens(out) == [e.token_id for e in entries]
        for j, e in enumerate(entries):
            row = ref[len(req.prompt_ids) - 1 + j]
            assert abs(e.logprob - row[e.token_id].item()) < 1e-4
            top = torch.topk(row, 3)
            assert [t for t, _ in e.top] == top.indices.tolist()
            assert max(abs(a - b) for (_, a), b in zip(e.top, top.values.tolist())) < 1e-4


@pytest.mark.parametrize("max_new", [0, 3])
def test_prompt_logprobs_over_prefill_chunks_equal_the_full_forward(model, max_new):
    """Scoring a prompt (echo; max_tokens 0 scores it without generating) across 4-token prefill chunks."""
    prompt = [(11 * i + 3) % 97 for i in range(19)]
    params = SamplingParams(max_new_tokens=max_new, temperature=0, prompt_logprobs=2, logprobs=0)
    out = collect(Engine(model, prefill_chunk=4, prefill_tokens_per_step=4), [Request(prompt, params)])[0]
    scored = out[0].prompt_logprobs
    assert out[-1].finished and out[-1].finish_reason == "length" and len(tokens(out)) == max_new
    assert scored[0] is None and len(scored) == len(prompt)
    assert all(o.prompt_logprobs is None for o in out[1:])  # sent once
    ref = full_forward_logprobs(model, prompt)
    for i, e in enumerate(scored[1:], start=1):
        assert e.token_id == prompt[i] and abs(e.logprob - ref[i - 1, prompt[i]].item()) < 1e-4
        assert [t for t, _ in e.top] == torch.topk(ref[i - 1], 2).indices.tolist()


def test_max_tokens_zero_needs_prompt_scoring(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        Engine(model).submit(Request(PROMPTS[0], greedy(0)))


# ---- the thinking budget ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(3)
    return HybridLM(HybridConfig(**TINY_MODEL)).eval()


def forcing(sequence):
    """A logits processor that makes the model write `sequence` (then its last token forever)."""
    def processor(ids, logits):
        out = torch.full_like(logits, float("-inf"))
        out[sequence[min(len(ids), len(sequence) - 1)]] = 0.0
        return out
    return processor


def think_run(text_model, prompt, sequence, budget, n=20):
    tok = default_tokenizer()
    engine = Engine(text_model, tok)
    params = greedy(n, thinking_budget=budget, logits_processors=[forcing(sequence)])
    return tokens(collect(engine, [Request(tok.encode(prompt), params)])[0]), tok


@pytest.mark.parametrize("budget", [0, 1, 5])
def test_budget_closes_a_thinking_block_opened_by_the_prompt(text_model, budget):
    tok = default_tokenizer()
    word = tok.encode(" and")
    got, tok = think_run(text_model, "User: why?\nAssistant:<think>\n", word * 30, budget)
    close = tok.encode(FORCED_CLOSE)
    assert got == word * budget + close + word * (20 - budget - len(close))


def test_budget_counts_from_the_model_opening_think(text_model):
    tok = default_tokenizer()
    opener, word = tok.encode("<think>"), tok.encode(" so")
    got, _ = think_run(text_model, "Question:", opener + word * 30, 4)
    close = tok.encode(FORCED_CLOSE)
    assert got == opener + word * 4 + close + word * (20 - len(opener) - 4 - len(close))
    assert tok.decode(got).count("</think>") == 1


def test_no_forcing_without_thinking_or_within_budget(text_model):
    tok = default_tokenizer()
    word = tok.encode(" yea")
    got, _ = think_run(text_model, "Question:", word * 30, 2)  # never thinks: nothing to end
    assert got == word * 20
    closed = tok.encode("<think> a</think>") + word * 30
    got, _ = think_run(text_model, "Question:", closed, 100)  # closes by itself, within its budget
    assert got == closed[:20]


def test_thinking_budget_needs_a_tokenizer(model):
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model).submit(Request(PROMPTS[0], greedy(3, thinking_budget=2)))


def test_sampling_params_reject_bad_values():
    for bad in (dict(temperature=math.nan), dict(temperature=math.inf), dict(logprobs=21), dict(thinking_budget=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()
