"""`HybridLM`: the Nemotron-H style stack of single-purpose layers.

    embeddings -> [x = x + mixer(rmsnorm(x))] * n_layers -> norm_f -> lm_head

(With `qkv_norm` on, attention blocks have no pre-norm: ``x = x + mixer(x)``, the
mixer normalising its Q/K/V projection output instead.)

Mixers: `Mamba2Mixer` (M), `Attention` (*), `MLP` (-). Parameter names match Hugging
Face `NemotronHForCausalLM` (`backbone.layers.{i}.mixer.in_proj.weight`, ...), so
interchange is a renaming of the top-level prefix at most.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import HybridConfig
from .attention import Attention
from .cache import InferenceCache
from .mamba2 import Mamba2Mixer
from .mlp import MLP
from .norms import RMSNorm, maybe_norm

MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "mlp": MLP}
# Projections that write into the residual stream: scaled down at init (GPT-2 / Megatron).
RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down_proj")


class Block(nn.Module):
    def __init__(self, cfg: HybridConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        pre_norm = not (kind == "attention" and cfg.qkv_norm != "none")  # qkv_norm replaces it
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if pre_norm else None
        self.mixer = MIXERS[kind](cfg)

    def forward(self, x: Tensor, state=None, valid: Tensor | None = None, key_valid: Tensor | None = None) -> Tensor:
        h = maybe_norm(self.norm, x)
        if self.kind == "mamba":
            h = self.mixer(h, state, valid)
        elif self.kind == "attention":
            h = self.mixer(h, state, key_valid)
        else:
            h = self.mixer(h)
        return x + h


class Backbone(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, kind) for kind in cfg.layer_kinds())
        self.norm_f = RMSNorm(cfg.d_model, cfg.norm_eps)


class HybridLM(nn.Module):
    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.init_weights()

    # ---- init ------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) linears/embeddings, residual outputs / sqrt(2 n_layers), Mamba SSM init."""
        if self.lm_head.weight.is_meta:
            return
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(RESIDUAL_OUTPUTS) else 1.0
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std * scale)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv1d):
                bound = 1 / math.sqrt(module.kernel_size[0])
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) * 2 * bound - bound)
                if module.bias is not None:
                    module.bias.copy_(torch.rand(module.bias.shape, generator=gen) * 2 * bound - bound)
            elif isinstance(module, Mamba2Mixer):
                module.reset_ssm_parameters(gen)

    # ---- forward ---------------------------------------------------------
    def forward(self, input_ids: Tensor, cache: InferenceCache | None = None,
                attention_mask: Tensor | None = None, last_only: bool = False) -> Tensor:
        """Logits (b, l, vocab) for input_ids (b, l); (b, 1, vocab) with `last_only` (prefill:
        the head runs on the last position only).

        attention_mask (b, l): True for real tokens, False for padding (left, right or
        holes). With a `cache`, the call continues the cached sequences and updates the
        cache. Ids and mask are checked in eager mode only: under `torch.compile` the
        forward has no host synchronisation (checks belong at the API boundary).
        """
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        if not torch.compiler.is_compiling():
            self._check_inputs(input_ids, valid)
            if valid is not None and bool(valid.all()):
                valid = None  # no padding: every layer takes its unmasked fast path
        key_valid = cache.extend_mask(valid, input_ids.shape[1]) if cache is not None else valid
        x = self.backbone.embeddings(input_ids)
        for i, block in enumerate(self.backbone.layers):
            state = cache.layers[i] if cache is not None else None
            x = block(x, state, valid, key_valid)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.backbone.norm_f(x))

    def _check_inputs(self, input_ids: Tensor, valid: Tensor | None) -> None:
        self._check_ids(input_ids)
        if valid is not None and valid.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(valid.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")

    def _check_ids(self, input_ids: Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), got range "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")

    def loss(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        """Mean next-token cross-entropy (targets are already shifted)."""
        logits = self(input_ids)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def new_cache(self, batch: int, capacity: int = 256) -> InferenceCache:
        p = self.lm_head.weight
        return InferenceCache.empty(self.cfg, batch, capacity, device=p.device, dtype=p.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def count_params(cfg: HybridConfig) -> int:
    """Exact parameter count of `cfg` without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return HybridLM(cfg).num_params()
