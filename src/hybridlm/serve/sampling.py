"""Sampling one token from logits: greedy (temperature 0), temperature, top-k and top-p (nucleus).

`SamplingParams` is what a request asks for. Every accepted value is numerically safe:
temperatures below `GREEDY_TEMPERATURE` (1e-5, vLLM's epsilon) are greedy, logits are
shifted by their row maximum before the division (no overflow), the top token always
survives top-p (a `top_p` that rounds to 0 keeps it), and `valid_rows` flags rows that
cannot be sampled (NaN / +inf / all -inf logits) so the engine fails only those requests. `sample_rows` samples every row of a batch in
one call, each row with its own temperature / top-k / top-p and its own uniform draw
(inverse CDF over the filtered, sorted distribution), so each request can keep its own
seeded `torch.Generator` and batched sampling equals sampling each row alone (the
engine); `sample_next` is the one-generator form (`generate`). `filter_logits` is the
readable reference of the same filters (tested equal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor


GREEDY_TEMPERATURE = 1e-5   # temperatures below this are greedy (argmax)
MAX_LOGPROBS = 20           # top log-probabilities per token at most

# A logits processor (vLLM's form): (token ids generated so far, logits (vocab,)) -> logits (vocab,).
LogitsProcessor = Callable[[list[int], Tensor], Tensor]


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0   # below GREEDY_TEMPERATURE (e.g. 0) -> greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_id: int | None = None  # stop a sequence once it emits this token
    logprobs: int | None = None          # engine: log-prob of each sampled token + this many top ones
    prompt_logprobs: int | None = None   # engine: the same for every prompt token (echo / scoring)
    thinking_budget: int | None = None   # engine: tokens of <think> before the close is forced
    logits_processors: list[LogitsProcessor] = dataclasses.field(default_factory=list)  # engine only

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0 or self.temperature == float("inf"):  # NaN fails too
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must lie in [0, {MAX_LOGPROBS}], got {value}")
        if self.thinking_budget is not None and self.thinking_budget < 0:
            raise ValueError(f"thinking_budget must be >= 0, got {self.thinking_budget}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


def sampling_params(params: SamplingParams | None = None, **overrides: Any) -> SamplingParams:
    """`params` (default: `SamplingParams()`) with some fields replaced, e.g. ``max_new_tokens=20``;
    the caller's object is not changed (TypeError for an unknown field)."""
    return dataclasses.replace(params or SamplingParams(), **overrides)


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set logits outside the top-k / top-p nucleus to -inf. logits (b, vocab)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def ranked_probs(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> tuple[Tensor, Tensor]:
    """(probs, order), both (b, vocab): each row's distribution after temperature, top-k and top-p,
    over its tokens ranked by logit (stable sort, so ties keep id order); `order` maps rank -> id.

    Per row: temperature (b,) (greedy ones are treated as 1 here), top_k (b,) (0: off), top_p (b,)
    (1: off). Logits are shifted by the row maximum before dividing, so no temperature overflows.
    """
    hot = torch.where(temperature >= GREEDY_TEMPERATURE, temperature, torch.ones_like(temperature)).float()
    logits = logits.float()
    shifted = (logits - logits.amax(-1, keepdim=True)) / hot[:, None]                  # <= 0, max 0
    ranked, order = torch.sort(shifted, dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, logits.shape[-1]))
    probs = torch.softmax(ranked.masked_fill(rank >= k[:, None], float("-inf")), dim=-1)
    # drop a token when the mass before it already reaches top_p; the top token always stays
    drop = ((torch.cumsum(probs, dim=-1) - probs) >= top_p[:, None].float()) & (rank > 0)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(-1, keepdim=True), order


def valid_rows(logits: Tensor) -> Tensor:
    """(b,) True where a row of logits (b, vocab) can be sampled: no NaN, no +inf, one finite value."""
    logits = logits.float()
    return ~(logits.isnan() | (logits == float("inf"))).any(-1) & logits.isfinite().any(-1)


def sample_rows(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, uniforms: Tensor) -> Tensor:
    """Next token ids (b,) from logits (b, vocab), all rows at once (settings as in `ranked_probs`;
    temperature 0: greedy). Each row's uniform draw in [0, 1) (b,) is inverted through the
    cumulative distribution of its `ranked_probs`. Rows that are not `valid_rows` give garbage ids:
    check them first."""
    probs, order = ranked_probs(logits, temperature, top_k, top_p)
    cdf = torch.cumsum(probs.double(), dim=-1)                                        # (b, vocab)
    kept = (probs > 0).sum(-1)
    pick = (cdf < uniforms.double()[:, None] * cdf[:, -1:]).sum(-1).clamp(max=kept - 1)  # first rank past the draw
    sampled = order.gather(1, pick[:, None]).squeeze(1)
    return torch.where(temperature >= GREEDY_TEMPERATURE, sampled, logits.float().argmax(dim=-1))


def row_settings(params: list[SamplingParams], device: torch.device | str = "cpu") -> tuple[Tensor, Tensor, Tensor]:
    """(temperature, top_k, top_p) tensors (b,) for `sample_rows`, one row per SamplingParams."""
    return (torch.tensor([p.temperature for p in params], device=device),
            torch.tensor([p.top_k or 0 for p in params], device=device),
            torch.tensor([1.0 if p.top_p is None else p.top_p for p in params], device=device))


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token ids (b,) from last-position logits (b, vocab), every row with `params`;
    one uniform per row from `generator` (none for greedy)."""
    if params.greedy:
        return logits.float().argmax(dim=-1)
    b = logits.shape[0]
    settings = row_settings([params] * b, logits.device)
    return sample_rows(logits, *settings, torch.rand(b, generator=generator, device=logits.device))
