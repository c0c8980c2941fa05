"""Text generation: prefill once, then fixed-shape decode steps on a static cache (`Decoder`).

Batches of prompts of different lengths are **left-padded** for the prefill: pads are
masked out of attention and are identity steps of every Mamba layer, and only each
row's real tokens are copied into its static-cache slot, so a padded prompt produces
exactly the same continuation as the same prompt alone. `compile=True` runs the decode
step through `torch.compile` (see `hybridlm.serve.decoder`). Sampling: greedy (temperature 0),
temperature, top-k and top-p (nucleus), reproducible with `seed`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..model.lm import HybridLM
from .decoder import Decoder
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
             compile: bool = False, **sampling: Any) -> list[list[int]]:
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
    decoder = Decoder(model, b, max_len=_bucket(ids.shape[1] + params.max_new_tokens), compile=compile)
    logits = decoder.prefill(ids, mask if len({len(p) for p in prompts}) > 1 else None)
    out = torch.empty(b, 0, dtype=torch.long, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for i in range(params.max_new_tokens):
        nxt = sample_next(logits, params, generator)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        if params.eos_id is not None:
            done |= nxt == params.eos_id
            if bool(done.all()):
                break
        if i + 1 < params.max_new_tokens:
            logits = decoder.step(nxt)
    return [_cut(row.tolist(), params.eos_id) for row in out]


def _bucket(length: int, step: int = 256) -> int:
    """`length` rounded up to a multiple of `step`: fewer distinct cache shapes, fewer recompiles."""
    return -(-length // step) * step


def _cut(tokens: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in tokens:
        return tokens[: tokens.index(eos_id) + 1]
    return tokens


def generate_text(model: HybridLM, tokenizer, prompts: list[str], params: SamplingParams | None = None,
                  compile: bool = False, **sampling: Any) -> list[str]:
    """String in, string out, with any object having encode/decode (see `hybridlm.training.tokenizer`);
    sampling as in `generate`, stopping at the tokenizer's EOS unless `eos_id` is given."""
    params = sampling_params(params, **sampling)
    if params.eos_id is None:
        params = sampling_params(params, eos_id=getattr(tokenizer, "eos_id", None))
    encoded = [tokenizer.encode(p) for p in prompts]
    new = generate(model, encoded, params, compile=compile)
    return [tokenizer.decode([t for t in toks if t != params.eos_id]) for toks in new]
