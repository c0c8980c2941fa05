"""Causal grouped-query self-attention with no positional embedding (Nemotron-H `*` layer).

Position comes from the Mamba layers, so there is no RoPE. The fused
`scaled_dot_product_attention` kernel runs in every mode; with a cache, keys of
earlier calls are prepended and a causal mask offset by the cached length is used.

Training-stability options (config fields, all off by default): a norm on Q and K per
head (`qk_norm`), one norm over the concatenated Q/K/V projection output (`qkv_norm`;
the block then drops its pre-norm), a norm after o_proj (`post_proj_norm`) and tanh
capping of the attention logits (`attn_logit_softcap`). Capping, and recording the
largest attention logit for monitoring (`record_logits`), need the scores themselves,
so they take the explicit path `explicit_attention`, which equals SDPA when uncapped.

Packed training rows pass `seq_idx` (`hybridlm.model.documents`): the mask is then
block-diagonal causal, on both paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import HybridConfig
from .cache import KVCache
from .documents import document_causal_mask
from .norms import make_norm, maybe_norm
from .rowwise import project


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


def softcap(scores: Tensor, cap: float) -> Tensor:
    """cap * tanh(scores / cap): smooth, bounded to (-cap, cap), ~identity for |scores| << cap."""
    return cap * torch.tanh(scores / cap)


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, cap: float = 0.0,
                       record: bool = True) -> tuple[Tensor, Tensor | None]:
    """Softmax attention written out: (output, largest raw logit among the allowed pairs, or
    None when not `record`).

    q (b, h, lq, d); k, v (b, hk, lk, d) with h a multiple of hk (GQA: query head i reads
    kv head i // (h // hk), as SDPA's enable_gqa); mask (b, 1, lq, lk) True where a query
    may attend. Scores and softmax in (at least) float32; `cap` > 0 applies `softcap` before the softmax.
    """
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    wide = torch.promote_types(q.dtype, torch.float32)  # at least float32 (float64 stays float64)
    with torch.autocast(q.device.type, enabled=False):
        scores = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * q.shape[-1] ** -0.5  # (b, h, lq, lk)
        max_logit = scores.detach().masked_fill(~mask, -torch.inf).amax() if record else None
        if cap:
            scores = softcap(scores, cap)
        probs = torch.softmax(scores.masked_fill(~mask, -torch.inf), dim=-1)
    return probs.to(v.dtype) @ v, max_logit


class Attention(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=bias)
        qkv_dim = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.qkv_norm = make_norm(cfg.qkv_norm, qkv_dim, cfg.norm_eps)
        self.q_norm = make_norm(cfg.qk_norm, cfg.head_dim, cfg.norm_eps)
        self.k_norm = make_norm(cfg.qk_norm, cfg.head_dim, cfg.norm_eps)
        self.post_proj_norm = make_norm(cfg.post_proj_norm, cfg.d_model, cfg.norm_eps)
        self.softcap = float(cfg.attn_logit_softcap)
        self.record_logits = False  # set by hybridlm.monitor: keep the largest raw logit of each call
        self.last_logit_max: Tensor | None = None

    def _heads(self, t: Tensor, n: int) -> Tensor:
        b, l, _ = t.shape
        return t.view(b, l, n, self.head_dim).transpose(1, 2)  # (b, n, l, d)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Projections (+ the optional QKV / QK norms), as heads (b, n, l, head_dim)."""
        q, k, v = project(self.q_proj, x), project(self.k_proj, x), project(self.v_proj, x)
        if self.qkv_norm is not None:
            qkv = self.qkv_norm(torch.cat([q, k, v], dim=-1))
            q, k, v = qkv.split([q.shape[-1], k.shape[-1], v.shape[-1]], dim=-1)
        q, k, v = self._heads(q, self.n_heads), self._heads(k, self.n_kv_heads), self._heads(v, self.n_kv_heads)
        return maybe_norm(self.q_norm, q), maybe_norm(self.k_norm, k), v

    def forward(self, x: Tensor, cache: KVCache | None = None, key_valid: Tensor | None = None,
                seq_idx: Tensor | None = None) -> Tensor:
        """x (b, l, d_model). key_valid (b, k_len) marks real tokens among all keys (None: no padding).
        seq_idx (b, l): document index of every token of packed training rows (no cache, no padding):
        a query sees the earlier keys of its own document only (`document_causal_mask`)."""
        b, l, _ = x.shape
        if seq_idx is not None and (cache is not None or key_valid is not None):
            raise ValueError("seq_idx (packed documents) is for training: not with a KV cache or a padding mask")
        q, k, v = self._qkv(x)
        if cache is not None:
            k, v = cache.append(k, v)
        k_len = k.shape[2]
        explicit = self.softcap or self.record_logits
        if seq_idx is not None:
            out = self._masked(q, k, v, document_causal_mask(seq_idx))
        elif not explicit and key_valid is None and k_len == l:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        elif not explicit and key_valid is None and l == 1:
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:
            if key_valid is None:
                key_valid = torch.ones(b, k_len, dtype=torch.bool, device=x.device)
            out = self._masked(q, k, v, attention_mask(l, key_valid))
        return maybe_norm(self.post_proj_norm, self.o_proj(out.transpose(1, 2).reshape(b, l, -1)))

    def _masked(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        """Attention under a boolean mask (b, 1, lq, lk): `explicit_attention` when capping or
        recording logits, else SDPA."""
        if self.softcap or self.record_logits:
            out, self.last_logit_max = explicit_attention(q, k, v, mask, self.softcap, record=self.record_logits)
            return out
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def step(self, x: Tensor, kv, positions: Tensor, key_valid: Tensor) -> Tensor:
        """One decoding step on a static cache: x (s, d_model); `kv` a `StaticKV` whose buffers
        (s, kv_heads, max_len, head_dim) get the new key/value at column positions[s] (in place);
        key_valid (s, max_len) marks the columns each slot may attend to (its new key included)."""
        s = x.shape[0]
        q, k, v = self._qkv(x[:, None])                            # (s, heads, 1, head_dim)
        rows = torch.arange(s, device=x.device)
        kv.k[rows, :, positions] = k[:, :, 0]   # index_put_: compiles to a write of s columns in place
        kv.v[rows, :, positions] = v[:, :, 0]   # (scatter_ made inductor copy the whole buffer each step)
        mask = key_valid[:, None, None, :]                           # (s, 1, 1, max_len)
        if self.softcap or self.record_logits:
            out, self.last_logit_max = explicit_attention(q, kv.k, kv.v, mask, self.softcap,
                                                          record=self.record_logits)
        else:  # GQA with one query: a kv head's query heads are its "query positions" (no K/V copies)
            grouped = q.view(s, self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim)
            out = F.scaled_dot_product_attention(grouped, kv.k, kv.v, attn_mask=mask)
        return maybe_norm(self.post_proj_norm, project(self.o_proj, out.reshape(s, -1)))
