"""The Mamba-2 mixer (Nemotron-H `M` layer).

in_proj -> [z, xBC, dt]; causal depthwise conv1d + SiLU on xBC = [x, B, C];
dt = softplus(dt + dt_bias) clamped to `time_step_limit`; SSD scan with A = -exp(A_log)
(one scalar per head), grouped B/C and a D skip; gated RMSNorm with z; out_proj; and,
when `mamba_out_norm` is on (a training-stability option, off by default), a norm
after out_proj (`out_norm`).

The same code serves training (no state), prefill (state filled at the end) and
decoding (one token: the recurrent `ssd_step`). Packed training rows pass `seq_idx`
(`hybridlm.model.documents`): the conv window sees zeros instead of an earlier
document's inputs (`DocumentConv`) and the scan restarts from a zero state at every
document start. Parameter names follow Hugging Face `NemotronHMamba2Mixer`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import HybridConfig
from .cache import MambaState
from .documents import same_document_as_previous
from .norms import GatedRMSNorm, make_norm, maybe_norm, wide
from .rowwise import local, project
from .scan import chunked_scan
from .ssd import ssd_step


def _shifted(x: Tensor, shift: int, keep: Tensor) -> Tensor:
    """x[:, t - shift] where keep[:, t] (same document), else 0. x (b, l, c), keep (b, l) bool."""
    back = F.pad(x, (0, 0, shift, 0))[:, : x.shape[1]]
    return torch.where(keep[..., None], back, 0.0)


class DocumentConv(torch.autograd.Function):
    """Depthwise causal conv (no bias) whose taps read zero across document starts, as
    causal_conv1d's seq_idx: out[t] = sum_s w[:, k-1-s] * x[t-s] over the s < k with token t - s
    in t's document. x (b, l, c), weight (c, k), keeps (k-1, b, l) bool: keeps[s-1] =
    `same_document_as_previous(seq_idx, s)`. Backward recomputes the shifted inputs, so only x
    is kept, as for F.conv1d."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, keeps: Tensor) -> Tensor:
        k = weight.shape[1]
        out = x * weight[:, k - 1]
        for s in range(1, k):
            out = out + _shifted(x, s, keeps[s - 1]) * weight[:, k - 1 - s]
        ctx.save_for_backward(x, weight, keeps)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, keeps = ctx.saved_tensors
        k, l = weight.shape[1], x.shape[1]
        grad_x = grad * weight[:, k - 1]
        grad_w = [(grad * x).sum((0, 1))]                                    # tap k - 1, then k - 2, ...
        for s in range(1, k):
            grad_w.append((grad * _shifted(x, s, keeps[s - 1])).sum((0, 1)))
            if s < l:  # out[t] reads x[t - s]: its gradient flows back s steps
                kept = torch.where(keeps[s - 1, :, s:, None], grad[:, s:], 0.0) * weight[:, k - 1 - s]
                grad_x = grad_x + F.pad(kept, (0, 0, 0, s))
        return grad_x, torch.stack(grad_w[::-1], dim=1), None


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Sizes the forward uses, per process: tensor parallelism (hybridlm.training.tensor_parallel)
        # divides heads, groups and channels by the TP degree and sets these to the local sizes.
        self.d_inner, self.conv_dim = cfg.d_inner, cfg.conv_dim
        self.n_heads, self.head_dim, self.n_groups, self.d_state = (cfg.mamba_heads, cfg.mamba_head_dim,
                                                                    cfg.n_groups, cfg.ssm_state)
        self.in_proj = nn.Linear(cfg.d_model, cfg.in_proj_dim, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim,
                                padding=cfg.conv_kernel - 1, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(cfg.mamba_heads))
        self.A_log = nn.Parameter(torch.empty(cfg.mamba_heads))
        self.D = nn.Parameter(torch.empty(cfg.mamba_heads))
        self.norm = GatedRMSNorm(cfg.d_inner, cfg.d_inner // cfg.n_groups, cfg.norm_eps)
        self.out_proj = nn.Linear(cfg.d_inner, cfg.d_model, bias=cfg.mamba_proj_bias)
        self.out_norm = make_norm(cfg.mamba_out_norm, cfg.d_model, cfg.norm_eps)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self, generator: torch.Generator | None = None) -> None:
        """mamba_ssm init: A ~ U[1, 16], dt ~ logU[dt_min, dt_max] (stored as softplus^-1), D = 1."""
        if self.A_log.is_meta:
            return
        cfg, h = self.cfg, self.cfg.mamba_heads
        A = torch.empty(h).uniform_(1.0, 16.0, generator=generator)
        self.A_log.copy_(torch.log(A))
        lo, hi = math.log(max(cfg.time_step_min, 1e-8)), math.log(cfg.time_step_max)
        dt = torch.exp(torch.rand(h, generator=generator) * (hi - lo) + lo).clamp(min=cfg.time_step_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.D.fill_(1.0)

    def _dt(self, dt: Tensor) -> Tensor:
        """softplus(dt + dt_bias), clamped, in (at least) float32 whatever the autocast dtype (as
        mamba_ssm); a float64 model stays float64."""
        with torch.autocast(dt.device.type, enabled=False):
            return F.softplus(wide(dt) + wide(local(self.dt_bias))).clamp(*self.cfg.time_step_limit)

    def _A(self) -> Tensor:
        """A = -exp(A_log), one negative decay rate per head, in (at least) float32."""
        return -torch.exp(wide(local(self.A_log)))

    def _conv(self, xBC: Tensor, state: MambaState | None, valid: Tensor | None,
              seq_idx: Tensor | None = None) -> Tensor:
        """Causal depthwise conv + SiLU over (b, l, conv_dim), continuing from the cached inputs.

        With `valid` (b, l), each row's real tokens are packed first (pads after them), so a real
        token's window holds the previous *real* inputs whatever the padding (left, right, holes),
        and the cached window ends at the row's last real token; pads get zeros. With `seq_idx`
        (b, l; no state, no `valid`), see `_conv_documents`.
        """
        if seq_idx is not None:
            return self._conv_documents(xBC, seq_idx)
        b, l, c = xBC.shape
        k = self.cfg.conv_kernel
        if valid is not None:
            order = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)  # (b, l) real first, in order
            index = order[..., None].expand(b, l, c)
            xBC = xBC.gather(1, index) * valid.gather(1, order)[..., None].to(xBC.dtype)
        prev = state.conv.to(xBC.dtype) if state is not None else xBC.new_zeros(b, c, k - 1)
        full = torch.cat([prev, xBC.transpose(1, 2)], dim=-1)  # (b, c, k - 1 + l)
        if state is not None and valid is None:
            state.conv = full[..., full.shape[-1] - (k - 1):]
        elif state is not None:  # the k - 1 inputs before the row's last real token, included
            ends = valid.sum(1, keepdim=True) + torch.arange(k - 1, device=full.device)  # (b, k - 1)
            state.conv = full.gather(-1, ends[:, None, :].expand(b, c, k - 1))
        out = F.silu(F.conv1d(full, local(self.conv1d.weight), local(self.conv1d.bias), groups=c)).transpose(1, 2)
        if valid is None:
            return out
        return out.new_zeros(out.shape).scatter(1, index, out) * valid[..., None].to(out.dtype)

    def _conv_documents(self, xBC: Tensor, seq_idx: Tensor) -> Tensor:
        """The causal conv + SiLU of `_conv` on packed rows: a tap reading an earlier document's
        input (or one before the row) reads zero instead (`DocumentConv`)."""
        weight, bias = local(self.conv1d.weight)[:, 0], local(self.conv1d.bias)   # (c, k), (c,)
        common = torch.promote_types(xBC.dtype, weight.dtype)
        keeps = [same_document_as_previous(seq_idx, s) for s in range(1, weight.shape[1])]
        keeps = torch.stack(keeps) if keeps else seq_idx.new_zeros((0, *seq_idx.shape), dtype=torch.bool)
        out = DocumentConv.apply(xBC.to(common), weight.to(common), keeps)           # (b, l, c)
        if bias is not None:
            out = out + bias.to(common)
        return F.silu(out).to(xBC.dtype)

    def forward(self, u: Tensor, state: MambaState | None = None, valid: Tensor | None = None,
                seq_idx: Tensor | None = None) -> Tensor:
        """u (b, l, d_model). `valid` (b, l) marks real tokens: pads are identity steps (dt = 0) and
        never enter the conv window, so any padding leaves the state as if the pads were absent.
        `seq_idx` (b, l): document index of every token of packed training rows (no state, no
        `valid`): no document's conv window or SSM state sees another document."""
        if seq_idx is not None and (state is not None or valid is not None):
            raise ValueError("seq_idx (packed documents) is for training: not with a state or a padding mask")
        if state is not None and valid is None and u.shape[1] == 1:
            return self.step(u[:, 0], state)[:, None]
        b, l, _ = u.shape
        h, p, g, n = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, h], dim=-1)
        x, B, C = self._conv(xBC, state, valid, seq_idx).split([self.d_inner, g * n, g * n], dim=-1)
        dt = self._dt(dt)
        if valid is not None:
            dt = dt * valid[..., None]
        y, final = chunked_scan(u.device)(x.reshape(b, l, h, p), dt, self._A(), B.reshape(b, l, g, n),
                                          C.reshape(b, l, g, n), self.cfg.chunk_size, local(self.D),
                                          state.ssm if state is not None else None, seq_idx=seq_idx)
        if state is not None:
            state.ssm = final
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return maybe_norm(self.out_norm, self.out_proj(y))

    def step(self, u: Tensor, state: MambaState) -> Tensor:
        """One decoding step for u (b, d_model); updates `state` in place (fixed shapes, no host sync)."""
        b = u.shape[0]
        h, p, g, n = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = project(self.in_proj, u).split([self.d_inner, self.conv_dim, h], dim=-1)
        window = torch.cat([state.conv.to(xBC.dtype), xBC[..., None]], dim=-1)  # (b, conv_dim, k)
        state.conv.copy_(window[..., 1:])
        xBC = (window * local(self.conv1d.weight)[:, 0]).sum(-1)  # one dot product per channel
        if self.conv1d.bias is not None:
            xBC = xBC + local(self.conv1d.bias)
        x, B, C = F.silu(xBC).split([self.d_inner, g * n, g * n], dim=-1)
        y, ssm = ssd_step(state.ssm, x.view(b, h, p), self._dt(dt), self._A(),
                          B.view(b, g, n), C.view(b, g, n), local(self.D))
        state.ssm.copy_(ssm)
        y = self.norm(y.reshape(b, self.d_inner), z)
        return maybe_norm(self.out_norm, project(self.out_proj, y))
