"""Activation checkpointing per block: trade recomputation in backward for activation memory.

Modes (`AC_MODES`):

* ``none``: every activation is kept for backward (the default);
* ``full``: every `every`-th block keeps only its input and is run again in backward
  (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``);
* ``selective``: only the Mamba-2 and attention *mixers* of every `every`-th such block
  are recomputed; the MLP blocks, norms and residual adds keep their activations.

"every `every`-th" counts from one, as torchtitan's ``ac_freq``: blocks every, 2 every, ...
(for ``selective``, among the Mamba/attention blocks only). The choice is a plain attribute
of each `Block` (``Block.recompute``) read by its forward, so no module is wrapped and
parameter names and state_dict keys stay as they are; the checkpoint runs inside the block's
forward, which is what FSDP2 (``fully_shard`` per block, parameters gathered again before
the block's backward) and DDP (non-reentrant checkpointing) both support. It only acts in
training mode with grad enabled and without a cache: evaluation and generation run as before.
"""

from __future__ import annotations

from .lm import Block, HybridLM

AC_MODES = ("none", "full", "selective")
RECOMPUTE = {"full": "block", "selective": "mixer"}   # mode -> Block.recompute of the chosen blocks
MIXER_KINDS = ("mamba", "attention")                   # the blocks `selective` may choose


def check_activation_checkpointing(mode: str, every: int = 1) -> None:
    """ValueError unless `mode` is one of AC_MODES and `every` a positive integer."""
    if mode not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {mode!r}; choose from {', '.join(AC_MODES)}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"activation checkpointing `every` must be a positive integer, got {every!r}")


def apply_activation_checkpointing(model: HybridLM, mode: str, every: int = 1) -> int:
    """Set the checkpointing of `model`'s blocks (replacing any earlier choice); returns how many
    modules are recomputed in backward (blocks for ``full``, mixers for ``selective``).

    Call it on the `HybridLM` itself, before or after wrapping it for DDP / FSDP2.
    """
    check_activation_checkpointing(mode, every)
    blocks = [b for b in model.backbone.layers if isinstance(b, Block)]
    for block in blocks:
        block.recompute = "none"
    if mode == "none":
        return 0
    candidates = blocks if mode == "full" else [b for b in blocks if b.kind in MIXER_KINDS]
    chosen = candidates[every - 1::every]
    for block in chosen:
        block.recompute = RECOMPUTE[mode]
    return len(chosen)
