"""The chunked SSD scan with Triton kernels (forward and backward), for CUDA.

Same contract as `ssd.ssd_chunked`, which stays beside it as the reference (as mamba_ssm
keeps `ssd_minimal` beside its kernels). Two kernels do the per-chunk work, one program
per (batch, chunk, head), float32 throughout (`tl.dot` in IEEE precision):

* `chunk_state`: a chunk's own state at its end, ``S = (x * dt * exp(a_end - a))^T B``;
* `chunk_scan`: its outputs, ``y = ((C B^T) * L) (x * dt) + exp(a) * (C S_in^T)``, with
  L the causal decay matrix ``exp(a_l - a_s)`` (s <= l) and S_in the entering state;

each with a hand-written backward kernel (`torch.autograd.Function`). The glue stays
PyTorch and autograd: padding to whole chunks (dt = 0, identity steps), the within-chunk
cumulative log-decay, passing states across chunks (`ssd.pass_states`) and the D skip.
Triton's interpreter (`TRITON_INTERPRET=1`, set before this module is imported) runs the
kernels on CPU tensors, so they are tested equal to `ssd_chunked` on CPU, forward and
gradients, on small shapes (`tests/model/test_ssd_triton.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .ssd import chunk_documents, pass_states, to_chunks

IEEE = "ieee"


@triton.jit
def _tiles(X, DT, AC, BM, pid, Q, P, N, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    """x (BQ, BP), dt, a (BQ,), B (BQ, BN) of program `pid`, zero outside the real sizes."""
    q, p, n = tl.arange(0, BQ), tl.arange(0, BP), tl.arange(0, BN)
    mq, mp, mn = q < Q, p < P, n < N
    x = tl.load(X + pid * Q * P + q[:, None] * P + p[None, :], mask=mq[:, None] & mp[None, :], other=0.0)
    dt = tl.load(DT + pid * Q + q, mask=mq, other=0.0)
    a = tl.load(AC + pid * Q + q, mask=mq, other=0.0)
    b = tl.load(BM + pid * Q * N + q[:, None] * N + n[None, :], mask=mq[:, None] & mn[None, :], other=0.0)
    return x, dt, a, b


@triton.jit
def _to_end(AC, SEQ, pid, a, Q, BQ: tl.constexpr, HAS_SEQ: tl.constexpr):
    """(BQ,) exp(a_end - a_s): the decay from each step to the chunk's end; with document indices
    SEQ, zero for the steps of documents that end before the chunk does."""
    e = tl.exp(tl.load(AC + pid * Q + Q - 1) - a)
    if HAS_SEQ:
        q = tl.arange(0, BQ)
        docs = tl.load(SEQ + pid * Q + q, mask=q < Q, other=-1)
        e = tl.where(docs == tl.load(SEQ + pid * Q + Q - 1), e, 0.0)
    return e


@triton.jit
def _chunk_state_fwd(X, DT, AC, BM, SEQ, S, Q, P, N, BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr,
                     HAS_SEQ: tl.constexpr):
    pid = tl.program_id(0)
    x, dt, a, b = _tiles(X, DT, AC, BM, pid, Q, P, N, BQ, BP, BN)
    w = dt * _to_end(AC, SEQ, pid, a, Q, BQ, HAS_SEQ)                       # (BQ,) zero on pads
    out = tl.dot(tl.trans(x * w[:, None]), b, input_precision=IEEE)        # (BP, BN)
    p, n = tl.arange(0, BP), tl.arange(0, BN)
    tl.store(S + pid * P * N + p[:, None] * N + n[None, :], out, mask=(p[:, None] < P) & (n[None, :] < N))


@triton.jit
def _chunk_state_bwd(X, DT, AC, BM, SEQ, DS, DX, DDT, DAC, DB, Q, P, N,
                     BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr):
    pid = tl.program_id(0)
    x, dt, a, b = _tiles(X, DT, AC, BM, pid, Q, P, N, BQ, BP, BN)
    q, p, n = tl.arange(0, BQ), tl.arange(0, BP), tl.arange(0, BN)
    mq, mp, mn = q < Q, p < P, n < N
    ds = tl.load(DS + pid * P * N + p[:, None] * N + n[None, :], mask=mp[:, None] & mn[None, :], other=0.0)
    e = _to_end(AC, SEQ, pid, a, Q, BQ, HAS_SEQ)  # the document mask is a constant factor: same formulas
    w = dt * e
    b_ds = tl.dot(b, tl.trans(ds), input_precision=IEEE)                   # (BQ, BP)
    dw = tl.sum(x * b_ds, axis=1)                                          # d out / d w_s
    dw_w = dw * w
    dac = tl.where(q == Q - 1, tl.sum(dw_w, axis=0), 0.0) - dw_w           # w_s = dt_s exp(a_end - a_s)
    qp, qn = mq[:, None] & mp[None, :], mq[:, None] & mn[None, :]
    tl.store(DX + pid * Q * P + q[:, None] * P + p[None, :], w[:, None] * b_ds, mask=qp)
    tl.store(DDT + pid * Q + q, dw * e, mask=mq)
    tl.store(DAC + pid * Q + q, dac, mask=mq)
    x_ds = tl.dot(x, ds, input_precision=IEEE)                              # (BQ, BN)
    tl.store(DB + pid * Q * N + q[:, None] * N + n[None, :], w[:, None] * x_ds, mask=qn)


@triton.jit
def _scan_terms(X, DT, AC, BM, CM, SIN, SEQ, PREV, pid, Q, P, N, BQ: tl.constexpr, BP: tl.constexpr,
                BN: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The chunk's tiles, its (BQ, BQ) mixing matrix M = (C B^T) * L, L = causal exp(a_l - a_s), and
    e = exp(a_l), the entering state's decay to each step. With document indices (SEQ per step,
    PREV the entering state's), L is zero between documents and e where the step's document is
    not the entering state's."""
    x, dt, a, b = _tiles(X, DT, AC, BM, pid, Q, P, N, BQ, BP, BN)
    q, p, n = tl.arange(0, BQ), tl.arange(0, BP), tl.arange(0, BN)
    mq, mp, mn = q < Q, p < P, n < N
    c = tl.load(CM + pid * Q * N + q[:, None] * N + n[None, :], mask=mq[:, None] & mn[None, :], other=0.0)
    s_in = tl.load(SIN + pid * P * N + p[:, None] * N + n[None, :], mask=mp[:, None] & mn[None, :], other=0.0)
    causal = (q[:, None] >= q[None, :]) & mq[:, None] & mq[None, :]
    e = tl.exp(a)
    if HAS_SEQ:
        docs = tl.load(SEQ + pid * Q + q, mask=mq, other=-1)
        causal = causal & (docs[:, None] == docs[None, :])
        e = tl.where(docs == tl.load(PREV + pid), e, 0.0)
    decay = tl.where(causal, tl.exp(tl.where(causal, a[:, None] - a[None, :], 0.0)), 0.0)
    g = tl.dot(c, tl.trans(b), input_precision=IEEE)                        # (BQ, BQ) C_l . B_s
    return x, dt, a, b, c, s_in, causal, decay, g, e


@triton.jit
def _chunk_scan_fwd(X, DT, AC, BM, CM, SIN, SEQ, PREV, Y, Q, P, N, BQ: tl.constexpr, BP: tl.constexpr,
                    BN: tl.constexpr, HAS_SEQ: tl.constexpr):
    pid = tl.program_id(0)
    x, dt, a, b, c, s_in, causal, decay, g, e = _scan_terms(X, DT, AC, BM, CM, SIN, SEQ, PREV, pid, Q, P, N,
                                                            BQ, BP, BN, HAS_SEQ)
    y = tl.dot(g * decay, x * dt[:, None], input_precision=IEEE)            # (BQ, BP) within the chunk
    y += e[:, None] * tl.dot(c, tl.trans(s_in), input_precision=IEEE)       # from the entering state
    q, p = tl.arange(0, BQ), tl.arange(0, BP)
    tl.store(Y + pid * Q * P + q[:, None] * P + p[None, :], y, mask=(q[:, None] < Q) & (p[None, :] < P))


@triton.jit
def _chunk_scan_bwd(X, DT, AC, BM, CM, SIN, SEQ, PREV, DY, DX, DDT, DAC, DB, DC, DSIN, Q, P, N,
                    BQ: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr, HAS_SEQ: tl.constexpr):
    pid = tl.program_id(0)
    x, dt, a, b, c, s_in, causal, decay, g, e = _scan_terms(X, DT, AC, BM, CM, SIN, SEQ, PREV, pid, Q, P, N,
                                                            BQ, BP, BN, HAS_SEQ)
    q, p, n = tl.arange(0, BQ), tl.arange(0, BP), tl.arange(0, BN)
    mq, mp, mn = q < Q, p < P, n < N
    qp, qn = mq[:, None] & mp[None, :], mq[:, None] & mn[None, :]
    dy = tl.load(DY + pid * Q * P + q[:, None] * P + p[None, :], mask=qp, other=0.0)
    m, u = g * decay, x * dt[:, None]   # (the document masks are constant factors of decay and e)
    du = tl.dot(tl.trans(m), dy, input_precision=IEEE)                      # (BQ, BP)
    dm = tl.where(causal, tl.dot(dy, tl.trans(u), input_precision=IEEE), 0.0)
    dg = dm * decay
    t = dm * m                                                              # d/d a via the decay matrix
    z = tl.dot(c, tl.trans(s_in), input_precision=IEEE)                     # (BQ, BP)
    dz = e[:, None] * dy
    dac = tl.sum(t, axis=1) - tl.sum(t, axis=0) + tl.sum(dy * z, axis=1) * e
    dc = tl.dot(dg, b, input_precision=IEEE) + tl.dot(dz, s_in, input_precision=IEEE)
    tl.store(DX + pid * Q * P + q[:, None] * P + p[None, :], du * dt[:, None], mask=qp)
    tl.store(DDT + pid * Q + q, tl.sum(du * x, axis=1), mask=mq)
    tl.store(DAC + pid * Q + q, dac, mask=mq)
    tl.store(DB + pid * Q * N + q[:, None] * N + n[None, :], tl.dot(tl.trans(dg), c, input_precision=IEEE), mask=qn)
    tl.store(DC + pid * Q * N + q[:, None] * N + n[None, :], dc, mask=qn)
    tl.store(DSIN + pid * P * N + p[:, None] * N + n[None, :], tl.dot(tl.trans(dz), c, input_precision=IEEE),
             mask=mp[:, None] & mn[None, :])


def _blocks(Q: int, P: int, N: int) -> dict[str, int]:
    """Power-of-two tile sizes, at least 16 (tl.dot's minimum)."""
    return {f"B{k}": max(16, triton.next_power_of_2(v)) for k, v in (("Q", Q), ("P", P), ("N", N))}


def _documents(seq: Tensor | None, like: Tensor) -> tuple[Tensor, bool]:
    """The document-index argument of a kernel (any pointer when there is none) and HAS_SEQ."""
    return (seq.contiguous(), True) if seq is not None else (like, False)


class ChunkState(torch.autograd.Function):
    """x (G, Q, P), dt (G, Q), a (G, Q), B (G, Q, N), optional document indices (G, Q) -> each
    chunk's own end state (G, P, N)."""

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, a: Tensor, B: Tensor, seq: Tensor | None = None) -> Tensor:
        x, dt, a, B = (t.contiguous() for t in (x, dt, a, B))
        seq, has_seq = _documents(seq, dt)
        G, Q, P = x.shape
        N = B.shape[-1]
        out = x.new_empty(G, P, N)
        _chunk_state_fwd[(G,)](x, dt, a, B, seq, out, Q, P, N, **_blocks(Q, P, N), HAS_SEQ=has_seq)
        ctx.save_for_backward(x, dt, a, B, seq)
        ctx.has_seq = has_seq
        return out

    @staticmethod
    def backward(ctx, dS: Tensor):
        x, dt, a, B, seq = ctx.saved_tensors
        G, Q, P = x.shape
        N = B.shape[-1]
        dx, dB = torch.empty_like(x), torch.empty_like(B)
        ddt, da = torch.empty_like(dt), torch.empty_like(a)
        _chunk_state_bwd[(G,)](x, dt, a, B, seq, dS.contiguous(), dx, ddt, da, dB, Q, P, N, **_blocks(Q, P, N),
                               HAS_SEQ=ctx.has_seq)
        return dx, ddt, da, dB, None


class ChunkScan(torch.autograd.Function):
    """x (G, Q, P), dt, a (G, Q), B, C (G, Q, N), entering state (G, P, N), optional document indices
    of the steps (G, Q) and of the entering states (G,) -> y (G, Q, P)."""

    @staticmethod
    def forward(ctx, x: Tensor, dt: Tensor, a: Tensor, B: Tensor, C: Tensor, s_in: Tensor,
                seq: Tensor | None = None, prev: Tensor | None = None) -> Tensor:
        x, dt, a, B, C, s_in = (t.contiguous() for t in (x, dt, a, B, C, s_in))
        (seq, has_seq), (prev, _) = _documents(seq, dt), _documents(prev, dt)
        G, Q, P = x.shape
        N = B.shape[-1]
        y = torch.empty_like(x)
        _chunk_scan_fwd[(G,)](x, dt, a, B, C, s_in, seq, prev, y, Q, P, N, **_blocks(Q, P, N), HAS_SEQ=has_seq)
        ctx.save_for_backward(x, dt, a, B, C, s_in, seq, prev)
        ctx.has_seq = has_seq
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, dt, a, B, C, s_in, seq, prev = ctx.saved_tensors
        G, Q, P = x.shape
        N = B.shape[-1]
        grads = [torch.empty_like(t) for t in (x, dt, a, B, C, s_in)]
        _chunk_scan_bwd[(G,)](x, dt, a, B, C, s_in, seq, prev, dy.contiguous(), *grads, Q, P, N,
                              **_blocks(Q, P, N), HAS_SEQ=ctx.has_seq)
        return (*grads, None, None)


def ssd_triton(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
    D: Tensor | None = None, initial_state: Tensor | None = None, seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """`ssd_chunked` with the per-chunk work in Triton kernels: y (b,l,h,p) in x.dtype, final state float32.

    `seq_idx` (b, l): document boundaries of packed rows, as `ssd_chunked` (the kernels mask the
    decay between documents, the glue passes states within documents only)."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    Q, pad = chunk_size, (-l) % chunk_size
    heads = torch.arange(h, device=x.device) // (h // g)                    # head -> its group
    xc = to_chunks(x.float(), pad, Q).permute(0, 1, 3, 2, 4)                # (b, c, h, Q, p)
    dtc = to_chunks(dt.float(), pad, Q).permute(0, 1, 3, 2)                 # (b, c, h, Q); pads: dt = 0
    Bc = to_chunks(B.float(), pad, Q)[:, :, :, heads].permute(0, 1, 3, 2, 4)  # (b, c, h, Q, n)
    Cc = to_chunks(C.float(), pad, Q)[:, :, :, heads].permute(0, 1, 3, 2, 4)
    nc = xc.shape[1]
    a = torch.cumsum(dtc * A.float()[:, None], dim=-1)                      # (b, c, h, Q) log-decay so far

    def flat(t: Tensor) -> Tensor:  # (b, c, h, ...) -> (G, ...): one kernel program per chunk and head
        return t.reshape(b * nc * h, *t.shape[3:])

    seq = prev = slot_docs = None
    if seq_idx is not None:
        docs, slot_docs = chunk_documents(seq_idx, pad, Q)                  # (b, c, Q), (b, c + 1)
        seq = flat(docs[:, :, None].expand(b, nc, h, Q))                    # (G, Q) each step's document
        prev = flat(slot_docs[:, :-1, None].expand(b, nc, h))               # (G,) the entering state's
    own = ChunkState.apply(flat(xc), flat(dtc), flat(a), flat(Bc), seq).reshape(b, nc, h, p, n)
    entering, final = pass_states(own, a[..., -1].permute(0, 2, 1), initial_state, slot_docs)
    y = ChunkScan.apply(flat(xc), flat(dtc), flat(a), flat(Bc), flat(Cc), flat(entering), seq, prev)
    y = y.reshape(b, nc, h, Q, p).permute(0, 1, 3, 2, 4).reshape(b, nc * Q, h, p)[:, :l]
    if D is not None:
        y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), final
