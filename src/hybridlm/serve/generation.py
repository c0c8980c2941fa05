"""Text generation: prefill once, then decode token by token on the inference cache.

Batches of prompts of different lengths are **left-padded**: pads are masked out of
attention and zeroed before every Mamba layer, so a padded prompt produces exactly the
same continuation as the same prompt alone. Sampling: greedy (temperature 0),
temperature, top-k and top-p (nucleus), reproducible with `seed`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..model.lm import HybridLM
from .sampling import SamplingParams, sample_next, sampling_params


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(ids, mask) of shape (b, max_len); prompts are right-aligned, mask is True on real tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        mask[i, width - len(p):] = True
    return ids, mask


@torch.inference_mode()
def generate(model: HybridLM, prompts: list[list[int]], params: SamplingParams | None = None,
             **sampling: Any) -> list[list[int]]:
    """Continue each prompt (token ids); returns the new tokens of each (cut after eos_id when given).

    Sampling follows `params`, with any `SamplingParams` field given as a keyword replaced:
    ``generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)``.
    """
    params = sampling_params(params, **sampling)
    params.validate()
    device = model.lm_head.weight.device
    pad_id = model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0
    ids, mask = left_pad(prompts, pad_id, device)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    b = len(prompts)
    cache = model.new_cache(b, capacity=ids.shape[1] + params.max_new_tokens)
    logits = model(ids, cache, attention_mask=mask)[:, -1]
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for _ in range(params.max_new_tokens):
        nxt = sample_next(logits, params, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if params.eos_id is not None:
            done |= nxt == params.eos_id
            if bool(done.all()):
                break
        logits = model(nxt[:, None], cache)[:, -1]
    return [_cut(row.tolist(), params.eos_id) for row in out]


def _cut(tokens: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


def generate_text(model: HybridLM, tokenizer, prompts: list[str], params: SamplingParams | None = None,
                  **sampling: Any) -> list[str]:
    """String in, string out, with any object having encode/decode (see `hybridlm.training.tokenizer`);
    sampling as in `generate`, stopping at the tokenizer's EOS unless `eos_id` is given."""
    params = sampling_params(params, **sampling)
    if params.eos_id is None:
        params = sampling_params(params, eos_id=getattr(tokenizer, "eos_id", None))
    encoded = [tokenizer.encode(p) for p in prompts]
    new = generate(model, encoded, params)
    return [tokenizer.decode([t for t in toks if t != params.eos_id]) for toks in new]
