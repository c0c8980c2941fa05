"""The fixed-shape decode step: one token for every slot of a `StaticCache`.

`decode_step(model, cache, tokens)` runs the same layers as `HybridLM.forward` on one
token per slot, through each mixer's `step` (Mamba: in-place conv/SSM update; attention:
a write at each slot's length and a length mask over the whole buffer). No shape
depends on the data and nothing synchronises with the host, so `torch.compile` makes one
graph of it (tested with `torch._dynamo.explain`) and CUDA graphs can replay it. It
equals `HybridLM.forward` on the growable `InferenceCache` (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .lm import HybridLM
from .norms import maybe_norm
from .rowwise import project
from .static_cache import StaticCache


def decode_step(model: HybridLM, cache: StaticCache, tokens: Tensor) -> Tensor:
    """tokens (slots,) -> next-token logits (slots, vocab); advances every active slot by one token.

    Callers keep each active slot's length below `cache.max_len` (checked on the host).
    """
    positions = cache.lengths                                      # (slots,) where the new token goes
    columns = torch.arange(cache.max_len, device=tokens.device)
    key_valid = columns[None, :] <= positions[:, None]             # (slots, max_len)
    x = model.backbone.embeddings(tokens)                          # (slots, d_model)
    for block, state in zip(model.backbone.layers, cache.layers):
        h = maybe_norm(block.norm, x)
        if block.kind == "mamba":
            h = block.mixer.step(h, state)
        elif block.kind == "attention":
            h = block.mixer.step(h, state, positions, key_valid)
        else:
            h = block.mixer(h)
        x = x + h
    cache.lengths.add_(cache.active)
    return project(model.lm_head, model.backbone.norm_f(x))
