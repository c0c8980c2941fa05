"""Vectorised sampling: per-row settings in one call == the readable reference filters == row alone."""

import torch

from hybridlm.serve.generation import generate
from hybridlm.serve.sampling import (SamplingParams, filter_logits, ranked_probs, row_settings, sample_next,
                                     sample_rows)

from helpers import small_model

SETTINGS = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_k=5),
            SamplingParams(temperature=1.3, top_p=0.8), SamplingParams(temperature=0.9, top_k=20, top_p=0.6),
            SamplingParams(temperature=2.0, top_k=1)]


def test_ranked_probs_equal_the_reference_filters():
    logits = torch.randn(len(SETTINGS), 50, generator=torch.Generator().manual_seed(0)) * 3
    probs, order = ranked_probs(logits, *row_settings(SETTINGS))
    by_id = torch.zeros_like(probs).scatter(1, order, probs)
    for row, p in enumerate(SETTINGS):
        ref = torch.softmax(filter_logits(logits[row:row + 1] / p.temperature, p.top_k, p.top_p), dim=-1)[0]
        assert (by_id[row] - ref).abs().max() < 1e-6


def test_inverse_cdf_picks_by_cumulative_mass():
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25]]))
    one = torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0])
    # ranked: id 1 (0.5), id 3 (0.25), id 2 (0.15), id 0 (0.1)
    picks = [sample_rows(logits, *one, torch.tensor([u])).item() for u in (0.0, 0.49, 0.51, 0.74, 0.76, 0.89, 0.91)]
    assert picks == [1, 1, 3, 3, 2, 2, 0]
    nucleus = torch.tensor([1.0]), torch.tensor([0]), torch.tensor([0.7])  # keeps ids 1 and 3 (0.5 + 0.25)
    assert sample_rows(logits, *nucleus, torch.tensor([0.999])).item() == 3
    greedy = torch.tensor([0.0]), torch.tensor([0]), torch.tensor([1.0])
    assert sample_rows(logits, *greedy, torch.tensor([0.999])).item() == 1


def test_one_call_for_all_rows_equals_each_row_alone():
    logits = torch.randn(len(SETTINGS), 64, generator=torch.Generator().manual_seed(1))
    draws = torch.rand(len(SETTINGS), generator=torch.Generator().manual_seed(2))
    batched = sample_rows(logits, *row_settings(SETTINGS), draws)
    for row, p in enumerate(SETTINGS):
        alone = sample_rows(logits[row:row + 1], *row_settings([p]), draws[row:row + 1])
        assert batched[row] == alone[0]


def test_sampled_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([0.1, 0.5, 0.15, 0.25]))
    gen = torch.Generator().manual_seed(3)
    tokens = sample_next(logits.expand(20_000, 4), SamplingParams(temperature=1.0), gen)
    freq = torch.bincount(tokens, minlength=4).float() / 20_000
    assert (freq - logits.exp()).abs().max() < 0.015


def test_generate_with_compile_equals_eager():
    model = small_model(seed=3, pattern="M*-", d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=32)
    for prompts, params in (([[5, 6, 7, 8], [9, 10]], SamplingParams(max_new_tokens=5, temperature=0)),
                            ([[5, 6, 7]], SamplingParams(max_new_tokens=5, temperature=0.8, top_k=10, seed=4))):
        # (one row: the compiled step's batch-1 matmuls are multiply-sum reductions)
        assert generate(model, prompts, params, compile=True) == generate(model, prompts, params)
