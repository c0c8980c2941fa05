"""Generation: batching with left padding, seeded sampling, filters, stopping."""

import pytest
import torch

from hybridlm.serve.generation import generate
from hybridlm.serve.sampling import SamplingParams, filter_logits

from helpers import small_model

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [3, 4], [20, 21, 22, 23, 24]]


def test_batched_greedy_equals_single_requests():
    model = small_model(mamba_proj_bias=True)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    batched = generate(model, PROMPTS, params)
    assert batched == [generate(model, [p], params)[0] for p in PROMPTS]


def test_greedy_equals_argmax_of_full_forward():
    model = small_model(seed=5)
    new = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=6, temperature=0))[0]
    seq = list(PROMPTS[0])
    for tok in new:
        with torch.no_grad():
            assert model(torch.tensor([seq]))[0, -1].argmax().item() == tok
        seq.append(tok)


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = small_model()
    p = dict(max_new_tokens=12, temperature=1.0, top_k=30, top_p=0.95)
    a = generate(model, PROMPTS, SamplingParams(seed=1, **p))
    assert a == generate(model, PROMPTS, SamplingParams(seed=1, **p))
    assert a != generate(model, PROMPTS, SamplingParams(seed=2, **p))


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # nucleus 0.7: 0.5 + 0.25 reaches it, so the first two survive
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]
    assert not torch.isinf(filter_logits(logits, top_p=1.0)).any()


def test_eos_stops_a_sequence():
    model = small_model()
    free = generate(model, [PROMPTS[1]], SamplingParams(max_new_tokens=8, temperature=0))[0]
    eos = free[2]
    stopped = generate(model, [PROMPTS[1]], SamplingParams(max_new_tokens=8, temperature=0, eos_id=eos))[0]
    assert stopped == free[: free.index(eos) + 1]


@pytest.mark.parametrize("params,match", [
    (SamplingParams(max_new_tokens=-1), "max_new_tokens"),
    (SamplingParams(temperature=-0.5), "temperature"),
    (SamplingParams(top_k=0), "top_k"),
    (SamplingParams(top_p=1.5), "top_p"),
])
def test_bad_sampling_params(params, match):
    with pytest.raises(ValueError, match=match):
        generate(small_model(), PROMPTS, params)


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="at least one token"):
        generate(small_model(), [[1, 2], []])


def test_sampling_fields_as_keywords_equal_sampling_params_and_leave_them_unchanged():
    model = small_model(seed=6)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=5, seed=3)
    assert generate(model, PROMPTS, params) == generate(model, PROMPTS, max_new_tokens=8, temperature=0.9,
                                                        top_k=5, seed=3)
    assert generate(model, PROMPTS, params, temperature=0) == generate(model, PROMPTS, max_new_tokens=8,
                                                                       temperature=0)

    class Digits:  # a tokenizer: one token per digit, EOS = 0
        eos_id = 0

        def encode(self, text):
            return [int(c) for c in text]

        def decode(self, ids):
            return "".join(map(str, ids))

    from hybridlm.serve.generation import generate_text
    generate_text(model, Digits(), ["123"], params)
    assert params.eos_id is None  # the tokenizer's EOS was used without changing the caller's params
    with pytest.raises(TypeError, match="no_such_field"):
        generate(model, PROMPTS, no_such_field=1)
