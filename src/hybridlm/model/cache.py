"""Inference cache: constant-size Mamba-2 states and growing KV caches.

Per Mamba layer: the last `conv_kernel - 1` conv inputs and the SSM state
(b, h, p, n): the same size whatever the sequence length. Per attention layer: a
preallocated K/V buffer (b, kv_heads, capacity, head_dim). The cache also keeps the
key padding mask of the batch (left padding), so attention ignores pad tokens.

Rows can leave (`select`, then `trim` drops the columns no row uses any more) and join
(`add_rows`, e.g. a request prefilled on its own): the continuous-batching engine
(`hybridlm.engine`) keeps one such cache for all running requests. Sequences stay
right-aligned (every row's newest token in the last column); there is no positional
embedding, so where a row's tokens sit does not change its attention, only the mask does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..config import HybridConfig


@dataclass
class MambaState:
    conv: Tensor  # (b, conv_dim, conv_kernel - 1): last inputs of the causal conv
    ssm: Tensor   # (b, h, p, n) float32

    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.ssm.numel() * self.ssm.element_size()


@dataclass
class KVCache:
    k: Tensor  # (b, kv_heads, capacity, head_dim)
    v: Tensor
    length: int = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k/v (b, kv_heads, l, d) after the cached ones; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.k.shape[2]:
            self._grow(end)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grow(self, needed: int) -> None:
        cap = max(needed, 2 * self.k.shape[2])
        pad = (0, 0, 0, cap - self.k.shape[2])
        self.k = torch.nn.functional.pad(self.k, pad)
        self.v = torch.nn.functional.pad(self.v, pad)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def stacked_with(self, other: "KVCache", width: int) -> "KVCache":
        """A new cache holding our rows then `other`'s, both right-aligned to `width` columns.

        Columns left of a row's tokens are zero (the mask hides them; zeros, not garbage,
        so no NaN can leak through a zero attention weight).
        """
        rows = self.k.shape[0] + other.k.shape[0]
        cap = max(self.capacity, other.capacity, width)
        k = self.k.new_zeros(rows, self.k.shape[1], cap, self.k.shape[3])
        v = torch.zeros_like(k)
        b = self.k.shape[0]
        for part, lo, hi in ((self, 0, b), (other, b, rows)):
            start = width - part.length
            k[lo:hi, :, start:width] = part.k[:, :, :part.length]
            v[lo:hi, :, start:width] = part.v[:, :, :part.length]
        return KVCache(k, v, width)

    def nbytes(self) -> int:
        """Bytes actually holding tokens (not the spare capacity)."""
        b, h, _, d = self.k.shape
        return 2 * b * h * self.length * d * self.k.element_size()


def empty_layers(cfg: HybridConfig, batch: int, length: int, device: torch.device | str, dtype: torch.dtype,
                 kv: Callable[[Tensor, Tensor], Any]) -> list[Any]:
    """Zero per-layer state: `MambaState` (conv window in `dtype`, SSM state in at least float32)
    for M layers, ``kv(k, v)`` of zero (batch, kv_heads, length, head_dim) buffers for attention
    layers, None for MLPs. Shared by the growable and the static cache."""
    layers: list[Any] = []
    for kind in cfg.layer_kinds():
        if kind == "mamba":
            layers.append(MambaState(
                conv=torch.zeros(batch, cfg.conv_dim, cfg.conv_kernel - 1, device=device, dtype=dtype),
                ssm=torch.zeros(batch, cfg.mamba_heads, cfg.mamba_head_dim, cfg.ssm_state,
                                device=device, dtype=torch.promote_types(dtype, torch.float32))))
        elif kind == "attention":
            shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
            layers.append(kv(torch.zeros(shape, device=device, dtype=dtype),
                             torch.zeros(shape, device=device, dtype=dtype)))
        else:
            layers.append(None)
    return layers


class InferenceCache:
    """Per-layer states for prefill + decode; `mask` (b, tokens seen) marks real (non-pad) tokens."""

    def __init__(self, layers: list[MambaState | KVCache | None], batch: int, device: torch.device) -> None:
        self.layers = layers
        self.mask = torch.ones(batch, 0, dtype=torch.bool, device=device)
        self.has_padding = False  # any False in `mask` (lets attention skip the mask when there is none)

    @classmethod
    def empty(cls, cfg: HybridConfig, batch: int, capacity: int = 256,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "InferenceCache":
        layers = empty_layers(cfg, batch, capacity, device, dtype, KVCache)
        return cls(layers, batch, torch.device(device))

    @property
    def seen(self) -> int:
        """Tokens (pads included) already processed."""
        return self.mask.shape[1]

    def extend_mask(self, mask: Tensor | None, length: int) -> Tensor | None:
        """Record the validity of `length` new positions (None: all real); return the key mask or None."""
        if mask is None:
            mask = torch.ones(self.mask.shape[0], length, dtype=torch.bool, device=self.mask.device)
        else:
            self.has_padding = self.has_padding or not bool(mask.all())
        self.mask = torch.cat([self.mask, mask.to(torch.bool)], dim=1)
        return self.mask if self.has_padding else None

    def nbytes(self) -> dict[str, int]:
        out = {"mamba": 0, "attention": 0}
        for layer in self.layers:
            if isinstance(layer, MambaState):
                out["mamba"] += layer.nbytes()
            elif isinstance(layer, KVCache):
                out["attention"] += layer.nbytes()
        return out

    def select(self, rows: Tensor) -> None:
        """Keep only the batch rows `rows` (e.g. drop finished sequences)."""
        for layer in self.layers:
            if isinstance(layer, MambaState):
                layer.conv, layer.ssm = layer.conv[rows], layer.ssm[rows]
            elif isinstance(layer, KVCache):
                layer.k, layer.v = layer.k[rows], layer.v[rows]
        self.mask = self.mask[rows]
        self.has_padding = bool((~self.mask).any())

    def trim(self) -> None:
        """Drop the leading columns that are padding in every row (left behind by rows that left)."""
        used = self.mask.any(dim=0)
        start = int(used.nonzero()[0]) if bool(used.any()) else self.seen
        if start == 0:
            return
        for layer in self.layers:
            if isinstance(layer, KVCache):
                layer.k, layer.v = layer.k[:, :, start:], layer.v[:, :, start:]
                layer.length -= start
        self.mask = self.mask[:, start:]
        self.has_padding = bool((~self.mask).any())

    def add_rows(self, other: "InferenceCache") -> None:
        """Append `other`'s batch rows after ours (a request joining a running batch).

        The side with fewer columns is left-padded with masked columns, so every row's
        newest token stays in the last column. Mamba states are copied as they are; the
        KV caches are copied once into new buffers.
        """
        if len(other.layers) != len(self.layers):
            raise ValueError(f"cannot join caches of {len(self.layers)} and {len(other.layers)} layers")
        for i, (mine, theirs) in enumerate(zip(self.layers, other.layers)):  # check all before changing any
            if type(mine) is not type(theirs):
                raise ValueError(f"layer {i}: cannot join a {type(mine).__name__} with a {type(theirs).__name__}")
        width = max(self.seen, other.seen)
        for i, (mine, theirs) in enumerate(zip(self.layers, other.layers)):
            if isinstance(mine, MambaState):
                mine.conv = torch.cat([mine.conv, theirs.conv.to(mine.conv.dtype)])
                mine.ssm = torch.cat([mine.ssm, theirs.ssm.to(mine.ssm.dtype)])
            elif isinstance(mine, KVCache):
                self.layers[i] = mine.stacked_with(theirs, width)
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(other.mask.to(self.mask.device), width)])
        self.has_padding = bool((~self.mask).any())


def _pad_left(mask: Tensor, width: int) -> Tensor:
    """(b, l) bool mask -> (b, width) with False columns added on the left."""
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0), value=False)
