"""Continuous-batching inference engine: many concurrent requests, one decode batch.

Each running request owns one row ("slot") of a shared `StaticCache` (`hybridlm.serve.slots`):
its Mamba conv + SSM states and its rows of the attention KV buffers. Every engine step

1. applies aborts and gives free slots to waiting requests;
2. prefills joining prompts in chunks under a per-step token budget
   (`prefill_tokens_per_step`), so a long prompt is spread over several steps and never
   freezes the running streams; a finished prefill is copied into its slot once;
3. runs one fixed-shape decode step for all decoding slots (`decode_step`, compiled
   with `compile=True`) and samples every row in one call (`sample_rows`), each with
   its request's `SamplingParams` and its own `torch.Generator`.

So a request's tokens do not depend on its batch mates: greedy results equal
`generate()` on the prompt alone, and so do seeded samples (tested).

With a tokenizer, tokens are detokenized incrementally and stop strings are honoured
(`hybridlm.serve.detokenize`).

Two ways to drive it:

* synchronously: `engine.generate(prompts, params)`, or `submit(...)` + `run_until_idle()`;
* in a background thread: `start()`, then `submit`/`abort` from any thread; outputs
  (`RequestOutput`, one per new token: deltas) reach each request's `on_output`
  callback on the engine thread; `stop()` aborts what is left and joins the thread.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..model.lm import HybridLM
from .detokenize import TextState
from .logprobs import TokenLogprob, chunk_prompt_logprobs
from .pick import Pick, pick_tokens
from .reasoning import opens_thinking
from .sampling import SamplingParams
from .slots import Slot, SlotTable
from .thinking import FORCED_CLOSE, ThinkingBudget

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "abort", "error")


class QueueFull(RuntimeError):
    """The engine's waiting queue is at its limit: retry later."""


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()                      # stop strings (need a tokenizer)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    on_output: Callable[["RequestOutput"], None] | None = None  # called on the engine thread


@dataclass
class RequestOutput:
    """What one request produced since its previous output (a delta)."""
    request_id: str
    token_ids: list[int]                 # new tokens (an EOS is not included)
    text: str                            # new text ('' without a tokenizer)
    finished: bool = False
    finish_reason: str | None = None     # one of FINISH_REASONS once finished
    prompt_tokens: int = 0
    completion_tokens: int = 0           # tokens sampled so far, an EOS included
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None   # per sampled token of this delta, an EOS included
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, in the first output: [None, ...]


@dataclass
class Completion:
    """The whole result of one request (`Engine.generate`)."""
    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class Engine:
    """Continuous batching over one `HybridLM` (see the module docstring).

    max_batch: running requests (slots) at most. max_queue: requests waiting for a slot at
    most (`submit` raises `QueueFull` when max_batch + max_queue are already in).
    max_model_len: prompt + max_new_tokens at most (default `cfg.max_seq_len`).
    prefill_chunk: prompt tokens per forward call while prefilling.
    prefill_tokens_per_step: prompt tokens prefilled between two decode steps: bounds how
    long running requests wait for joiners (a longer prompt takes several steps).
    compile: run the decode step through `torch.compile` (see `hybridlm.serve.decoder`).
    """

    def __init__(self, model: HybridLM, tokenizer=None, max_batch: int = 8, max_queue: int = 64,
                 max_model_len: int | None = None, prefill_chunk: int = 512,
                 prefill_tokens_per_step: int = 512, compile: bool = False) -> None:
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("prefill_tokens_per_step", prefill_tokens_per_step)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if max_model_len is not None and max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.lm_head.weight.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_model_len = max_model_len if max_model_len is not None else model.cfg.max_seq_len
        self.prefill_chunk, self.prefill_tokens_per_step = prefill_chunk, prefill_tokens_per_step
        self._waiting: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._table = SlotTable(model, max_batch, compile)
        self._slots: list[Slot] = []  # running (prefilling or decoding), in admission order
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = {"steps": 0, "decode_tokens": 0, "prefill_tokens": 0, "prefill_chunks": 0,
                      "finished": 0, "aborted": 0}

    # ---- public, thread-safe -------------------------------------------------
    @property
    def _cache(self):
        """The static cache (None while idle)."""
        return self._table.cache

    @property
    def compile_seconds(self) -> float:
        return self._table.compile_seconds

    @property
    def num_running(self) -> int:
        return len(self._slots)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def submit(self, request: Request) -> str:
        """Queue a request (checked here: ValueError names the bad field); returns its id."""
        self.validate(request)
        self._enqueue([request], enforce_queue_limit=True)
        return request.request_id

    def _enqueue(self, requests: list[Request], enforce_queue_limit: bool) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("engine is stopping")
            if enforce_queue_limit and len(self._waiting) + len(self._slots) >= self.max_batch + self.max_queue:
                raise QueueFull(f"{len(self._slots)} requests run and {len(self._waiting)} wait "
                                f"(max_batch={self.max_batch}, max_queue={self.max_queue})")
            self._waiting.extend(requests)
            self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Stop a waiting or running request; it finishes with finish_reason 'abort' and frees its slot."""
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def validate(self, request: Request) -> None:
        p, ids = request.params, request.prompt_ids
        p.validate()
        if p.max_new_tokens < 1 and p.prompt_logprobs is None:
            raise ValueError(f"max_new_tokens must be >= 1 (0 only to score the prompt), got {p.max_new_tokens}")
        if p.thinking_budget is not None and self.tokenizer is None:
            raise ValueError("a thinking budget needs an engine with a tokenizer")
        if not ids:
            raise ValueError("the prompt needs at least one token")
        vocab = self.model.cfg.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(ids) + p.max_new_tokens > self.max_model_len:
            raise ValueError(f"prompt ({len(ids)} tokens) + max_new_tokens ({p.max_new_tokens}) exceeds the "
                             f"context limit of {self.max_model_len} tokens")
        if request.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")
        if isinstance(request.stop, str) or not all(isinstance(s, str) for s in request.stop):
            raise ValueError("stop must be a list of strings")

    # ---- synchronous use -------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
                 stop: Sequence[str] = ()) -> list[Completion]:
        """Run every prompt to completion (inline, or on the engine thread when it runs)."""
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        collectors = [_Collector() for _ in prompts]
        reqs = [Request(list(p), sp, stop, on_output=c) for p, sp, c in zip(prompts, plist, collectors)]
        for r in reqs:
            self.validate(r)
        self._enqueue(reqs, enforce_queue_limit=False)  # all or none
        if self._thread is None:
            self.run_until_idle()
        for c in collectors:
            c.done.wait()
        return [c.result(r) for c, r in zip(collectors, reqs)]

    def run_until_idle(self) -> None:
        while self._waiting or self._slots or self._aborts:
            self.step()

    # ---- background thread -----------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="hybridlm-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread; every waiting or running request finishes with 'abort'."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._cond:
            self._aborts.update(r.request_id for r in self._waiting)
            self._aborts.update(s.request.request_id for s in self._slots)
        self._apply_aborts()
        self._stopping = False

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._slots or self._aborts):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # keep serving; the failing request(s) were already told
                log.exception("engine step failed")

    # ---- one scheduling iteration ------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Apply aborts, admit waiting requests into free slots, prefill under the budget, decode one token."""
        self._apply_aborts()
        self._admit()
        self._prefill()
        if any(s.decoding for s in self._slots):
            try:
                self._decode()
            except Exception as err:  # never leave requests hanging: fail the batch, keep serving
                log.exception("decode step failed")
                for slot in [s for s in self._slots if s.decoding]:
                    self._emit(slot, [], "", "error", error=f"{type(err).__name__}: {err}")
                    self._leave(slot)
        self.stats["steps"] += 1

    @torch.inference_mode()  # also called by stop(), outside step()
    def _apply_aborts(self) -> None:
        with self._cond:
            if not self._aborts:
                return
            ids, self._aborts = self._aborts, set()
            dropped = [r for r in self._waiting if r.request_id in ids]
            self._waiting = deque(r for r in self._waiting if r.request_id not in ids)
        for r in dropped:
            self._emit(Slot(r, torch.Generator(), None), [], "", "abort")
        for s in [s for s in self._slots if s.request.request_id in ids]:
            self._emit(s, [], s.text.take(final=True) if s.text else "", "abort")
            self._leave(s)

    def _admit(self) -> None:
        """Give each free slot to the next waiting request (its prefill starts in `_prefill`)."""
        while len(self._slots) < self.max_batch:
            with self._cond:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            slot = self._new_slot(req)
            self._table.reserve(slot)
            self._slots.append(slot)

    def _new_slot(self, req: Request) -> Slot:
        gen = torch.Generator(device=self.device)
        if req.params.seed is not None:
            gen.manual_seed(req.params.seed)
        else:
            gen.seed()
        text = TextState(self.tokenizer, req.prompt_ids, req.stop) if self.tokenizer is not None else None
        slot = Slot(req, gen, text)
        slot.prompt = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)  # (1, P)
        slot.prefill_cache = self.model.new_cache(1, capacity=slot.prompt.shape[1])
        if req.params.prompt_logprobs is not None:
            slot.prompt_logprobs = [None]  # the first prompt token has nothing before it
        if req.params.thinking_budget is not None:
            slot.think = ThinkingBudget(req.params.thinking_budget, opens_thinking(self.tokenizer.decode(req.prompt_ids)),
                                        self.tokenizer.encode(FORCED_CLOSE))
        return slot

    def _prefill(self) -> None:
        """Prefill chunks, oldest joiner first, until `prefill_tokens_per_step` prompt tokens are spent."""
        budget = self.prefill_tokens_per_step
        for slot in [s for s in self._slots if s.prompt is not None]:
            try:
                while budget > 0 and slot.prompt is not None:
                    budget -= self._prefill_chunk(slot, budget)
            except Exception as err:
                log.exception("prefill failed")
                self._emit(slot, [], "", "error", error=f"{type(err).__name__}: {err}")
                self._leave(slot)

    def _prefill_chunk(self, slot: Slot, budget: int) -> int:
        """Prefill up to min(budget, prefill_chunk) more prompt tokens; at the end, join and sample."""
        a = slot.prefilled
        n = min(budget, self.prefill_chunk, slot.prompt.shape[1] - a)
        scoring = slot.prompt_logprobs is not None
        logits = self.model(slot.prompt[:, a:a + n], slot.prefill_cache, last_only=not scoring)[0]  # (n or 1, vocab)
        if scoring:
            slot.prompt_logprobs += chunk_prompt_logprobs(logits, slot.prompt[0], a, slot.params.prompt_logprobs)
        slot.prefilled += n
        self.stats["prefill_tokens"] += n
        self.stats["prefill_chunks"] += 1
        if slot.prefilled == slot.prompt.shape[1]:
            cache, slot.prompt, slot.prefill_cache = slot.prefill_cache, None, None
            if slot.params.max_new_tokens == 0:  # prompt scoring only
                self._emit(slot, [], "", "length")
                self._leave(slot)
                return n
            self._table.join(slot, cache)
            if self._accept(slot, pick_tokens(logits[-1:], [slot])[0]):
                self._leave(slot)
        return n

    def _decode(self) -> None:
        running, logits = self._table.decode()
        picks = pick_tokens(logits, running)
        self.stats["decode_tokens"] += len(picks)
        for slot, pick in zip(running, picks):
            if self._accept(slot, pick):
                self._leave(slot)

    def _leave(self, slot: Slot) -> None:
        self._table.release(slot)
        self._slots = [s for s in self._slots if s is not slot]

    def _accept(self, slot: Slot, pick: Pick) -> bool:
        """Record a sampled token, emit the delta; True when the request is finished
        (a failed pick ends its request alone, with finish_reason 'error')."""
        if pick.token is None:
            self._emit(slot, [], slot.text.take(final=True) if slot.text else "", "error", error=pick.error)
            return True
        p, token, lps = slot.params, pick.token, None if pick.logprob is None else [pick.logprob]
        slot.sampled += 1
        new_ids: list[int] = []
        reason = None
        if p.eos_id is not None and token == p.eos_id:
            reason = "stop"
        else:
            new_ids = [token]
            slot.token_ids.append(token)
            if slot.text is not None and slot.text.add(token):
                reason = "stop"
        if slot.think is not None and slot.text is not None:
            slot.think.observe(slot.text.text)
        if reason is None and slot.sampled >= p.max_new_tokens:
            reason = "length"
        if reason is None:
            slot.pending = token
            self._emit(slot, new_ids, slot.text.take(final=False) if slot.text else "", None, logprobs=lps)
            return False
        if slot.text is not None and reason != "stop":
            slot.text.flush()  # an incomplete character at the very end: send what there is
        self._emit(slot, new_ids, slot.text.take(final=True) if slot.text else "", reason, logprobs=lps)
        return True

    def _emit(self, slot: Slot, new_ids: list[int], text: str, reason: str | None, error: str | None = None,
              logprobs: list[TokenLogprob] | None = None) -> None:
        if reason is not None:
            self.stats["finished"] += 1
            self.stats["aborted"] += reason == "abort"
        cb = slot.request.on_output
        if cb is None:
            return
        out = RequestOutput(slot.request.request_id, new_ids, text, reason is not None, reason,
                            len(slot.request.prompt_ids), slot.sampled, error, logprobs, slot.prompt_logprobs)
        slot.prompt_logprobs = None  # sent once
        try:
            cb(out)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("on_output callback of request %s failed", slot.request.request_id)


class _Collector:
    """on_output callback that accumulates a whole Completion."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text: list[str] = []
        self.last: RequestOutput | None = None
        self.done = threading.Event()

    def __call__(self, out: RequestOutput) -> None:
        self.ids += out.token_ids
        self.text.append(out.text)
        self.last = out
        if out.finished:
            self.done.set()

    def result(self, req: Request) -> Completion:
        last = self.last
        if last is None or last.finish_reason == "error":
            raise RuntimeError(f"request {req.request_id} failed: {last.error if last else 'no output'}")
        return Completion(req.request_id, self.ids, "".join(self.text), last.finish_reason,
                          last.prompt_tokens, last.completion_tokens)


def wait_idle(engine: Engine, timeout: float = 10.0) -> bool:
    """Poll until the engine has nothing waiting or running (tests, shutdown); True if it got there."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if engine.num_running == 0 and engine.num_waiting == 0:
            return True
        time.sleep(0.01)
    return False
