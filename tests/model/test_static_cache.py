"""Static cache + fixed-shape decode step: == growable-cache decode == full forward; no graph breaks."""

import pytest
import torch

from hybridlm.model.compiled import Compiled
from hybridlm.model.decode_step import decode_step
from hybridlm.model.static_cache import StaticCache
from hybridlm.serve.decoder import step_function

from helpers import left_padded_pair, small_model


def prefilled_static(model, ids, mask, slots, max_len):
    """Left-padded prefill on the growable cache, each row copied into its own slot."""
    growable = model.new_cache(ids.shape[0], capacity=ids.shape[1])
    model(ids, growable, attention_mask=mask)
    static = StaticCache.empty(model.cfg, slots, max_len)
    lengths = [static.write_slot(row, growable, row) for row in range(ids.shape[0])]
    return static, lengths


@pytest.mark.parametrize("options", [{}, {"attn_logit_softcap": 3.0, "mamba_proj_bias": True}])
def test_static_decode_equals_growable_decode_and_full_forward(options):
    model = small_model(seed=4, **options)
    a, b, ids, mask = left_padded_pair(13, 6, seed=4)
    steps = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        static, lengths = prefilled_static(model, ids, mask, slots=2, max_len=32)
        assert lengths == [13, 6] and static.lengths.tolist() == [13, 6]
        growable = model.new_cache(2)
        model(ids, growable, attention_mask=mask)
        for t in range(steps.shape[1]):
            fast = decode_step(model, static, steps[:, t])
            slow = model(steps[:, t:t + 1], growable)[:, -1]
            assert (fast - slow).abs().max() < 1e-5
        full_a = model(torch.cat([a, steps[:1]], dim=1))[0, 13:]
        full_b = model(torch.cat([b, steps[1:]], dim=1))[0, 6:]
        assert (fast[0] - full_a[-1]).abs().max() < 1e-4 and (fast[1] - full_b[-1]).abs().max() < 1e-4
        assert static.lengths.tolist() == [13 + 9, 6 + 9]


def test_free_slots_views_and_resize():
    """A free slot stays at length 0; first(n) writes through; resized() keeps every slot's state."""
    model = small_model(seed=6)
    a, b, ids, mask = left_padded_pair(10, 7, seed=6)
    with torch.inference_mode():
        static, _ = prefilled_static(model, ids, mask, slots=3, max_len=16)
        ref, _ = prefilled_static(model, ids, mask, slots=2, max_len=16)
        tok = torch.tensor([3, 4])
        fast = decode_step(model, static.first(2), tok)
        assert static.lengths.tolist() == [11, 8, 0]  # the views advanced the parent cache
        assert (fast - decode_step(model, ref, tok)).abs().max() < 1e-6
        bigger = static.resized(64)
        assert bigger.max_len == 64 and bigger.lengths.tolist() == [11, 8, 0]
        tok = torch.tensor([5, 6, 0])
        assert (decode_step(model, bigger, tok)[:2] - decode_step(model, ref, tok[:2])).abs().max() < 1e-5
        static.free_slot(0)
        assert static.lengths.tolist() == [0, 8, 0] and static.active.tolist() == [0, 1, 0]


def test_write_slot_refuses_a_sequence_longer_than_the_cache():
    model = small_model()
    with torch.inference_mode():
        growable = model.new_cache(1)
        model(torch.zeros(1, 9, dtype=torch.long), growable)
        with pytest.raises(ValueError, match="does not fit a static cache of 8"):
            StaticCache.empty(model.cfg, 1, 8).write_slot(0, growable)
    with pytest.raises(ValueError, match="slots >= 1"):
        StaticCache.empty(model.cfg, 0, 8)


def test_zero_graph_breaks_in_forward_and_decode_step():
    model = small_model(seed=7)
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :4] = False
    with torch.inference_mode():
        for fn, args in [(model, (ids,)), (model, (ids, None, mask)),
                         (decode_step, (model, StaticCache.empty(model.cfg, 2, 16), ids[:, 0]))]:
            torch._dynamo.reset()
            explained = torch._dynamo.explain(fn)(*args)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert explained.graph_count == 1


def test_compiled_decode_step_equals_eager():
    """Inductor (as the decoder uses it on this device) on a 1-layer-per-kind model (compiles in
    seconds), against the eager step."""
    model = small_model(seed=8, pattern="M*-", d_model=32, n_heads=2, n_kv_heads=1, ffn_dim=32)
    a, b, ids, mask = left_padded_pair(7, 4, seed=8)
    compiled = step_function(True, torch.device("cpu"))
    with torch.inference_mode():
        eager_cache, _ = prefilled_static(model, ids, mask, 2, 16)
        fast_cache, _ = prefilled_static(model, ids, mask, 2, 16)
        for t in range(3):
            tok = torch.tensor([t + 1, t + 2])
            assert (compiled(model, fast_cache, tok) - decode_step(model, eager_cache, tok)).abs().max() < 1e-5
    assert compiled.fallback_reason is None and compiled.compile_seconds > 0
    assert fast_cache.lengths.tolist() == eager_cache.lengths.tolist() == [10, 7]


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(*args, **kwargs):
        def fail(*a):
            raise RuntimeError("no C++ compiler found")
        return fail
    monkeypatch.setattr(torch, "compile", broken)
    model = small_model(seed=9)
    step = Compiled(decode_step)
    with torch.inference_mode():
        cache = StaticCache.empty(model.cfg, 1, 8)
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*running eagerly"):
            out = step(model, cache, torch.tensor([1]))
        ref = decode_step(model, StaticCache.empty(model.cfg, 1, 8), torch.tensor([1]))
        assert (out - ref).abs().max() == 0
        step(model, cache, torch.tensor([2]))  # no second warning, still eager
    assert step.fallback_reason == "RuntimeError: no C++ compiler found" and cache.lengths.tolist() == [0]


def test_last_only_logits_equal_the_last_position():
    model = small_model(seed=10)
    ids = torch.randint(0, 97, (2, 13))
    with torch.inference_mode():
        last = model(ids, last_only=True)
        assert last.shape == (2, 1, 97) and (last - model(ids)[:, -1:]).abs().max() < 1e-6


def test_a_failing_recompilation_falls_back_to_eager(monkeypatch):
    """A new shape past dynamo's recompilation limit: a warning, then eager, never an error."""
    monkeypatch.setattr(Compiled, "RECOMPILE_LIMIT", 1)
    torch._dynamo.reset()

    def double(x):
        return x * 2

    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch would break torch's config module)
        compiled = Compiled(double)
        assert torch.equal(compiled(torch.ones(3)), torch.full((3,), 2.0)) and compiled.fallback_reason is None
        with pytest.warns(RuntimeWarning, match="running eagerly"):
            assert torch.equal(compiled(torch.ones(5)), torch.full((5,), 2.0))  # a 2nd shape: recompile refused
        assert compiled.fallback_reason is not None
        assert torch.equal(compiled(torch.ones(7)), torch.full((7,), 2.0))
    assert torch._dynamo.config.recompile_limit >= 8
