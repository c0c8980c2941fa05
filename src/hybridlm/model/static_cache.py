"""Static inference cache: fixed-shape per-slot state for a compiled decode step.

One row ("slot") per sequence, preallocated up to `max_len` tokens (the approach of
gpt-fast and Hugging Face's StaticCache):

* per attention layer, K/V buffers (slots, kv_heads, max_len, head_dim); slot s holds its
  tokens in columns [0, lengths[s]) and the decode step writes the new key at column
  lengths[s], attending under the mask ``column <= lengths[s]``;
* per Mamba layer, the conv window and SSM state (`MambaState`), updated in place.

Shapes never change while decoding, so a step has no host synchronisation and
compiles to one graph (`hybridlm.model.decode_step`). A sequence joins by copying its
own prefilled `InferenceCache` row into a free slot (`write_slot`), and leaves by
`free_slot`: the other slots are never copied. `lengths` and `active` are device tensors
the step reads and advances; callers track the same lengths on the host to stay within
`max_len`. On CUDA every buffer is marked as a static address, so a step compiled with
CUDA graphs (the `Decoder`'s and the engine's alike) updates it in place. The growable
`InferenceCache` stays the simple reference (tested equal).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import HybridConfig
from .cache import InferenceCache, MambaState, empty_layers


@dataclass
class StaticKV:
    k: Tensor  # (slots, kv_heads, max_len, head_dim)
    v: Tensor


class StaticCache:
    """Per-layer fixed-shape state of `slots` sequences of at most `max_len` tokens each."""

    def __init__(self, layers: list[MambaState | StaticKV | None], lengths: Tensor, active: Tensor,
                 max_len: int) -> None:
        self.layers, self.lengths, self.active, self.max_len = layers, lengths, active, max_len
        if lengths.is_cuda:  # fixed addresses: CUDA graphs of the compiled step replay on them in place
            for t in self.tensors():
                torch._dynamo.mark_static_address(t)

    @classmethod
    def empty(cls, cfg: HybridConfig, slots: int, max_len: int, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32) -> "StaticCache":
        if slots < 1 or max_len < 1:
            raise ValueError(f"a static cache needs slots >= 1 and max_len >= 1, got {slots} and {max_len}")
        layers = empty_layers(cfg, slots, max_len, device, dtype, StaticKV)
        zeros = torch.zeros(slots, dtype=torch.long, device=device)
        return cls(layers, zeros, zeros.clone(), max_len)

    @property
    def slots(self) -> int:
        return self.lengths.shape[0]

    def tensors(self) -> list[Tensor]:
        """Every buffer (e.g. to mark as static addresses for CUDA graphs)."""
        out = [self.lengths, self.active]
        for layer in self.layers:
            if isinstance(layer, MambaState):
                out += [layer.conv, layer.ssm]
            elif isinstance(layer, StaticKV):
                out += [layer.k, layer.v]
        return out

    def first(self, n: int) -> "StaticCache":
        """Views of slots [0, n): a step on them writes through to this cache (no copy)."""
        layers = [MambaState(s.conv[:n], s.ssm[:n]) if isinstance(s, MambaState)
                  else StaticKV(s.k[:n], s.v[:n]) if isinstance(s, StaticKV) else None for s in self.layers]
        return StaticCache(layers, self.lengths[:n], self.active[:n], self.max_len)

    def write_slot(self, slot: int, cache: InferenceCache, row: int = 0) -> int:
        """Copy row `row` of a prefilled growable cache into `slot`, mark it active; returns its length.

        Only the row's real (unmasked) tokens are copied, in order, so padding of any kind is dropped.
        """
        real = cache.mask[row].nonzero().squeeze(1)  # (length,) columns holding real tokens
        length = real.numel()
        if length > self.max_len:
            raise ValueError(f"a sequence of {length} tokens does not fit a static cache of {self.max_len}")
        for mine, theirs in zip(self.layers, cache.layers):
            if isinstance(mine, MambaState):
                mine.conv[slot].copy_(theirs.conv[row])
                mine.ssm[slot].copy_(theirs.ssm[row])
            elif isinstance(mine, StaticKV):
                mine.k[slot, :, :length].copy_(theirs.k[row, :, real])
                mine.v[slot, :, :length].copy_(theirs.v[row, :, real])
        self.lengths[slot] = length
        self.active[slot] = 1
        return length

    def free_slot(self, slot: int) -> None:
        """Mark `slot` free: the step leaves its length at 0 (its contents are overwritten on reuse)."""
        self.lengths[slot] = 0
        self.active[slot] = 0

    def resized(self, max_len: int) -> "StaticCache":
        """A copy with room for `max_len` tokens per slot (kept: the first min(old, new) columns)."""
        return StaticCache(self._resized_layers(max_len), self.lengths.clone(), self.active.clone(), max_len)

    def _resized_layers(self, max_len: int) -> list[MambaState | StaticKV | None]:
        keep = min(max_len, self.max_len)
        layers: list[MambaState | StaticKV | None] = []
        for layer in self.layers:
            if isinstance(layer, MambaState):
                layers.append(MambaState(layer.conv.clone(), layer.ssm.clone()))
            elif isinstance(layer, StaticKV):
                s, h, _, d = layer.k.shape
                k, v = (layer.k.new_zeros(s, h, max_len, d) for _ in range(2))
                k[:, :, :keep], v[:, :, :keep] = layer.k[:, :, :keep], layer.v[:, :, :keep]
                layers.append(StaticKV(k, v))
            else:
                layers.append(None)
        return layers

    def nbytes(self) -> dict[str, int]:
        out = {"mamba": 0, "attention": 0}
        for layer in self.layers:
            if isinstance(layer, MambaState):
                out["mamba"] += layer.nbytes()
            elif isinstance(layer, StaticKV):
                out["attention"] += 2 * layer.k.numel() * layer.k.element_size()
        return out

