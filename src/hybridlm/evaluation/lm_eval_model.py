"""`HybridLMEval`: lm-evaluation-harness's `LM` interface on a `HybridLM`, in this process (no server).

Registered as lm-eval model ``hybridlm`` on import, so after ``import hybridlm.evaluation.lm_eval_model``
``lm_eval.simple_evaluate(model="hybridlm", model_args={"ckpt": DIR}, tasks=[...])`` works (or pass
a built ``HybridLMEval(model, tokenizer)`` as ``model``). The three request types:

* ``loglikelihood`` - lm-eval's `TemplateLM` encodes each (context, continuation) pair (trailing
  spaces of the context move to the continuation; an empty context becomes the EOS token); requests
  are sorted longest first, right-padded into batches of ``batch_size`` and scored with one forward
  per batch (``attention_mask`` marking the padding): the sum of the continuation tokens' log-softmax
  and whether each of them is the argmax (``is_greedy``). Inputs longer than ``max_length`` keep their
  last ``max_length`` tokens.
* ``loglikelihood_rolling`` - a whole document's log-likelihood over the windows of
  `lm_eval.utils.get_rolling_token_windows` (EOS as the first token's context, windows of
  ``max_length`` tokens, every token predicted once), scored as loglikelihood requests.
* ``generate_until`` - the serving engine (`hybridlm.serve.engine.Engine`: inference cache, continuous
  batching of ``batch_size`` rows, greedy results equal to `generate`): greedy unless ``do_sample``,
  ``max_gen_toks`` new tokens at most, stopping at EOS and before the first ``until`` string; the
  context keeps its last ``max_length - max_gen_toks`` tokens. ``thinking_budget`` (a model argument or
  a generation argument) caps the tokens inside ``<think>`` as the server does.

Chat: ``apply_chat_template`` renders lm-eval's messages with the tokenizer's chat template (else the
bundled default template that SFT gives a base model, `hybridlm.training.sft_render.default_chat_template`),
as lm-eval's ``--apply_chat_template`` expects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..interop.chat_template import ChatTemplate, read_chat_template_file
from ..interop.convert import load as load_checkpoint
from ..model.lm import HybridLM
from ..model.norms import wide
from ..serve.engine import Engine
from ..serve.sampling import SamplingParams
from ..training.tokenizer import Tokenizer, default_tokenizer
from .harness import import_lm_eval

import_lm_eval()
# lm-eval's get_model() fills the registry with its own models only while the registry is empty: fill it first
importlib.import_module("lm_eval.models")
from lm_eval.api.model import TemplateLM  # noqa: E402
from lm_eval.api.registry import register_model  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
# (request strings or None, context ids, continuation ids): what TemplateLM hands `_loglikelihood_tokens`
TokenRequest = tuple[Any, list[int], list[int]]


def load_eval_tokenizer(ckpt: str | Path | None = None, tokenizer_path: str | Path | None = None,
                        chat_template: str | Path | None = None) -> Tokenizer:
    """``tokenizer_path``, else the checkpoint's tokenizer.json, else the bundled tokenizer; the chat
    template ``chat_template`` (a file or directory) overrides the tokenizer's own."""
    if tokenizer_path is not None:
        tok = Tokenizer.from_file(tokenizer_path)
    elif ckpt is not None and (Path(ckpt) / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(Path(ckpt) / "tokenizer.json")
    else:
        tok = default_tokenizer()
    if chat_template is not None:
        tok = Tokenizer(tok.backend, tok.eos_token, chat_template=read_chat_template_file(chat_template))
    return tok


@register_model("hybridlm")
class HybridLMEval(TemplateLM):
    """A `HybridLM` and its `Tokenizer` as an lm-eval model (see the module docstring).

    Build it from objects (``HybridLMEval(model, tokenizer)``) or, as lm-eval's ``model_args`` do,
    from a checkpoint: ``ckpt=DIR`` (``device``, ``dtype`` float32 | bfloat16 | float64,
    ``tokenizer_path``, ``chat_template``). ``max_length`` defaults to the model's ``max_seq_len``;
    ``compile`` runs generation's decode step through `torch.compile`.
    """

    def __init__(self, model: HybridLM | None = None, tokenizer: Tokenizer | None = None, ckpt: str | None = None,
                 tokenizer_path: str | None = None, chat_template: str | None = None, batch_size: int | str = 8,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 thinking_budget: int | None = None, device: str | None = None, dtype: str | None = None,
                 compile: bool = False) -> None:
        super().__init__()
        if model is None:
            if ckpt is None:
                raise ValueError("HybridLMEval needs a model, or ckpt=DIR (a hybridlm or Hugging Face checkpoint)")
            if dtype is not None and dtype not in DTYPES:
                raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
            model = load_checkpoint(ckpt, device=device or "cpu", dtype=DTYPES.get(dtype) if dtype else None)
        if tokenizer is None:
            tokenizer = load_eval_tokenizer(ckpt, tokenizer_path, chat_template)
        elif chat_template is not None:
            tokenizer = Tokenizer(tokenizer.backend, tokenizer.eos_token, read_chat_template_file(chat_template))
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model only {model.cfg.vocab_size}")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no EOS token (lm-eval conditions empty contexts on it)")
        self.model, self.tok = model.eval(), tokenizer
        self.batch_size = _positive_int(batch_size, "batch_size")
        self._max_length = _positive_int(max_length if max_length is not None else model.cfg.max_seq_len, "max_length")
        self.max_gen_toks = _positive_int(max_gen_toks, "max_gen_toks")
        self.thinking_budget, self.compile = thinking_budget, bool(compile)
        self._device = model.lm_head.weight.device
        self._engine: Engine | None = None

    # ---- what TemplateLM and the evaluator ask for ------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tok.encode(string)  # our tokenizers add no special tokens

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": self.model.num_params(), "model_dtype": str(self.model.lm_head.weight.dtype),
                "max_length": self.max_length}

    # ---- chat templates ----------------------------------------------------------------------------
    def _template(self) -> ChatTemplate:
        """The tokenizer's chat template, else the bundled one SFT uses for a base model without one."""
        if self.tok.chat_template is not None:
            return self.tok.chat_template
        from ..training.sft_render import default_chat_template
        return dataclasses.replace(default_chat_template(), eos_token=self.tok.eos_token)

    @property
    def tokenizer_name(self) -> str:
        """Fingerprints lm-eval's request cache: the vocabulary size and the chat template."""
        template = self._template().source
        return f"hybridlm-{self.tok.vocab_size}-{hashlib.sha256(template.encode()).hexdigest()[:12]}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self._template().source if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._template().render(chat_history, add_generation_prompt=add_generation_prompt)

    # ---- log-likelihoods ---------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of log-probs, is_greedy) of each continuation; batches of similar lengths, longest first."""
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        starts = range(0, len(order), self.batch_size)
        for start in tqdm(starts, desc="loglikelihood", disable=disable_tqdm or len(starts) < 2):
            idx = order[start:start + self.batch_size]
            for i, score in zip(idx, self._score_batch([requests[i][1:] for i in idx])):
                out[i] = score
                key = requests[i][0]
                if key is not None and None not in key:  # (rolling windows have no request strings)
                    self.cache_hook.add_partial("loglikelihood", key, score)
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One right-padded forward for (context ids, continuation ids) pairs."""
        rows = []
        for ctx, cont in pairs:
            if not cont or len(cont) > self.max_length:
                raise ValueError(f"a continuation must have 1 to max_length={self.max_length} tokens, got {len(cont)}")
            rows.append(((ctx + cont)[-(self.max_length + 1):][:-1], cont))  # inputs: the last token predicts nothing
        width = max(len(inp) for inp, _ in rows)
        pad = self.model.cfg.pad_token_id if self.model.cfg.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long, device=self._device)
        mask = torch.zeros(len(rows), width, dtype=torch.bool, device=self._device)
        for r, (inp, _) in enumerate(rows):
            ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long, device=self._device)
            mask[r, :len(inp)] = True
        logits = self.model(ids, attention_mask=mask)  # (b, width, vocab)
        scores = []
        for r, (inp, cont) in enumerate(rows):
            rows_logits = logits[r, len(inp) - len(cont):len(inp)]  # (n, vocab): the predictions of `cont`
            logp = torch.log_softmax(wide(rows_logits), dim=-1)
            target = torch.tensor(cont, dtype=torch.long, device=self._device)
            scores.append((float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())))
        return scores

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each document's total log-likelihood over lm-eval's rolling windows of ``max_length`` tokens."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(string), self.prefix_token_id, self.max_length, 1)):
                windows.append((None, ctx, cont))
                owners.append(i)
        totals = [0.0] * len(requests)
        for owner, (ll, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation --------------------------------------------------------------------------------
    def _generation_settings(self, gen_kwargs: dict[str, Any]) -> tuple[SamplingParams, list[str]]:
        """lm-eval's generation arguments as SamplingParams and stop strings (unknown ones are ignored)."""
        kw = dict(gen_kwargs)
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = _positive_int(kw.pop("max_gen_toks", self.max_gen_toks), "max_gen_toks")
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks ({max_new}) must be below max_length ({self.max_length})")
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0))
        top_k, top_p = kw.pop("top_k", None), kw.pop("top_p", None)
        budget = kw.pop("thinking_budget", self.thinking_budget)
        params = SamplingParams(
            max_new_tokens=max_new, temperature=temperature if do_sample else 0.0,
            top_k=int(top_k) if do_sample and top_k else None, top_p=float(top_p) if do_sample and top_p else None,
            seed=int(kw.pop("seed", 1234)), eos_id=self.eot_token_id,
            thinking_budget=None if budget is None else int(budget))
        if kw:
            log.warning("hybridlm ignores the generation arguments %s", sorted(kw))
        return params, until

    def _prompt_ids(self, context: str, max_new: int) -> list[int]:
        ids = self.tok_encode(context)[-(self.max_length - max_new):]
        return ids or [self.prefix_token_id]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (unless do_sample) continuations, cut before the first ``until`` string, through the engine."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tok, max_batch=self.batch_size, max_model_len=self.max_length,
                                  compile=self.compile)
        groups: dict[str, list[int]] = {}  # requests with the same generation arguments run together
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for idx in tqdm(groups.values(), desc="generate_until", disable=disable_tqdm or len(groups) < 2):
            params, until = self._generation_settings(requests[idx[0]].args[1])
            idx = sorted(idx, key=lambda i: -len(requests[i].args[0]))
            prompts = [self._prompt_ids(requests[i].args[0], params.max_new_tokens) for i in idx]
            for i, done in zip(idx, self._engine.generate(prompts, params, stop=until)):
                out[i] = done.text
                self.cache_hook.add_partial("generate_until", requests[i].args, done.text)
        return out


def _positive_int(value: Any, name: str) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if n < 1 or n != float(value):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return n
