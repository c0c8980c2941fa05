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
from torch.utils.checkpoint import checkpoint

from ..config import HybridConfig
from .attention import Attention
from .cache import InferenceCache
from .documents import check_seq_idx, single_document
from .mamba2 import Mamba2Mixer
from .mlp import MLP
from .norms import RMSNorm, maybe_norm, wide

MIXERS = {"mamba": Mamba2Mixer, "attention": Attention, "mlp": MLP}
# Projections that write into the residual stream: scaled down at init (GPT-2 / Megatron).
RESIDUAL_OUTPUTS = ("out_proj", "o_proj", "down_proj")
IGNORE_INDEX = -100  # targets not scored by `HybridLM.loss` (F.cross_entropy's default ignore_index)


class Block(nn.Module):
    def __init__(self, cfg: HybridConfig, kind: str) -> None:
        super().__init__()
        self.kind = kind
        pre_norm = not (kind == "attention" and cfg.qkv_norm != "none")  # qkv_norm replaces it
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps) if pre_norm else None
        self.mixer = MIXERS[kind](cfg)
        # activation checkpointing (set by activation_checkpointing.py; a plain attribute, so the
        # parameter names stay): "block" recomputes the whole block in backward, "mixer" the mixer only
        self.recompute = "none"

    def forward(self, x: Tensor, state=None, valid: Tensor | None = None, key_valid: Tensor | None = None,
                seq_idx: Tensor | None = None) -> Tensor:
        if self.recompute != "none" and state is None and self.training and torch.is_grad_enabled():
            if self.recompute == "block":
                return checkpoint(self._forward, x, None, valid, key_valid, seq_idx, use_reentrant=False)
            return self._forward(x, None, valid, key_valid, seq_idx, recompute_mixer=True)
        return self._forward(x, state, valid, key_valid, seq_idx)

    def _forward(self, x: Tensor, state, valid: Tensor | None, key_valid: Tensor | None, seq_idx: Tensor | None,
                 recompute_mixer: bool = False) -> Tensor:
        h = maybe_norm(self.norm, x)
        if recompute_mixer:
            return x + checkpoint(self._mix, h, state, valid, key_valid, seq_idx, use_reentrant=False)
        return x + self._mix(h, state, valid, key_valid, seq_idx)

    def _mix(self, h: Tensor, state, valid: Tensor | None, key_valid: Tensor | None,
             seq_idx: Tensor | None) -> Tensor:
        if self.kind == "mamba":
            return self.mixer(h, state, valid, seq_idx)
        if self.kind == "attention":
            return self.mixer(h, state, key_valid, seq_idx)
        return self.mixer(h)


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
                attention_mask: Tensor | None = None, last_only: bool = False,
                seq_idx: Tensor | None = None) -> Tensor:
        """Logits (b, l, vocab) for input_ids (b, l); (b, 1, vocab) with `last_only` (prefill:
        the head runs on the last position only).

        attention_mask (b, l): True for real tokens, False for padding (left, right or
        holes). With a `cache`, the call continues the cached sequences and updates the
        cache. seq_idx (b, l), for training on packed rows only (not with a cache or an
        attention_mask): the document index of every token, non-decreasing along a row
        (`hybridlm.model.documents`); documents then never see each other (attention, conv
        window, SSM state), so a packed row gives each document's logits as if it ran alone.
        Ids, mask and seq_idx are checked in eager mode only: under `torch.compile` the
        forward has no host synchronisation (checks belong at the API boundary).
        """
        if seq_idx is not None and (cache is not None or attention_mask is not None):
            raise ValueError("seq_idx (packed documents) is for training: not with a cache or an attention_mask")
        valid = None if attention_mask is None else attention_mask.to(torch.bool)
        if not torch.compiler.is_compiling():
            self._check_inputs(input_ids, valid)
            if valid is not None and bool(valid.all()):
                valid = None  # no padding: every layer takes its unmasked fast path
            if seq_idx is not None:
                check_seq_idx(seq_idx, input_ids)
                if single_document(seq_idx):
                    seq_idx = None  # one document per row: the unmasked fast paths
        key_valid = cache.extend_mask(valid, input_ids.shape[1]) if cache is not None else valid
        x = self.backbone.embeddings(input_ids)
        for i, block in enumerate(self.backbone.layers):
            state = cache.layers[i] if cache is not None else None
            x = block(x, state, valid, key_valid, seq_idx)
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

    def loss(self, input_ids: Tensor, targets: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        """Mean next-token cross-entropy over the scored targets (targets are already shifted).

        Targets equal to `IGNORE_INDEX` (-100, F.cross_entropy's ignore_index) are not scored,
        e.g. a packed document's last token (whose next token starts another document); when
        none is scored the loss is a zero with a graph (zero gradients), not NaN. `seq_idx`:
        document boundaries of packed rows, as `forward`.
        """
        logits = self(input_ids, seq_idx=seq_idx)
        flat = targets.reshape(-1)
        total = F.cross_entropy(wide(logits).reshape(-1, logits.shape[-1]), flat, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (flat != IGNORE_INDEX).sum().clamp(min=1)

    def new_cache(self, batch: int, capacity: int = 256) -> InferenceCache:
        p = self.lm_head.weight
        return InferenceCache.empty(self.cfg, batch, capacity, device=p.device, dtype=p.dtype)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def count_params(cfg: HybridConfig) -> int:
    """Exact parameter count of `cfg` without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return HybridLM(cfg).num_params()
