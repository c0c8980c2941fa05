"""The SSD (state-space duality) scan of Mamba-2, three ways.

Shapes (b batch, l length, h heads, p head dim, g groups, n state size):
    x  (b, l, h, p)   inputs            dt (b, l, h)   step sizes (after softplus)
    A  (h,)           negative decay    B, C (b, l, g, n)  input/output projections
    D  (h,) or None   skip              state (b, h, p, n)

The recurrence, per head (heads share B/C within a group of h // g heads):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t (outer) B_t
    y_t     = state_t . C_t + D * x_t

* `ssd_sequential`: the recurrence as written, one step at a time (the reference).
* `ssd_chunked`: the chunked SSD algorithm for training and prefill: quadratic
  attention-like form within chunks of `chunk_size`, state passing across chunks.
* `ssd_step`: one decoding step on a constant-size state.

`ssd_sequential` and `ssd_chunked` take ``seq_idx`` (b, l), the document index of every
token of packed rows (`hybridlm.model.documents`): the state is reset to zero at each
document start, so no document sees another; `initial_state` then only reaches the row's
first document and the returned state is that of the row's last document. The chunked
form masks, as mamba_ssm's kernels do, the within-chunk decay between documents, the
contributions of tokens whose document ended before their chunk's end, and the passing of
a chunk's state to chunks of a later document.

All three compute in at least float32 (float64 stays float64) and return y in the
input dtype and the state in the compute dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .documents import document_starts


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _heads_per_group(x_heads: int, groups: int) -> int:
    if x_heads % groups:
        raise ValueError(f"heads ({x_heads}) must be divisible by groups ({groups})")
    return x_heads // groups


def ssd_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One recurrent step. state (b,h,p,n), x (b,h,p), dt (b,h), B/C (b,g,n) -> y (b,h,p), new state."""
    cdt = _compute_dtype(state)
    b, h, p = x.shape
    g, n = B.shape[1:]
    r = _heads_per_group(h, g)
    xf, dtf = x.to(cdt).view(b, g, r, p), dt.to(cdt).view(b, g, r)
    decay = torch.exp(dtf * A.to(cdt).view(g, r))                         # (b, g, r)
    Bg, Cg = B.to(cdt)[:, :, None, None, :], C.to(cdt)[:, :, None, :]      # broadcast over the group's heads
    state = state.to(cdt).view(b, g, r, p, n) * decay[..., None, None] + (dtf[..., None] * xf)[..., None] * Bg
    y = (state @ Cg[..., None]).squeeze(-1)                                # (b, g, r, p)
    if D is not None:
        y = y + D.to(cdt).view(g, r)[..., None] * xf
    y, state = y.reshape(b, h, p), state.reshape(b, h, p, n)
    return y.to(x.dtype), state


def ssd_sequential(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Reference: run `ssd_step` over the sequence. Returns y (b,l,h,p), final state (b,h,p,n).

    With `seq_idx` (b, l) the state is set to zero before the first step of every document
    after a row's first one.
    """
    b, l, h, p = x.shape
    n = B.shape[-1]
    state = initial_state
    if state is None:
        state = x.new_zeros((b, h, p, n), dtype=_compute_dtype(x))
    starts = document_starts(seq_idx) if seq_idx is not None else None  # (b, l)
    ys = []
    for t, (xt, dtt, Bt, Ct) in enumerate(zip(x.unbind(1), dt.unbind(1), B.unbind(1), C.unbind(1))):
        if starts is not None and t > 0:
            state = torch.where(starts[:, t, None, None, None], 0.0, state)
        y, state = ssd_step(state, xt, dtt, A, Bt, Ct, D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def segsum(a: Tensor) -> Tensor:
    """Stable segment sums: out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, -inf above.

    a (..., T) -> (..., T, T). exp(segsum(a)) is the lower-triangular decay matrix.
    """
    T = a.shape[-1]
    a = a[..., None].expand(*a.shape, T)  # a[..., k, j] = a_k
    below = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    a = a.masked_fill(~below, 0.0)
    out = torch.cumsum(a, dim=-2)  # sum over k in (j, i]
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~keep, float("-inf"))


def to_chunks(t: Tensor, pad: int, chunk: int) -> Tensor:
    """(b, l, ...) -> (b, c, chunk, ...) after zero-padding l on the right."""
    if pad:
        t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))
    return t.reshape(t.shape[0], -1, chunk, *t.shape[2:])


def chunk_documents(seq_idx: Tensor, pad: int, chunk: int) -> tuple[Tensor, Tensor]:
    """seq_idx (b, l) -> the document of every chunk position (b, c, chunk), the padded tail
    continuing the last document, and the document of every state slot (b, c + 1): the initial
    state's (the row's first document), then each chunk end's."""
    if pad:
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1)
    per_chunk = seq_idx.reshape(seq_idx.shape[0], -1, chunk)
    return per_chunk, torch.cat([seq_idx[:, :1], per_chunk[..., -1]], dim=1)


def pass_states(chunk_states: Tensor, chunk_log_decay: Tensor, initial_state: Tensor | None,
                slot_docs: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """States entering each chunk, and the final state.

    chunk_states (b, c, h, p, n): each chunk's own contribution at its end; chunk_log_decay
    (b, h, c): the summed dt * A of each chunk. entering_z = sum_{c<z} decay(c -> z) * state_c
    (the initial state counts as chunk -1). With `slot_docs` (b, c + 1) from `chunk_documents`,
    a state only reaches chunk ends of its own document. Returns (b, c, h, p, n) and (b, h, p, n).
    """
    b, nc, h, p, n = chunk_states.shape
    if initial_state is None:
        init = chunk_states.new_zeros((b, 1, h, p, n))
    else:
        init = initial_state.to(chunk_states.dtype).reshape(b, 1, h, p, n)
    states = torch.cat([init, chunk_states], dim=1)                        # (b, c+1, h, p, n)
    decay = torch.exp(segsum(F.pad(chunk_log_decay, (1, 0))))            # (b, h, c+1, c+1)
    if slot_docs is not None:
        decay = decay * (slot_docs[:, None, :, None] == slot_docs[:, None, None, :])
    passed = torch.einsum("bhzc,bchpn->bzhpn", decay, states)
    return passed[:, :-1], passed[:, -1]


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
    D: Tensor | None = None, initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD. Any length works: the tail is padded with dt = 0 (identity steps).

    Returns y (b,l,h,p) in x.dtype and the final state (b,h,p,n) in the compute dtype.
    `seq_idx` (b, l): document boundaries, as `ssd_sequential`.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = _heads_per_group(h, g)
    cdt = _compute_dtype(x)
    Q = chunk_size
    pad = (-l) % Q
    # (b, c, Q, ...) chunks; padded steps have dt = 0, so they neither decay nor write the state.
    xc = to_chunks(x.to(cdt), pad, Q)                       # (b, c, Q, h, p)
    dtc = to_chunks(dt.to(cdt), pad, Q)                     # (b, c, Q, h)
    Bc = to_chunks(B.to(cdt), pad, Q)                       # (b, c, Q, g, n)
    Cc = to_chunks(C.to(cdt), pad, Q)
    nc = xc.shape[1]

    a = (dtc * A.to(cdt)).permute(0, 3, 1, 2)                # (b, h, c, Q) log-decay per step
    a_cum = torch.cumsum(a, dim=-1)                          # (b, h, c, Q)
    xdt = xc * dtc[..., None]                                # (b, c, Q, h, p)
    xdt_g = xdt.reshape(b, nc, Q, g, r, p)

    # 1. within chunks: y[l] = sum_{s<=l} (C_l . B_s) exp(a_{s+1..l}) dt_s x_s
    decay = torch.exp(segsum(a)).reshape(b, g, r, nc, Q, Q)  # (b, g, r, c, l, s)
    # documents of the chunk positions (b, c, Q) and of the state slots (b, c + 1)
    docs, slot_docs = chunk_documents(seq_idx, pad, Q) if seq_idx is not None else (None, None)
    if seq_idx is not None:  # no decay path between two documents
        decay = decay * (docs[:, None, None, :, :, None] == docs[:, None, None, :, None, :])
    scores = torch.einsum("bclgn,bcsgn->bgcls", Cc, Bc)      # (b, g, c, l, s)
    weights = scores[:, :, None] * decay                     # (b, g, r, c, l, s)
    y_diag = torch.einsum("bgrcls,bcsgrp->bclgrp", weights, xdt_g)

    # 2. each chunk's own contribution to the state at its end
    to_end = torch.exp(a_cum[..., -1:] - a_cum).reshape(b, g, r, nc, Q)  # (b, g, r, c, s)
    if seq_idx is not None:  # only tokens of the document still open at the chunk's end
        to_end = to_end * (docs == docs[..., -1:])[:, None, None]
    chunk_states = torch.einsum("bcsgn,bgrcs,bcsgrp->bcgrpn", Bc, to_end, xdt_g)

    # 3. pass states across chunks
    entering, final = pass_states(chunk_states.reshape(b, nc, h, p, n), a_cum[..., -1], initial_state,
                                  slot_docs)
    entering = entering.reshape(b, nc, g, r, p, n)

    # 4. the entering state's contribution to each output: C_l . state * exp(a_{1..l})
    from_start = torch.exp(a_cum).reshape(b, g, r, nc, Q)    # (b, g, r, c, l)
    if seq_idx is not None:  # the entering state belongs to the document open before the chunk
        from_start = from_start * (docs == slot_docs[:, :-1, None])[:, None, None]
    y_off = torch.einsum("bclgn,bcgrpn,bgrcl->bclgrp", Cc, entering, from_start)

    y = (y_diag + y_off).reshape(b, nc * Q, h, p)[:, :l]
    if D is not None:
        y = y + D.to(cdt)[:, None] * x.to(cdt)
    return y.to(x.dtype), final
