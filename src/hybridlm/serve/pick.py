"""The engine's next tokens for a batch of slots, where one bad row never fails the others.

For every row of raw logits (b, vocab), in this order: a token forced by the request's
thinking budget replaces sampling; the request's logits processors run on its row (one
that raises fails that row only); rows that cannot be sampled (NaN / +inf / nothing
finite, `valid_rows`) fail alone; the rest are sampled in one `sample_rows` call, each
with a uniform from its request's own generator. Log-probs come from the raw logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from .logprobs import TokenLogprob, token_logprobs
from .sampling import row_settings, sample_rows, valid_rows

log = logging.getLogger(__name__)


@dataclass
class Pick:
    token: int | None = None               # None: the row failed (see error)
    logprob: TokenLogprob | None = None    # when the request asked for logprobs
    error: str | None = None


def _processed(logits: Tensor, slots: list) -> tuple[Tensor, list[str | None]]:
    """Logits after each request's processors (float32, a copy when any run) and per-row errors."""
    errors: list[str | None] = [None] * len(slots)
    if not any(s.params.logits_processors for s in slots):
        return logits.float(), errors
    out = logits.float().clone()
    for i, s in enumerate(slots):
        try:
            for proc in s.params.logits_processors:
                out[i] = proc(list(s.token_ids), out[i])
        except Exception as err:  # the request's own code: it fails its request only
            errors[i] = f"logits processor failed: {type(err).__name__}: {err}"
    return out, errors


def _sample(logits: Tensor, slots: list, ok: Tensor) -> list[int | None]:
    """Sample the rows where `ok`, in one call (one row at a time if that call fails)."""
    draws = [torch.rand(1, generator=s.generator, device=logits.device) if not s.params.greedy
             else torch.zeros(1, device=logits.device) for s in slots]
    safe = torch.where(ok[:, None], logits, torch.zeros_like(logits))
    try:
        tokens = sample_rows(safe, *row_settings([s.params for s in slots], logits.device), torch.cat(draws))
        return [t if good else None for t, good in zip(tokens.tolist(), ok.tolist())]
    except Exception:
        log.exception("batched sampling failed; sampling row by row")
    out: list[int | None] = []
    for i, s in enumerate(slots):
        try:
            row = sample_rows(safe[i:i + 1], *row_settings([s.params], logits.device), draws[i])
            out.append(int(row) if ok[i] else None)
        except Exception:
            out.append(None)
    return out


def pick_tokens(logits: Tensor, slots: list) -> list[Pick]:
    """One `Pick` per row of logits (b, vocab) for `slots` (see the module docstring)."""
    forced = [s.think.forced() if s.think is not None else None for s in slots]
    processed, errors = _processed(logits, slots)
    ok = valid_rows(processed) & torch.tensor([e is None for e in errors], device=logits.device)
    sampled = _sample(processed, slots, ok)
    picks = []
    for i in range(len(slots)):
        token = forced[i] if forced[i] is not None else sampled[i]
        if errors[i] is not None or token is None:
            picks.append(Pick(error=errors[i] or "the logits cannot be sampled (NaN, +inf or no finite value)"))
        else:
            picks.append(Pick(token))
    want = [i for i, (s, p) in enumerate(zip(slots, picks)) if p.token is not None and s.params.logprobs is not None]
    if want:
        rows = torch.tensor(want, device=logits.device)
        chosen = torch.tensor([picks[i].token for i in want], device=logits.device)
        for i, lp in zip(want, token_logprobs(logits.index_select(0, rows), chosen,
                                              [slots[i].params.logprobs for i in want])):
            picks[i].logprob = lp
    return picks
