"""Text generation: prefill once, then decode token by token on the inference cache.

Batches of prompts of different lengths are **left-padded**: pads are masked out of
attention and zeroed before every Mamba layer, so a padded prompt produces exactly the
same continuation as the same prompt alone. Sampling: greedy (temperature 0),
temperature, top-k and top-p (nucleus), reproducible with `seed`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .model import HybridLM


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0   # 0 -> greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    eos_id: int | None = None  # stop a sequence once it emits this token

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


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


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token ids (b,) from last-position logits (b, vocab)."""
    logits = logits.float()
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / params.temperature, params.top_k, params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


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
def generate(model: HybridLM, prompts: list[list[int]], params: SamplingParams | None = None) -> list[list[int]]:
    """Continue each prompt; returns the new tokens of each (cut after eos_id when given)."""
    params = params or SamplingParams()
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


def generate_text(model: HybridLM, tokenizer, prompts: list[str], params: SamplingParams | None = None) -> list[str]:
    """String in, string out, with any object having encode/decode (see hybridlm.tokenizer)."""
    params = params or SamplingParams()
    if params.eos_id is None:
        params.eos_id = getattr(tokenizer, "eos_id", None)
    encoded = [tokenizer.encode(p) for p in prompts]
    new = generate(model, encoded, params)
    return [tokenizer.decode([t for t in toks if t != params.eos_id]) for toks in new]
