"""The engine's slots: one row of a shared `StaticCache` per running request.

A request reserves the lowest free slot when admitted, is prefilled in chunks on its
own growable cache (across engine steps, under a token budget), and is then copied once
into its slot (`SlotTable.join`); leaving frees the slot. Running requests are never
copied on a join. The static cache grows (doubling, from `MIN_CAPACITY` tokens per slot)
only when a slot's sequence reaches its capacity, so attention reads at most twice the
columns in use; each capacity is one compiled shape.

A decode step runs over slots [0, n) (n = highest occupied slot + 1, views, no copy),
or over every slot when compiled (one fixed shape).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..model.cache import InferenceCache
from ..model.lm import HybridLM
from ..model.static_cache import StaticCache
from ..model.compiled import Compiled
from .decoder import step_function
from .detokenize import TextState
from .sampling import SamplingParams
from .thinking import ThinkingBudget

MIN_CAPACITY = 256


@dataclass
class Slot:
    request: "object"                      # engine.Request
    generator: torch.Generator
    text: TextState | None
    index: int = -1                        # row of the static cache (-1: none)
    prompt: Tensor | None = None           # (1, P) while prefilling
    prefilled: int = 0                     # prompt tokens prefilled so far
    prefill_cache: InferenceCache | None = None
    length: int = 0                        # tokens in the static cache (host copy)
    pending: int = -1                      # last sampled token, fed at the next decode step
    sampled: int = 0                       # tokens sampled so far (an EOS included)
    token_ids: list[int] = field(default_factory=list)
    think: "ThinkingBudget | None" = None  # the request's thinking budget, when it has one
    prompt_logprobs: list | None = None    # [None, TokenLogprob, ...] while prefilling, when asked

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def decoding(self) -> bool:
        return self.prompt is None and self.index >= 0


class SlotTable:
    """`slots` rows of one lazily allocated `StaticCache` and who owns each."""

    def __init__(self, model: HybridLM, slots: int, compile: bool = False) -> None:
        self.model, self.compile = model, compile
        self.owner: list[Slot | None] = [None] * slots
        self.cache: StaticCache | None = None
        self._step = step_function(compile, model.lm_head.weight.device)

    @property
    def compile_seconds(self) -> float:
        return self._step.compile_seconds if isinstance(self._step, Compiled) else 0.0

    def reserve(self, slot: Slot) -> bool:
        """Give `slot` the lowest free row; False when all are taken."""
        free = next((i for i, o in enumerate(self.owner) if o is None), None)
        if free is None:
            return False
        self.owner[free], slot.index = slot, free
        return True

    def release(self, slot: Slot) -> None:
        if slot.index >= 0 and self.owner[slot.index] is slot:
            self.owner[slot.index] = None
            if self.cache is not None:
                self.cache.free_slot(slot.index)
        slot.index = -1
        if all(o is None for o in self.owner):
            self.cache = None  # an idle engine holds no cache

    def join(self, slot: Slot, prefilled: InferenceCache) -> None:
        """Copy a finished prefill into the slot's row."""
        self._ensure(prefilled.seen + 1)
        slot.length = self.cache.write_slot(slot.index, prefilled)

    def _ensure(self, length: int) -> None:
        """Room for `length` tokens in every slot (allocate, or double until it fits)."""
        if self.cache is not None and length <= self.cache.max_len:
            return
        capacity = self.cache.max_len if self.cache is not None else MIN_CAPACITY
        while capacity < length:
            capacity *= 2
        if self.cache is None:
            p = self.model.lm_head.weight
            self.cache = StaticCache.empty(self.model.cfg, len(self.owner), capacity, p.device, p.dtype)
        else:
            self.cache = self.cache.resized(capacity)

    def decode(self) -> tuple[list[Slot], Tensor]:
        """One step for every decoding slot: (those slots, their logits (n, vocab))."""
        running = [s for s in self.owner if s is not None and s.decoding]
        self._ensure(max(s.length for s in running) + 1)
        n = len(self.owner) if self.compile else max(s.index for s in running) + 1
        tokens = [0] * n
        for s in running:
            tokens[s.index] = s.pending
        device = self.cache.lengths.device
        cache = self.cache if n == self.cache.slots else self.cache.first(n)
        logits = self._step(self.model, cache, torch.tensor(tokens, dtype=torch.long, device=device))
        for s in running:
            s.length += 1
        rows = torch.tensor([s.index for s in running], dtype=torch.long, device=device)
        return running, logits.index_select(0, rows)
