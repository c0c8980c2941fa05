"""`TrainConfig`: everything `train()` needs, one CLI flag per field (the trailing comments are the help).

Validation happens here, when the config is built, so a bad value fails before any data
is read or any model is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

from ..lowp.recipe import Recipe, check_layer_spec
from ..model.activation_checkpointing import check_activation_checkpointing
from .distributed import MODES
from .optim import SCHEDULES


@dataclass
class TrainConfig:
    """Everything `train()` needs; one CLI flag per field (the trailing comments are the help)."""

    model: str = "tiny"  # preset name, HybridConfig JSON, or checkpoint dir (its config; weights start fresh)
    data: Optional[str] = None  # prepared shard dir, or raw .txt/.jsonl/dir (tokenized into OUT/data); default: bundled KJV
    out: str = "runs/train"  # run directory (metrics, checkpoints, final model)
    steps: int = 1000  # total optimizer steps (the LR schedule spans them)
    batch_size: int = 16  # micro-batch per rank, in sequences
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * world * grad_accum)
    seq_len: int = 256  # tokens per sequence
    documents: bool = True  # reset the Mamba state/conv and mask attention at the document boundaries that data prepare records (false: train on one token stream)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-4  # final learning rate of the cosine / WSD decay
    warmup_steps: int = 100  # linear warmup steps
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_frac: float = 0.2  # WSD: fraction of the steps spent in the final linear decay
    weight_decay: float = 0.1  # decoupled AdamW decay on >=2-D weights (none on norms, biases, A_log, D, dt_bias)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    eval_every: int = 100  # validate every N steps (0 = only at the start and end)
    eval_batches: int = 20  # validation batches per evaluation (0 = no validation)
    save_every: int = 500  # checkpoint every N steps (0 = only at the end)
    keep_last: int = 3  # checkpoints to keep (0 = all)
    seed: int = 0  # seed for the weights and the data order
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    precision: str = "bf16"  # GEMMs of the block linears: bf16 (unquantized) | fp8 | nvfp4 (simulated off-GPU; ablations nvfp4-no-rht / -no-sr / -no-2d)
    high_precision_layers: str = "auto"  # blocks whose GEMMs stay unquantized: auto (fp8: first+last block; nvfp4: ~first 3%, last 13%) | none | first:N,last:M | 0,5,7
    init_from: Optional[str] = None  # start from this checkpoint dir's weights (its config must equal the model's; ignored on resume)
    resume: bool = False  # continue from OUT/checkpoints/latest (starts fresh if there is none)
    stop_at: Optional[int] = None  # end this invocation after this step (checkpointed) without changing the schedule
    max_bad_steps: int = 5  # stop after this many consecutive non-finite steps
    monitor_every: int = 0  # log linear-output RMS per layer type + max attention logit every N steps (0 = off)
    diverge_factor: float = 0.0  # stop as diverged when the loss is non-finite or > this x its running minimum (0 = off)
    distributed: str = "auto"  # auto (ddp under torchrun) | none | ddp | fsdp2
    log_every: int = 10  # write a train metrics line every N steps
    progress: bool = True  # show a progress bar (rank 0)
    val_fraction: float = 0.01  # held-out fraction when tokenizing raw text
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on CUDA too)
    tp: int = 1  # tensor-parallel degree (splits heads of attention / Mamba and the MLP across this many ranks; world size = dp x tp)
    activation_checkpointing: str = "none"  # none | full (recompute every block in backward) | selective (only the Mamba and attention mixers)
    ac_every: int = 1  # checkpoint every k-th block

    def __post_init__(self) -> None:
        def need(ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"TrainConfig: {what}")
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "max_bad_steps"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be an integer >= 1, got {v!r}")
        for name in ("warmup_steps", "eval_every", "eval_batches", "save_every", "keep_last", "seed"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name} must be an integer >= 0, got {v!r}")
        need(isinstance(self.monitor_every, int) and not isinstance(self.monitor_every, bool)
             and self.monitor_every >= 0, f"monitor_every must be an integer >= 0, got {self.monitor_every!r}")
        need(self.diverge_factor == 0 or 1 < self.diverge_factor < math.inf,
             f"diverge_factor must be 0 (off) or a finite number > 1, got {self.diverge_factor}")
        need(bool(self.model), "model must be a preset name or a config path")
        need(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need lr > 0 and 0 <= min_lr <= lr, got {self.lr}, {self.min_lr}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(0 < self.decay_frac <= 1, f"decay_frac must be in (0, 1], got {self.decay_frac}")
        need(self.weight_decay >= 0 and self.grad_clip >= 0 and self.eps > 0,
             "weight_decay and grad_clip must be >= 0 and eps > 0")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas must be in [0, 1), got {self.beta1}, {self.beta2}")
        need(self.device in ("auto", "cpu", "cuda"), f"device must be auto, cpu or cuda, got {self.device!r}")
        need(self.dtype in ("auto", "float32", "bfloat16"), f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        Recipe.parse(self.precision)  # ValueError naming the bad value
        check_layer_spec(self.high_precision_layers)
        need(self.distributed in MODES, f"distributed must be one of {MODES}, got {self.distributed!r}")
        need(self.stop_at is None or self.stop_at >= 1, f"stop_at must be >= 1, got {self.stop_at}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(isinstance(self.tp, int) and not isinstance(self.tp, bool) and self.tp >= 1,
             f"tp must be an integer >= 1, got {self.tp!r}")
        need(self.tp == 1 or self.distributed in ("auto", "fsdp2"),
             f"tp={self.tp} needs distributed='fsdp2' or 'auto' (FSDP2 over the data-parallel ranks), "
             f"got {self.distributed!r}")
        need(self.tp == 1 or self.precision == "bf16",
             f"tp={self.tp} supports precision='bf16' only (the FP8 / NVFP4 layers are not tensor-parallel), "
             f"got {self.precision!r}")
        check_activation_checkpointing(self.activation_checkpointing, self.ac_every)  # ValueError naming it

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
