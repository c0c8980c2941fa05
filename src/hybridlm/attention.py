"""Causal grouped-query self-attention with no positional embedding (Nemotron-H `*` layer).

Position comes from the Mamba layers, so there is no RoPE. The fused
`scaled_dot_product_attention` kernel runs in every mode; with a cache, keys of
earlier calls are prepended and a causal mask offset by the cached length is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import KVCache
from .config import HybridConfig


def attention_mask(q_len: int, key_valid: Tensor) -> Tensor:
    """Boolean mask (b, 1, q_len, k_len): causal (offset by the cached keys) and no pad keys.

    A query may always see its own key, so rows of pad queries are never fully masked.
    """
    b, k_len = key_valid.shape
    offset = k_len - q_len
    q_pos = torch.arange(q_len, device=key_valid.device)[:, None] + offset
    k_pos = torch.arange(k_len, device=key_valid.device)[None, :]
    causal = k_pos <= q_pos                                      # (q, k)
    mask = causal[None] & key_valid[:, None, :]                  # (b, q, k)
    mask = mask | (k_pos == q_pos)[None]
    return mask[:, None]


class Attention(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)

    def _heads(self, t: Tensor, n: int) -> Tensor:
        b, l, _ = t.shape
        return t.view(b, l, n, self.head_dim).transpose(1, 2)  # (b, n, l, d)

    def forward(self, x: Tensor, cache: KVCache | None = None, key_valid: Tensor | None = None) -> Tensor:
        """x (b, l, d_model). key_valid (b, k_len) marks real tokens among all keys (None: no padding)."""
        b, l, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        if cache is not None:
            k, v = cache.append(k, v)
        k_len = k.shape[2]
        if key_valid is None and k_len == l:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif key_valid is None and l == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            if key_valid is None:
                key_valid = torch.ones(b, k_len, dtype=torch.bool, device=x.device)
            mask = attention_mask(l, key_valid)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, l, -1))
