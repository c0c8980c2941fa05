"""Process groups, DDP / FSDP2 wrapping and full (unsharded) state dicts for training.

One code path serves a single process and ``torchrun --nproc_per_node=N``:

* :func:`setup` - reads the torchrun environment (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``), initializes the process group (``nccl`` on CUDA, ``gloo`` on CPU)
  and picks the device. ``mode="auto"`` means DDP under torchrun with more than one
  process and no wrapping otherwise (FSDP2 when ``tp > 1``).
* :func:`build_mesh` - the ("dp", "tp") DeviceMesh of a tensor-parallel run (world = dp x tp);
  a TP group of ``tp`` consecutive ranks reads one batch shard (``DistEnv.dp_rank``).
* :func:`wrap` - DDP around a small module that returns the loss (so the gradient
  all-reduce hooks fire), or FSDP2 (``fully_shard`` on every block, then on the root),
  after tensor parallelism on the "tp" mesh dimension when ``tp > 1``.
* :func:`full_state` / :func:`load_full_state` - the model and optimizer state as full,
  CPU, FQN-keyed dicts with canonical names (``torch.distributed.checkpoint.state_dict``
  with ``full_state_dict=True, cpu_offload=True``: only rank 0 gets them under FSDP2 / TP),
  and the inverse. Exports are therefore the same in every mode and a run can resume
  under another mode or world size (sharded runs resume from DCP: `dcp_checkpoint`).
* :func:`on_main` / :func:`say` - run a function (file system work) or print a message on
  rank 0 only; `on_main`'s result or exception reaches every rank.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from .tensor_parallel import (apply_tensor_parallel, is_segmented, optim_to_canonical, optim_to_segmented,
                              segment_mamba, state_to_canonical, state_to_segmented)

MODES = ("auto", "none", "ddp", "fsdp2")


@dataclass
class DistEnv:
    mode: str            # "none" | "ddp" | "fsdp2" (resolved)
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool     # True when setup() created the process group (teardown destroys it)
    tp: int = 1          # tensor-parallel degree: ranks r // tp * tp ... + tp - 1 share one batch

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> "DistEnv":
        """One process, no process group (evaluation, sweeps, tests)."""
        return cls("none", 0, 1, 0, torch.device(device), False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mode != "none"

    @property
    def dp_rank(self) -> int:
        """This rank's index along the data-parallel dimension (which batch shard it reads)."""
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: world_size // tp (the number of distinct batch shards)."""
        return self.world_size // self.tp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available; use device='cpu' or 'auto'")
        return torch.device("cuda", local_rank)
    if device == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")


def setup(mode: str = "auto", device: str = "auto", tp: int = 1) -> DistEnv:
    """Resolve the mode, initialize the process group if needed and choose the device.

    ``tp > 1`` (tensor parallelism, :func:`build_mesh`) needs ``mode`` ``fsdp2`` or ``auto``
    (then fsdp2): the data-parallel dimension of a TP run is FSDP2's.

    A process group that is already initialized (by the caller) is used as is and left
    alive by :func:`teardown`; do that to call ``train()`` several times in one torchrun
    process (re-creating the default group there can read stale peer addresses from the
    launcher's store). ``ddp`` / ``fsdp2`` outside torchrun make a group of one process.
    """
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if mode == "auto":
        mode = "fsdp2" if tp > 1 else "ddp" if world > 1 else "none"
    if tp > 1 and mode != "fsdp2":
        raise ValueError(f"tp={tp} needs distributed='fsdp2' (or 'auto'), got {mode!r}")
    check_mesh(world, tp)
    if mode == "none" and world > 1:
        raise ValueError(f"distributed='none' but WORLD_SIZE={world}: use 'ddp' or 'fsdp2' under torchrun")
    dev = resolve_device(device, local_rank)
    owns = False
    if mode != "none" and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:  # a single process outside torchrun: a group of one (exercises the same code)
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                    rank=0, world_size=1)
        owns = True
    if mode != "none":
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(mode, rank, world, local_rank, dev, owns, tp)


def check_mesh(world: int, tp: int) -> None:
    """ValueError unless `tp` ranks per tensor-parallel group tile `world` ranks (world = dp x tp)."""
    if tp > world or world % tp:
        raise ValueError(f"tensor-parallel degree tp={tp} must divide the world size {world} (world = dp x tp); "
                         f"launch a multiple of {tp} processes")


def build_mesh(env: DistEnv, tp: int):
    """The 2-D DeviceMesh (world // tp, tp) named ("dp", "tp"): ranks r and r + 1 ... of one "tp" row
    split each layer, the rows are data-parallel replicas (FSDP2 shards over "dp")."""
    check_mesh(env.world_size, tp)
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(env.device.type, (env.world_size // tp, tp), mesh_dim_names=("dp", "tp"))


def teardown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def all_reduce_mean(t: Tensor, env: DistEnv) -> Tensor:
    """Mean over ranks (a no-op copy without a process group)."""
    t = t.detach().clone()
    if env.distributed and env.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= env.world_size
    return t


def broadcast_object(obj: Any, env: DistEnv) -> Any:
    """``obj`` from rank 0 on every rank."""
    if not env.distributed or env.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only; its result, or its exception, reaches every rank."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            error = e
    if env.world_size > 1:
        info = broadcast_object(None if error is None else (type(error).__name__, str(error)), env)
        if info is not None:
            if error is not None:
                raise error
            raise {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}.get(info[0], RuntimeError)(info[1])
        return broadcast_object(result, env)
    if error is not None:
        raise error
    return result


def say(env: DistEnv, msg: str) -> None:
    """A ``[hybridlm] ...`` line on stderr from rank 0 (above the progress bar)."""
    if env.is_main:
        tqdm.write(f"[hybridlm] {msg}", file=sys.stderr)


# (model, x, y, seq_idx) -> scalar loss; seq_idx (b, l) document indices, or None for one stream per row
Objective = Callable[[nn.Module, Tensor, Tensor, "Tensor | None"], Tensor]


class LossModule(nn.Module):
    """``forward(x, y, seq_idx=None) = objective(model, x, y, seq_idx)`` (default
    ``model.loss(x, y, seq_idx)``), so DDP's hooks wrap the whole loss computation. The
    objective's own modules (a distillation teacher) are not submodules: DDP neither
    syncs nor shards them."""

    def __init__(self, model: nn.Module, objective: Objective | None = None) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, x: Tensor, y: Tensor, seq_idx: Tensor | None = None) -> Tensor:
        if self.objective is not None:
            return self.objective(self.model, x, y, seq_idx)
        return self.model.loss(x, y) if seq_idx is None else self.model.loss(x, y, seq_idx)


def wrap(model: nn.Module, env: DistEnv, objective: Objective | None = None,
         param_dtype: torch.dtype | None = None) -> nn.Module:
    """The module to call as ``module(x, y) -> loss`` for training steps (`objective`: see LossModule).

    ``model`` must already be on ``env.device``. Under FSDP2 it is sharded in place
    (every ``backbone.layers[i]``, then the root), so create the optimizer afterwards. With
    ``env.tp > 1`` the layers are first split across the "tp" dimension of :func:`build_mesh`
    (`hybridlm.training.tensor_parallel`), then FSDP2 shards over "dp" (none when dp = 1), as
    torchtitan does. FSDP2 / TP models have segmented Mamba-2 projections (`segment_mamba`).
    `param_dtype` (FSDP2 mixed precision, e.g. bfloat16): parameters are all-gathered in it for
    the forward and backward while the shards (master weights) and the optimizer state stay
    float32, and gradients are reduced in float32; None keeps everything in the model's dtype.
    """
    if env.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(LossModule(model, objective), device_ids=ids)
    if env.mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mesh = build_mesh(env, env.tp)
        segment_mamba(model)  # one parameter per in_proj / conv1d segment: the same DCP keys in every layout
        apply_tensor_parallel(model, mesh["tp"])  # (nothing to split when tp = 1)
        if env.dp_size == 1 and env.tp > 1:  # TP alone: no data-parallel dimension to shard
            return LossModule(model, objective)
        mesh = mesh["dp"]
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for block in model.backbone.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    return LossModule(model, objective)


@contextlib.contextmanager
def grad_sync(module: nn.Module, env: DistEnv, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-steps (``sync=False``)."""
    if env.mode == "ddp" and not sync:
        with module.no_sync():
            yield
    elif env.mode == "fsdp2" and hasattr(module.model, "set_requires_gradient_sync"):  # (not TP alone)
        module.model.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def _dcp():
    """torch.distributed.checkpoint.state_dict, imported on first use (it takes ~1 s to import)."""
    import torch.distributed.checkpoint.state_dict as dcp
    return dcp


def _full():
    return _dcp().StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Full CPU model and optimizer state dicts (collective under FSDP2: call on every rank).

    Under FSDP2 only rank 0 receives non-empty dicts. Optimizer state is keyed by
    parameter name, not by index. Keys are canonical (``...mixer.in_proj.weight``) also for a
    model with segmented Mamba-2 projections (FSDP2 / TP: `hybridlm.training.tensor_parallel`).
    """
    model_sd = full_model_state(model)  # first: its state-dict hook reshards an FSDP2 root left unsharded by eval
    osd = _dcp().get_optimizer_state_dict(model, optimizer, options=_full())
    return model_sd, optim_to_canonical(osd, model.cfg) if is_segmented(model) else osd


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """Full CPU model state dict, canonical keys (collective under FSDP2 / TP, where only rank 0 gets it)."""
    sd = _dcp().get_model_state_dict(model, options=_full())
    return state_to_canonical(sd, model.cfg) if is_segmented(model) else sd


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    model_sd: dict[str, Tensor], optim_sd: dict[str, Any] | None, strict: bool = True) -> None:
    """Inverse of :func:`full_state`; every rank passes the full dicts (collective under FSDP2)."""
    dcp = _dcp()
    if is_segmented(model):
        model_sd = state_to_segmented(model_sd, model.cfg)
        optim_sd = optim_to_segmented(optim_sd, model.cfg) if optim_sd is not None else None
    dcp.set_model_state_dict(model, model_sd, options=dcp.StateDictOptions(full_state_dict=True, strict=strict))
    if optimizer is not None and optim_sd is not None:
        dcp.set_optimizer_state_dict(model, optimizer, optim_sd, options=dcp.StateDictOptions(full_state_dict=True))
