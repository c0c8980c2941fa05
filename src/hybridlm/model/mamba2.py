"""The Mamba-2 mixer (Nemotron-H `M` layer).

in_proj -> [z, xBC, dt]; causal depthwise conv1d + SiLU on xBC = [x, B, C];
dt = softplus(dt + dt_bias) clamped to `time_step_limit`; SSD scan with A = -exp(A_log)
(one scalar per head), grouped B/C and a D skip; gated RMSNorm with z; out_proj; and,
when `mamba_out_norm` is on (a training-stability option, off by default), a norm
after out_proj (`out_norm`).

The same code serves training (no state), prefill (state filled at the end) and
decoding (one token: the recurrent `ssd_step`). Parameter names follow Hugging Face
`NemotronHMamba2Mixer`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import HybridConfig
from .cache import MambaState
from .norms import GatedRMSNorm, make_norm, maybe_norm
from .rowwise import local, project
from .scan import chunked_scan
from .ssd import ssd_step


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
        """softplus(dt + dt_bias), clamped, in float32 whatever the autocast dtype (as mamba_ssm)."""
        with torch.autocast(dt.device.type, enabled=False):
            return F.softplus(dt.float() + local(self.dt_bias).float()).clamp(*self.cfg.time_step_limit)

    def _conv(self, xBC: Tensor, state: MambaState | None, valid: Tensor | None) -> Tensor:
        """Causal depthwise conv + SiLU over (b, l, conv_dim), continuing from the cached inputs.

        With `valid` (b, l), each row's real tokens are packed first (pads after them), so a real
        token's window holds the previous *real* inputs whatever the padding (left, right, holes),
        and the cached window ends at the row's last real token; pads get zeros.
        """
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

    def forward(self, u: Tensor, state: MambaState | None = None, valid: Tensor | None = None) -> Tensor:
        """u (b, l, d_model). `valid` (b, l) marks real tokens: pads are identity steps (dt = 0) and
        never enter the conv window, so any padding leaves the state as if the pads were absent."""
        if state is not None and valid is None and u.shape[1] == 1:
            return self.step(u[:, 0], state)[:, None]
        b, l, _ = u.shape
        h, p, g, n = self.n_heads, self.head_dim, self.n_groups, self.d_state
        z, xBC, dt = self.in_proj(u).split([self.d_inner, self.conv_dim, h], dim=-1)
        x, B, C = self._conv(xBC, state, valid).split([self.d_inner, g * n, g * n], dim=-1)
        dt = self._dt(dt)
        if valid is not None:
            dt = dt * valid[..., None]
        y, final = chunked_scan(u.device)(x.reshape(b, l, h, p), dt, -torch.exp(local(self.A_log).float()),
                                          B.reshape(b, l, g, n),
                                          C.reshape(b, l, g, n), self.cfg.chunk_size, local(self.D),
                                          state.ssm if state is not None else None)
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
        y, ssm = ssd_step(state.ssm, x.view(b, h, p), self._dt(dt), -torch.exp(local(self.A_log).float()),
                          B.view(b, g, n), C.view(b, g, n), local(self.D))
        state.ssm.copy_(ssm)
        y = self.norm(y.reshape(b, self.d_inner), z)
        return maybe_norm(self.out_norm, project(self.out_proj, y))
