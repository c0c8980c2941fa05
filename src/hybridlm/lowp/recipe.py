"""Low-precision recipes: which format each GEMM of a quantized linear uses, and which blocks stay high precision.

A linear layer runs three GEMMs per training step; a recipe decides how each is quantized:

    fprop  y  = x  @ W^T    (T, in) x (in, out)      reduction over `in`
    dgrad  dx = dy @ W      (T, out) x (out, in)     reduction over `out`
    wgrad  dW = dy^T @ x    (out, T) x (T, in)       reduction over the tokens T

* ``bf16``: no GEMM quantization (the compute dtype stays what ``--dtype`` says: bf16
  autocast on CUDA, fp32 on CPU). `apply_recipe` leaves the model untouched.
* ``fp8`` (Nemotron-H): x, W and dy in E4M3 with per-tensor current scaling
  (:mod:`hybridlm.lowp.fp8`); real FP8 GEMMs via ``torch._scaled_mm`` on CUDA cc >= 8.9.
* ``nvfp4`` (NVFP4 pretraining paper, :mod:`hybridlm.lowp.nvfp4`): 1x16 blocks along each
  GEMM's reduction dimension for x and dy, 16x16 blocks for W (so fprop and dgrad see
  the same quantized W); a 16x16 random Hadamard transform on both wgrad operands along
  T; stochastic rounding for dy, round-to-nearest-even for x and W. Ablations:
  ``nvfp4-no-rht``, ``nvfp4-no-sr``, ``nvfp4-no-2d`` (combinable: ``nvfp4-no-rht-no-sr``).

``--high-precision-layers`` names the blocks whose GEMMs stay unquantized (both papers
keep the first/last few in BF16): `layer_spec_indices`.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("bf16", "fp8", "nvfp4")
NVFP4_ABLATIONS = {"rht": "rht", "sr": "stochastic_rounding", "2d": "weight_2d"}


# -------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """How the three GEMMs of a quantized linear are computed (the NVFP4 switches are ignored otherwise)."""

    format: str = "bf16"              # bf16 | fp8 | nvfp4
    rht: bool = True                  # nvfp4: random Hadamard transform on the wgrad operands
    stochastic_rounding: bool = True  # nvfp4: stochastic rounding of the output gradient dy
    weight_2d: bool = True            # nvfp4: 16x16 weight blocks (else 1x16 along each GEMM's reduction dim)
    rht_seed: int = 0                 # nvfp4: seed of the RHT's random signs (fixed for the whole run)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"precision format must be one of {FORMATS}, got {self.format!r}")

    @classmethod
    def parse(cls, text: str) -> "Recipe":
        """'bf16' | 'fp8' | 'nvfp4' with optional '-no-rht', '-no-sr', '-no-2d' suffixes (nvfp4 only)."""
        if not isinstance(text, str) or not text:
            raise ValueError(f"precision must be a non-empty string, got {text!r}")
        head, *offs = text.lower().split("-no-")
        if head not in FORMATS:
            raise ValueError(f"precision {text!r}: format must be one of {FORMATS} "
                             "(nvfp4 ablations: nvfp4-no-rht, nvfp4-no-sr, nvfp4-no-2d)")
        if offs and head != "nvfp4":
            raise ValueError(f"precision {text!r}: only nvfp4 has -no-rht/-no-sr/-no-2d ablations")
        flags = {}
        for off in offs:
            if off not in NVFP4_ABLATIONS or NVFP4_ABLATIONS[off] in flags:
                raise ValueError(f"precision {text!r}: unknown or repeated ablation '-no-{off}' "
                                 f"(choose from {', '.join('-no-' + k for k in NVFP4_ABLATIONS)})")
            flags[NVFP4_ABLATIONS[off]] = False
        return cls(format=head, **flags)

    @property
    def name(self) -> str:
        if self.format != "nvfp4":
            return self.format
        return "nvfp4" + "".join(f"-no-{k}" for k, attr in NVFP4_ABLATIONS.items() if not getattr(self, attr))


def as_recipe(recipe: Recipe | str) -> Recipe:
    return recipe if isinstance(recipe, Recipe) else Recipe.parse(recipe)


# ------------------------------------------------------------- high-precision layers


def check_layer_spec(spec: str) -> None:
    """Syntax check of a --high-precision-layers value (ranges are checked against a model later)."""
    layer_spec_indices(spec, None, "bf16")


def default_high_precision(fmt: str, n_layers: int) -> set[int]:
    """'auto': fp8 keeps the first and the last block in BF16; nvfp4 the first round(2/62) and the last
    max(1, round(8/62)) of the blocks (the NVFP4 12B run kept its first 2 and last 8 of 62 blocks, ~16%)."""
    if fmt == "bf16" or n_layers == 0:
        return set()
    first, last = (1, 1) if fmt == "fp8" else (round(2 * n_layers / 62), max(1, round(8 * n_layers / 62)))
    return set(range(min(first, n_layers))) | set(range(max(0, n_layers - last), n_layers))


def layer_spec_indices(spec: str, n_layers: int | None, fmt: str) -> set[int]:
    """Block indices named by `spec`: 'auto', 'none' / '', or a comma list of 'first:N', 'last:N' and
    indices (negative counts from the end), e.g. 'first:1,last:4' or '0,5,7'."""
    spec = (spec or "").strip().lower()
    if spec == "auto":
        return default_high_precision(fmt, n_layers) if n_layers is not None else set()
    if spec in ("", "none"):
        return set()
    out: set[int] = set()
    for token in (t.strip() for t in spec.split(",")):
        kind, sep, count = token.partition(":")
        try:
            value = int(count if sep else token)
        except ValueError:
            raise ValueError(f"--high-precision-layers: bad item {token!r} (want first:N, last:N, an index, "
                             "'auto' or 'none')") from None
        if sep and (kind not in ("first", "last") or value < 0):
            raise ValueError(f"--high-precision-layers: bad item {token!r} (want first:N or last:N with N >= 0)")
        if n_layers is None:
            continue
        if sep:
            out |= set(range(min(value, n_layers))) if kind == "first" else set(range(max(0, n_layers - value),
                                                                                        n_layers))
        elif -n_layers <= value < n_layers:
            out.add(value % n_layers)
        else:
            raise ValueError(f"--high-precision-layers: layer {value} out of range for a {n_layers}-layer model")
    return out
