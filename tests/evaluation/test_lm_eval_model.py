"""`HybridLMEval` (lm-eval's LM interface, in process) against plain forward passes and `generate`; the bundled
tasks through `evaluate_tasks`; a tiny trained model above chance on the verse-completion task."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import lm_eval  # (a test dependency: pyproject's [test] extra)
import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.utils import get_rolling_token_windows

from hybridlm.evaluation import evaluate_tasks
from hybridlm.evaluation.harness import import_lm_eval, task_manager
from hybridlm.evaluation.lm_eval_model import HybridLMEval
from hybridlm.evaluation.tasks import KJV_TASK, REASONING_TASK, kjv_verse_docs, kjv_verses
from hybridlm.interop.chat_template import read_chat_template_file
from hybridlm.interop.checkpoint import load_model, save_model
from hybridlm.serve.generation import generate
from hybridlm.tasks.reasoning import Problem, chat_messages, generate_problems, is_correct
from hybridlm.training.tokenizer import Tokenizer, default_tokenizer

from helpers import text_model

pytestmark = pytest.mark.usefixtures("one_thread")
TEMPLATE = Path(__file__).parents[1] / "data" / "nano2_like_chat_template.jinja"
TOL = 1e-9  # float64 model


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


@pytest.fixture(scope="module")
def model64():
    return text_model(context=64, seed=3).double()


# ---- the reference: one unpadded forward per request ---------------------------------------------
@torch.no_grad()
def log_probs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float64 log-softmax of one forward of `ids` alone."""
    return torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)


def reference(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    rows = log_probs(model, ctx + cont)[len(ctx) - 1:len(ctx) + len(cont) - 1]
    target = torch.tensor(cont)
    return float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's encoding for causal models: trailing context whitespace joins the continuation; an empty
    context is the EOS token."""
    if not context:
        return [tok.eos_id], tok.encode(continuation)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tok.encode(context + continuation), tok.encode(context)
    return ctx, whole[len(ctx):]


def greedy_tokens(model, ids: list[int], n: int) -> list[int]:
    ids = list(ids)
    for _ in range(n):
        ids.append(int(log_probs(model, ids)[-1].argmax()))
    return ids[-n:]


PAIRS = [("In the beginning God created the heaven", " and the earth."), ("", "Amen"),
         ("And the earth was without form, and void; ", "and darkness was upon the face of the deep."),
         ("Jesus", " wept."), ("Thou shalt not", " kill.")]


# ---- loglikelihood -------------------------------------------------------------------------------
def test_loglikelihood_equals_full_forward_at_any_padding(model64, tok):
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    lengths = {sum(map(len, encode_pair(tok, *pair))) for pair in PAIRS}
    assert len(lengths) == len(PAIRS)  # every row of a batch is padded differently
    batched = HybridLMEval(model64, tok, batch_size=8).loglikelihood(requests, disable_tqdm=True)
    alone = HybridLMEval(model64, tok, batch_size=1).loglikelihood(requests, disable_tqdm=True)
    for pair, got, single in zip(PAIRS, batched, alone, strict=True):
        ll, greedy = reference(model64, *encode_pair(tok, *pair))
        assert got[0] == pytest.approx(ll, abs=TOL) and single[0] == pytest.approx(ll, abs=TOL), pair
        assert got[1] == single[1] == greedy


def test_is_greedy(model64, tok):
    lm = HybridLMEval(model64, tok, batch_size=4)
    ctxs = [tok.encode("And God said"), tok.encode("The LORD is my shepherd; I shall not"), tok.encode("Amen")]
    requests = []
    for ctx in ctxs:
        best = greedy_tokens(model64, ctx, 3)
        other = best[:2] + [(best[2] + 1) % tok.vocab_size]  # the last token is not the argmax
        requests += [(("", ""), ctx, best), (("", ""), ctx, other)]
    got = lm._loglikelihood_tokens(requests)
    assert [g for _, g in got] == [True, False] * len(ctxs)
    for (_, ctx, cont), (ll, _) in zip(requests, got):
        assert ll == pytest.approx(reference(model64, ctx, cont)[0], abs=TOL)


def test_inputs_longer_than_max_length_keep_their_end(model64, tok):
    lm = HybridLMEval(model64, tok, max_length=12)
    ctx, cont = tok.encode("And God called the light Day, and the darkness he called Night."), tok.encode(" And")
    assert len(ctx) + len(cont) > 13
    (ll, _), = lm._loglikelihood_tokens([(("", ""), ctx, cont)])
    kept = (ctx + cont)[-13:]
    assert ll == pytest.approx(reference(model64, kept[:-len(cont)], cont)[0], abs=TOL)


# ---- loglikelihood_rolling ---------------------------------------------------------------------
def test_loglikelihood_rolling(model64, tok):
    max_length = 12
    lm = HybridLMEval(model64, tok, batch_size=3, max_length=max_length)
    short = "And God saw the light, that it was good"
    long = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
            "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters.")
    s_ids, l_ids = tok.encode(short), tok.encode(long)
    assert len(s_ids) < max_length < 2 * max_length < len(l_ids)
    requests = [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate([short, long])]
    got = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    full = log_probs(model64, [tok.eos_id] + s_ids)
    assert got[0] == pytest.approx(float(sum(full[i, t] for i, t in enumerate(s_ids))), abs=TOL)
    windows = list(get_rolling_token_windows(l_ids, tok.eos_id, max_length, 1))
    assert [t for _, pred in windows for t in pred] == l_ids  # every token predicted once
    assert len(windows) > 3 and all(len(inp) == max_length for inp, _ in windows)
    assert len(windows[-1][1]) < max_length  # the last window predicts a few tokens with a full context
    expected = 0.0
    for inp, pred in windows:  # each window alone: its last len(pred) positions predict `pred`
        lp = log_probs(model64, inp)
        expected += float(sum(lp[len(inp) - len(pred) + j, t] for j, t in enumerate(pred)))
    assert got[1] == pytest.approx(expected, abs=TOL)


# ---- generate_until ----------------------------------------------------------------------------
def test_generate_until_equals_greedy_generate(model64, tok):
    contexts = ["In the beginning", "And it came to pass, when men began to multiply on the face", "Amen"]
    n = 10
    full = [tok.decode([t for t in generate(model64, [tok.encode(c)], max_new_tokens=n, temperature=0,
                                            eos_id=tok.eos_id)[0] if t != tok.eos_id]) for c in contexts]
    stop = next(tok.decode([t]) for t in generate(model64, [tok.encode(contexts[0])], max_new_tokens=n,
                                                  temperature=0)[0][3:]
                if len(tok.decode([t]).strip()) >= 2 and "\ufffd" not in tok.decode([t]))
    assert stop in full[0]
    lm = HybridLMEval(model64, tok, batch_size=2)  # three requests, two rows: continuous batching
    requests = [Instance("generate_until", {}, (c, {"until": [stop], "max_gen_toks": n}), i)
                for i, c in enumerate(contexts)]
    requests += [Instance("generate_until", {}, (c, {"max_gen_toks": 6}), 3 + i) for i, c in enumerate(contexts)]
    got = lm.generate_until(requests, disable_tqdm=True)
    assert got[:3] == [text[:text.index(stop)] if stop in text else text for text in full]
    assert len(got[0]) < len(full[0])  # it did stop at `until`
    short = [tok.decode([t for t in generate(model64, [tok.encode(c)], max_new_tokens=6, temperature=0,
                                             eos_id=tok.eos_id)[0] if t != tok.eos_id]) for c in contexts]
    assert got[3:] == short


# ---- lm-eval's contract: the registry, arguments, an optional dependency ----------------------------
@pytest.mark.slow
def test_registered_model_from_a_checkpoint(tmp_path, tok):
    from lm_eval.api.registry import get_model

    assert get_model("hybridlm") is HybridLMEval
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"  # lm-eval's own models still resolve
    model = text_model(context=128, seed=5)
    ckpt = save_model(model, tmp_path / "ckpt")
    tok.save(ckpt / "tokenizer.json")
    results = lm_eval.simple_evaluate(model="hybridlm", model_args={"ckpt": str(ckpt)}, tasks=[KJV_TASK],
                                      task_manager=task_manager([KJV_TASK], metadata={"kjv_docs": 3}),
                                      batch_size=4, limit=3, bootstrap_iters=0)
    samples = results["samples"][KJV_TASK]
    assert len(samples) == 3 and results["config"]["model"] == "hybridlm"
    loaded = load_model(ckpt)
    for s in samples:
        for (context, continuation), (ll, _) in zip(s["arguments"], s["filtered_resps"], strict=True):
            assert ll == pytest.approx(reference(loaded, *encode_pair(tok, context, continuation))[0], abs=1e-4)
    with pytest.raises(ValueError, match="ckpt"):
        HybridLMEval()
    with pytest.raises(ValueError, match="batch_size"):
        HybridLMEval(model, tok, batch_size="auto")


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'lm_eval\[api\]"):
        import_lm_eval()


def test_task_directory_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="task directory"):
        task_manager([KJV_TASK], include_path=tmp_path / "nope")


def test_chat_template_is_the_tokenizers_else_the_bundled_one(tok):
    from hybridlm.training.sft_render import default_chat_template

    problem = generate_problems(1, "test")[0]
    for think in (True, False):
        prompt = chat_messages(problem, think)[:2]
        plain = HybridLMEval(text_model(), tok).apply_chat_template(prompt)
        assert plain == default_chat_template().render(prompt, add_generation_prompt=True)
        chat_tok = Tokenizer(tok.backend, tok.eos_token, chat_template=read_chat_template_file(TEMPLATE))
        own = HybridLMEval(text_model(), chat_tok).apply_chat_template(prompt)
        assert own == chat_tok.chat_template.render(prompt, add_generation_prompt=True) != plain
        assert own.endswith("<think>\n" if think else "<think></think>")


def test_kjv_verse_docs():
    docs = kjv_verse_docs(50, seed=1, n_choices=3, n_words=2, books="Genesis,Exodus")
    assert docs == kjv_verse_docs(50, seed=1, n_choices=3, n_words=2, books=["Genesis", "Exodus"])
    verses = {line for _, line in kjv_verses()}
    for d in docs:
        assert d["verse"] in verses and d["verse"].split(" ")[0] in ("Genesis", "Exodus")
        assert len(d["choices"]) == len(set(d["choices"])) == 3
        assert d["context"] + " " + d["choices"][d["label"]] == d["verse"]  # the true ending
        assert all(len(c.split(" ")) == 2 for c in d["choices"])
    assert len({d["label"] for d in docs}) == 3  # the answer's position varies
    with pytest.raises(ValueError, match="book"):
        kjv_verse_docs(5, books="Hezekiah")
    with pytest.raises(ValueError, match="qualify"):
        kjv_verse_docs(100, books="Jude")


# ---- evaluate_tasks on the bundled tasks -------------------------------------------------------
@pytest.mark.slow
def test_evaluate_tasks_on_both_bundled_tasks(tok):
    template = read_chat_template_file(TEMPLATE)
    chat_tok = Tokenizer(tok.backend, tok.eos_token, chat_template=template)
    model = text_model(context=512, seed=2)
    results = evaluate_tasks(model, chat_tok, f"{KJV_TASK},{REASONING_TASK}", limit=4, batch_size=4,
                             gen_kwargs={"max_gen_toks": 12}, metadata={"kjv_docs": 10, "reasoning_docs": 10},
                             log_samples=True)
    kjv, reasoning = results["results"][KJV_TASK], results["results"][REASONING_TASK]
    assert {"acc,none", "acc_norm,none"} <= set(kjv) and "exact_match,none" in reasoning
    samples = results["samples"]
    assert len(samples[KJV_TASK]) == len(samples[REASONING_TASK]) == 4
    for s in samples[KJV_TASK]:
        lls = [ll for ll, _ in s["filtered_resps"]]
        assert s["acc"] == float(max(range(len(lls)), key=lls.__getitem__) == s["doc"]["label"])
        assert [c for _, c in s["arguments"]] == [" " + c for c in s["doc"]["choices"]]
    assert kjv["acc,none"] == pytest.approx(sum(s["acc"] for s in samples[KJV_TASK]) / 4)
    for s in samples[REASONING_TASK]:
        problem = Problem(**{k: s["doc"][k] for k in ("kind", "key", "question", "trace", "answer")})
        (context, gen_kwargs), = s["arguments"]
        # the prompt is exactly the SFT prefix: [system /think, user question] + the generation prompt
        assert context == chat_tok.chat_template.render(chat_messages(problem)[:2], add_generation_prompt=True)
        assert context.endswith("Assistant\n<think>\n") and gen_kwargs["max_gen_toks"] == 12
        assert s["exact_match"] == float(is_correct(s["filtered_resps"][0], problem))
    assert reasoning["exact_match,none"] == pytest.approx(sum(s["exact_match"] for s in samples[REASONING_TASK]) / 4)


# ---- a tiny trained model beats chance ---------------------------------------------------------
def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.slow
def test_tiny_trained_model_beats_chance_on_verses(small_shards, tiny_model_file, tmp_path, tok):
    from hybridlm.training.loop import train
    from hybridlm.training.train_config import TrainConfig

    summary = train(TrainConfig(model=tiny_model_file, data=str(small_shards), out=str(tmp_path / "run"), steps=200,
                                batch_size=4, seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=10, eval_every=0,
                                eval_batches=0, save_every=0, keep_last=1, log_every=50, progress=False, device="cpu"))
    model = load_model(Path(summary["run_dir"]) / "final")
    # the last word of 200 verses of Genesis (the training text), against those of 3 other verses
    results = evaluate_tasks(model, tok, [KJV_TASK], batch_size=32, log_samples=True,
                             metadata={"kjv_books": "Genesis", "kjv_docs": 200, "kjv_words": 1})
    samples = results["samples"][KJV_TASK]
    n, correct = len(samples), round(sum(s["acc"] for s in samples))
    choices = {len(s["doc"]["choices"]) for s in samples}
    assert n == 200 and choices == {4}
    p_value = binomial_tail(correct, n, 1 / 4)  # chance: one of four
    assert p_value < 1e-4, (correct, n, p_value)
