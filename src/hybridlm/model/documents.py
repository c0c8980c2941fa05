"""Document boundaries in packed training rows: `seq_idx`, as mamba_ssm and flash-attention name it.

A packed row holds several documents back to back. ``seq_idx`` (b, l), an integer tensor,
gives each token's document index, non-decreasing along each row: a token whose index
differs from its predecessor's starts a new document. Rows are independent (two rows may
use the same numbers for different documents). The model keeps documents apart: the
Mamba state is reset and the conv window sees zeros at a document start, and attention
is block-diagonal causal (`document_causal_mask`).

flash-attention's varlen form, ``cu_seqlens`` (int32 cumulative lengths [0, l0, l0 + l1,
..., total] of one flattened row), converts both ways (`seq_idx_from_cu_seqlens`,
`cu_seqlens_from_seq_idx`).
"""

from __future__ import annotations

import torch
from torch import Tensor

INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def seq_idx_from_cu_seqlens(cu_seqlens: Tensor, total_len: int) -> Tensor:
    """(1, total_len) int64 document indices of flash-attn's cu_seqlens [0, l0, l0 + l1, ..., total_len].

    Zero-length documents (repeated offsets) leave a gap in the indices and do not come back
    from `cu_seqlens_from_seq_idx`.
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype not in INTEGER_DTYPES:
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor [0, l0, ..., total], got dtype "
                         f"{cu_seqlens.dtype} shape {tuple(cu_seqlens.shape)}")
    cu = cu_seqlens.to(torch.int64)
    if int(cu[0]) != 0 or int(cu[-1]) != total_len or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at total_len={total_len}, "
                         f"got {cu.tolist()}")
    positions = torch.arange(total_len, device=cu.device)
    # document of position t: how many document ends (cu[1:]) lie at or before t
    return torch.searchsorted(cu[1:].contiguous(), positions, right=True)[None]


def document_starts(seq_idx: Tensor) -> Tensor:
    """Bool (b, l): True at the first token of each document (column 0 of every row included)."""
    starts = torch.ones_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def cu_seqlens_from_seq_idx(seq_idx: Tensor) -> Tensor:
    """int32 cu_seqlens of the documents of all rows, flattened row after row (flash-attn varlen)."""
    b, l = seq_idx.shape
    starts = document_starts(seq_idx).reshape(-1).nonzero().squeeze(-1)
    end = torch.full((1,), b * l, dtype=starts.dtype, device=starts.device)
    return torch.cat([starts, end]).to(torch.int32)


def check_seq_idx(seq_idx: Tensor, input_ids: Tensor) -> None:
    """ValueError unless seq_idx is an integer tensor shaped like input_ids, non-decreasing per row.

    Host-synchronising: call it in eager mode only (`HybridLM.forward` skips it under compile).
    """
    if seq_idx.shape != input_ids.shape:
        raise ValueError(f"seq_idx shape {tuple(seq_idx.shape)} != input_ids shape {tuple(input_ids.shape)}")
    if seq_idx.dtype not in INTEGER_DTYPES:
        raise ValueError(f"seq_idx must be an integer tensor (document index per token), got {seq_idx.dtype}")
    if seq_idx.shape[-1] > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along each row (a new document has a larger index)")


def single_document(seq_idx: Tensor) -> bool:
    """True when every row holds one document (then the model may take its unmasked paths). Syncs."""
    return bool((seq_idx == seq_idx[:, :1]).all())


def document_causal_mask(seq_idx: Tensor) -> Tensor:
    """Bool (b, 1, l, l) for `scaled_dot_product_attention`: query i sees key j iff j <= i and both
    lie in the same document (block-diagonal causal). The diagonal is always True."""
    l = seq_idx.shape[-1]
    causal = torch.ones(l, l, dtype=torch.bool, device=seq_idx.device).tril()
    same = seq_idx[:, :, None] == seq_idx[:, None, :]            # (b, q, k)
    return (same & causal)[:, None]


def same_document_as_previous(seq_idx: Tensor, shift: int) -> Tensor:
    """Bool (b, l): token t and token t - shift lie in the same document (False for t < shift)."""
    b, l = seq_idx.shape
    same = torch.zeros(b, l, dtype=torch.bool, device=seq_idx.device)
    if shift < l:
        same[:, shift:] = seq_idx[:, shift:] == seq_idx[:, : l - shift]
    return same
