"""`Decoder`: prefill, then fixed-shape decode steps on a `StaticCache`, eager or compiled.

    dec = Decoder(model, batch=2, max_len=512, compile=True)
    logits = dec.prefill(ids, attention_mask)   # (b, vocab) at each row's last token
    logits = dec.step(next_tokens)              # (b,) -> (b, vocab)

The prompt goes through `HybridLM.forward` on a growable cache (chunked prefill, any
padding), each row's real tokens are then copied once into its slot; every step after
that is `decode_step`. `compile=True` wraps the step in `torch.compile` (inductor,
`dynamic=False`; on CPU with the C++ wrapper; on CUDA `mode="reduce-overhead"`, i.e.
CUDA graphs over the static cache's buffers). If compilation fails, a warning says why and the
step runs eagerly. Lengths are tracked on the host so a step never overflows `max_len`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..model.compiled import Compiled
from ..model.decode_step import decode_step
from ..model.lm import HybridLM
from ..model.static_cache import StaticCache

StepFn = Callable[[HybridLM, StaticCache, Tensor], Tensor]

# Inductor on CPU: the C++ wrapper (no Python between the generated kernels). (Batch-1
# projections are written as multiply-sums under compile: `hybridlm.model.rowwise`.)
CPU_OPTIONS = {"cpp_wrapper": True}


def step_function(compile: bool, device: torch.device) -> StepFn | Compiled:
    """The decode step to use: eager, or compiled: CUDA graphs on CUDA, `CPU_OPTIONS` on CPU."""
    if not compile:
        return decode_step
    if device.type == "cuda":
        return Compiled(decode_step, mode="reduce-overhead")
    return Compiled(decode_step, options=CPU_OPTIONS)


class Decoder:
    """Batch prefill + static-cache decoding for `batch` rows of at most `max_len` tokens."""

    def __init__(self, model: HybridLM, batch: int, max_len: int, compile: bool = False,
                 step: StepFn | Compiled | None = None, prefill_chunk: int = 2048) -> None:
        p = model.lm_head.weight
        self.model, self.device, self.prefill_chunk = model, p.device, prefill_chunk
        self.cache = StaticCache.empty(model.cfg, batch, max_len, device=p.device, dtype=p.dtype)
        self._step = step if step is not None else step_function(compile, p.device)
        self.lengths = [0] * batch  # host copy of cache.lengths

    @property
    def compile_seconds(self) -> float:
        return getattr(self._step, "compile_seconds", 0.0)

    def prefill(self, ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """ids (b, l) (padding marked False in attention_mask) -> logits (b, vocab) at the last column."""
        b, l = ids.shape
        if b != self.cache.slots:
            raise ValueError(f"prefill of {b} rows on a decoder of {self.cache.slots}")
        growable = self.model.new_cache(b, capacity=l)
        for a in range(0, l, self.prefill_chunk):
            mask = None if attention_mask is None else attention_mask[:, a:a + self.prefill_chunk]
            logits = self.model(ids[:, a:a + self.prefill_chunk], growable, mask, last_only=True)[:, -1]
        self.lengths = [self.cache.write_slot(row, growable, row) for row in range(b)]
        return logits

    def step(self, tokens: Tensor) -> Tensor:
        """tokens (b,) -> logits (b, vocab): one decode step for every row."""
        if max(self.lengths) >= self.cache.max_len:
            raise ValueError(f"the static cache is full ({self.cache.max_len} tokens): raise max_len")
        logits = self._step(self.model, self.cache, tokens)
        self.lengths = [n + 1 for n in self.lengths]
        return logits.clone() if self.device.type == "cuda" else logits  # CUDA graphs reuse output memory
