"""`HybridConfig`: the one dataclass that describes a hybrid Mamba-2 / attention / MLP model.

The layer layout is a pattern string in the Hugging Face `hybrid_override_pattern`
alphabet: ``M`` = Mamba-2 mixer, ``*`` = self-attention, ``-`` = squared-ReLU MLP.
Every layer is ``x = x + mixer(rmsnorm(x))``.

Presets: ``tiny`` (laptop CPU) and the published Nemotron-H models ``nemotron-h-4b``,
``nemotron-h-8b``, ``nemotron-h-47b``, ``nemotron-h-56b``, ``nemotron-nano-12b-v2`` and
``nemotron-nano-9b-v2`` (their ``config.json`` shapes, for counting, memory planning and
conversion). The published presets carry what importing their checkpoint gives
(`hybridlm.interop.hf_config`): dt clamped to ``(time_step_min, inf)``, as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_KINDS = {"M": "mamba", "*": "attention", "-": "mlp"}
NORM_KINDS = ("none", "rmsnorm", "layernorm")  # choices of the stability norm fields
STABILITY_NORM_FIELDS = ("qk_norm", "qkv_norm", "post_proj_norm", "post_fc2_norm", "mamba_out_norm")
STABILITY_OFF = {**{name: "none" for name in STABILITY_NORM_FIELDS}, "attn_logit_softcap": 0.0}


@dataclass
class HybridConfig:
    # vocabulary / width / layout
    vocab_size: int = 4096
    d_model: int = 256
    pattern: str = "M-M*M-M-"
    # attention (GQA, no positional embedding)
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int = 64
    attention_bias: bool = False
    # MLP (up -> relu^2 -> down)
    ffn_dim: int = 1024
    mlp_bias: bool = False
    # Mamba-2 mixer
    ssm_state: int = 64          # N, state size per head
    mamba_head_dim: int = 32     # P
    mamba_heads: int | None = None  # H; default expand * d_model // mamba_head_dim
    n_groups: int = 2            # groups sharing B and C
    expand: int = 2
    conv_kernel: int = 4
    conv_bias: bool = True
    mamba_proj_bias: bool = False
    chunk_size: int = 64
    time_step_min: float = 0.001  # dt init range, low end (the dt clamp is time_step_limit)
    time_step_max: float = 0.1    # dt init range, high end
    time_step_floor: float = 1e-4  # smallest initial dt
    time_step_limit: tuple[float, float] = (0.0, math.inf)  # clamp on dt after softplus
    # misc
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    max_seq_len: int = 4096       # attention context limit (serving, planning)
    bos_token_id: int | None = None
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0
    # training stability (Rybakov et al. 2024); "none" | "rmsnorm" | "layernorm", all off by default
    qk_norm: str = "none"         # norm on Q and K per head (over head_dim), before the dot product
    qkv_norm: str = "none"        # norm over the concatenated Q/K/V projection output; removes the attention pre-norm
    post_proj_norm: str = "none"  # norm after the attention output projection (o_proj)
    post_fc2_norm: str = "none"   # norm after the MLP down projection (down_proj)
    mamba_out_norm: str = "none"  # norm after the Mamba-2 out_proj
    attn_logit_softcap: float = 0.0  # cap * tanh(logits / cap) before the softmax (0 = off)
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys kept for round trips

    def __post_init__(self) -> None:
        if self.mamba_heads is None and self.mamba_head_dim > 0:
            self.mamba_heads = self.expand * self.d_model // self.mamba_head_dim
        self.time_step_limit = tuple(float(v) for v in self.time_step_limit)  # type: ignore[assignment]
        self.validate()

    # ---- derived sizes -------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.pattern)

    @property
    def d_inner(self) -> int:
        """Mamba-2 inner width H * P (the x and z streams)."""
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        """Channels that go through the causal conv: x, B and C."""
        return self.d_inner + 2 * self.n_groups * self.ssm_state

    @property
    def in_proj_dim(self) -> int:
        """in_proj output: z, xBC and dt."""
        return self.d_inner + self.conv_dim + self.mamba_heads

    def stability_options(self) -> dict[str, Any]:
        """The training-stability fields that differ from their (off) defaults."""
        return {name: getattr(self, name) for name, off in STABILITY_OFF.items() if getattr(self, name) != off}

    def layer_kinds(self) -> list[str]:
        return [LAYER_KINDS[c] for c in self.pattern]

    def count(self, kind: str) -> int:
        return sum(k == kind for k in self.layer_kinds())

    # ---- validation ----------------------------------------------------
    def validate(self) -> None:
        """Raise ValueError naming the first inconsistent field."""
        bad = sorted(set(self.pattern) - set(LAYER_KINDS))
        if not self.pattern:
            raise ValueError("pattern is empty: give at least one layer, e.g. 'M-*-'")
        if bad:
            raise ValueError(
                f"pattern {self.pattern!r} has unknown layer letter(s) {bad}; "
                "use M (Mamba-2), * (attention) or - (MLP)"
            )
        for name in ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                     "ssm_state", "mamba_head_dim", "mamba_heads", "n_groups", "expand",
                     "conv_kernel", "chunk_size", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads}) for GQA"
            )
        if self.mamba_heads % self.n_groups:
            raise ValueError(
                f"mamba_heads ({self.mamba_heads}) must be divisible by n_groups ({self.n_groups})"
            )
        if not 0.0 <= self.time_step_min <= self.time_step_max:
            raise ValueError(
                f"need 0 <= time_step_min ({self.time_step_min}) <= time_step_max ({self.time_step_max})"
            )
        lo, hi = self.time_step_limit
        if not 0.0 <= lo < hi:
            raise ValueError(f"time_step_limit must satisfy 0 <= low < high, got {self.time_step_limit}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        for name in STABILITY_NORM_FIELDS:
            if getattr(self, name) not in NORM_KINDS:
                raise ValueError(f"{name} must be one of {NORM_KINDS}, got {getattr(self, name)!r}")
        cap = self.attn_logit_softcap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not 0 <= cap < math.inf:
            raise ValueError(f"attn_logit_softcap must be a finite number >= 0 (0 = off), got {cap!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            tok = getattr(self, name)
            if tok is not None and not 0 <= tok < self.vocab_size:
                raise ValueError(f"{name}={tok} is outside the vocabulary [0, {self.vocab_size})")

    # ---- (de)serialisation ----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["time_step_limit"] = [self.time_step_limit[0], _json_float(self.time_step_limit[1])]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HybridConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown HybridConfig field(s) {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        if "time_step_limit" in d:
            d["time_step_limit"] = tuple(float(v) for v in d["time_step_limit"])
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "HybridConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        d = read_json(path)
        if not isinstance(d, dict):
            raise ValueError(f"config file {path} must hold a JSON object")
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> "HybridConfig":
        return dataclasses.replace(self, **changes)


def read_json(path: Path) -> Any:
    """Parse a JSON file; ValueError naming the file if it is not valid JSON (callers check existence)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _json_float(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


# dt clamp of every published checkpoint once imported: transformers clamps dt to (time_step_min, inf).
_HF_DT = dict(time_step_min=0.001, time_step_limit=(0.001, math.inf))
# Nemotron-H family (8K context, tokens <s>=1, </s>=2, pad 0; Megatron-Bridge's NemotronHModelProvider*).
_NEMOTRON_H = dict(vocab_size=131072, n_kv_heads=8, head_dim=128, mamba_head_dim=64, n_groups=8, chunk_size=128,
                   max_seq_len=8192, bos_token_id=1, eos_token_id=2, pad_token_id=0, **_HF_DT)
# Nemotron Nano v2 (128K context, Mamba head dim 80).
_NANO_V2 = dict(vocab_size=131072, n_kv_heads=8, head_dim=128, ssm_state=128, mamba_head_dim=80, mamba_heads=128,
                n_groups=8, chunk_size=128, max_seq_len=131072, bos_token_id=1, eos_token_id=2, **_HF_DT)

PRESETS: dict[str, dict[str, Any]] = {
    # ~4.6M parameters: trains on a laptop CPU in minutes.
    "tiny": dict(vocab_size=4096, d_model=256, pattern="M-M-*-M-M-*-", n_heads=4, n_kv_heads=2,
                 head_dim=64, ffn_dim=768, ssm_state=32, mamba_head_dim=32, n_groups=2,
                 chunk_size=64, max_seq_len=2048),
    # Nemotron-H-4B-Base-8K: the 8B pruned to d_model 3072, FFN 12288, 112 Mamba heads; 4,489,223,040 parameters.
    "nemotron-h-4b": dict(**_NEMOTRON_H, d_model=3072,
                          pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                          n_heads=32, ffn_dim=12288, ssm_state=128, mamba_heads=112),
    # Nemotron-H-8B-Base-8K (config.json of the public checkpoint).
    "nemotron-h-8b": dict(**_NEMOTRON_H, d_model=4096,
                          pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                          n_heads=32, ffn_dim=21504, ssm_state=128, mamba_heads=128),
    # Nemotron-H-47B-Base-8K: the 56B pruned to 98 layers (45 M, 48 -, 5 *), FFN 30720; 46,791,554,816 parameters.
    "nemotron-h-47b": dict(**_NEMOTRON_H, d_model=8192,
                           pattern="M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M"
                                   "---MM---M-M*-M-M-M-M-M-",
                           n_heads=64, ffn_dim=30720, ssm_state=256, mamba_heads=256),
    # Nemotron-H-56B-Base-8K: 118 layers (54 M, 54 -, 10 *), attention at layers 7, 18, ..., 106 ("M*-").
    "nemotron-h-56b": dict(**_NEMOTRON_H, d_model=8192,
                           pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-"
                                   "M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
                           n_heads=64, ffn_dim=32768, ssm_state=256, mamba_heads=256),
    # NVIDIA-Nemotron-Nano-12B-v2-Base: 62 layers (28 M, 28 -, 6 *), 12.31B parameters.
    "nemotron-nano-12b-v2": dict(**_NANO_V2, d_model=5120,
                                 pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
                                 n_heads=40, ffn_dim=20480, pad_token_id=0),
    # NVIDIA-Nemotron-Nano-9B-v2: the 12B pruned to 56 layers, d_model 4480, FFN 15680; pads with token 12.
    "nemotron-nano-9b-v2": dict(**_NANO_V2, d_model=4480,
                                pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
                                n_heads=40, ffn_dim=15680, pad_token_id=12),
}

# Published parameter totals, for the README comparison and the tests.
PUBLISHED_PARAMS = {
    "nemotron-h-8b": 8.1e9,
    "nemotron-nano-12b-v2": 12.31e9,
}


def preset(name: str, **overrides: Any) -> HybridConfig:
    """A named preset, optionally with fields replaced (`preset("tiny", d_model=128)`)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return HybridConfig(**{**PRESETS[name], **overrides})


def transformer_twin(cfg: HybridConfig) -> HybridConfig:
    """A pure-attention config with every Mamba layer replaced by attention (`*-*-...`)."""
    return cfg.replace(pattern=cfg.pattern.replace("M", "*"))
