"""Sharded model + optimizer checkpoints with PyTorch Distributed Checkpoint (DCP), loadable into any layout.

A sharded run (FSDP2, TP, or TP x FSDP2) saves ``checkpoints/step_*/dcp/``:
``torch.distributed.checkpoint.save`` of ``get_model_state_dict`` / ``get_optimizer_state_dict``
(DTensors), each rank writing its own shards (``__<rank>_0.distcp``; rank 0 also ``.metadata``),
so every rank must see the same file system. `load_dcp` reads it into any layout and world size
(one process without a process group, DDP, FSDP2, TP, TP x FSDP2): DCP reshards by global offsets.

Keys are always the segmented FQNs of `hybridlm.training.tensor_parallel`
(``model.backbone.layers.0.mixer.in_proj.weight_z``, ...; ``optim.state.<fqn>.exp_avg``, ...),
whatever the layout that wrote or reads them: FSDP2 / TP models are segmented, and a plain model's
canonical in_proj / conv1d tensors and moments are split into row views on the way out and joined
on the way in. The state is ``{"model": {fqn: tensor}, "optim": {"state": ..., "param_groups": ...}}``.
`read_dcp_full` consolidates a checkpoint in one process, with canonical keys.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..config import HybridConfig
from .tensor_parallel import is_segmented, optim_to_canonical, optim_to_segmented, state_to_canonical, \
    state_to_segmented

DCP_DIR = "dcp"              # the DCP checkpoint inside a checkpoint directory
DCP_METADATA = ".metadata"   # DCP's index of every key's global shape and its shards


def _sd():
    import torch.distributed.checkpoint.state_dict as sd  # (imported on first use: ~1 s)
    return sd


def _no_dist() -> bool:
    """One process without a process group: DCP reads and writes everything itself."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence DCP's notice that a process without a process group saves / loads alone (it is meant to)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state DCP saves and loads in place: segmented keys, this rank's shards (collective when sharded)."""
    sd = _sd()
    msd = sd.get_model_state_dict(model)  # first: its state-dict hook reshards an FSDP2 root left unsharded
    osd = sd.get_optimizer_state_dict(model, optimizer)
    if not is_segmented(model):
        msd, osd = state_to_segmented(msd, model.cfg), optim_to_segmented(osd, model.cfg)
    return {"model": msd, "optim": osd}


def save_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Write `model` and `optimizer` as a DCP checkpoint directory `path` (call on every rank)."""
    import torch.distributed.checkpoint as dcp
    state = dcp_state(model, optimizer)
    with _quiet():
        dcp.save(state, checkpoint_id=str(path), no_dist=_no_dist())


def dcp_metadata(path: str | Path):
    """DCP's metadata of checkpoint directory `path`; ValueError when it is missing or unreadable."""
    path = Path(path)
    from torch.distributed.checkpoint import FileSystemReader
    if not (path / DCP_METADATA).is_file():
        raise ValueError(f"{path} is not a DCP checkpoint: {DCP_METADATA} is missing")
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # unpickling errors of a damaged file
        raise ValueError(f"{path / DCP_METADATA} is not readable (corrupt or truncated?): {e}") from None


def check_dcp_fits(path: str | Path, model_state: dict[str, Any]) -> None:
    """ValueError naming the differences unless DCP checkpoint `path` holds exactly the model keys and
    global shapes of `model_state` (segmented FQN -> tensor or DTensor)."""
    path = Path(path)
    saved = {k[len("model."):]: tuple(m.size) for k, m in dcp_metadata(path).state_dict_metadata.items()
             if k.startswith("model.") and hasattr(m, "size")}
    ours = {k: tuple(v.shape) for k, v in model_state.items()}
    problems = [f"{k}: saved {saved[k]}, model {ours[k]}" for k in ours if k in saved and saved[k] != ours[k]]
    problems += [f"missing {k}" for k in ours if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in ours]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"DCP checkpoint {path} does not fit this model (trained with another model config?): "
                         + "; ".join(problems[:5]) + more)


def load_dcp(model: nn.Module, optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Restore `model` and `optimizer` from DCP checkpoint `path` in any layout (call on every rank).

    ValueError, before anything is read into the model, when the saved shapes do not fit it.
    """
    import torch.distributed.checkpoint as dcp
    sd = _sd()
    state = dcp_state(model, optimizer)
    check_dcp_fits(path, state["model"])
    with _quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=_no_dist())
    msd, osd = state["model"], state["optim"]
    if not is_segmented(model):
        msd, osd = state_to_canonical(msd, model.cfg), optim_to_canonical(osd, model.cfg)
    strict = not model.cfg.tie_embeddings
    sd.set_model_state_dict(model, msd, options=sd.StateDictOptions(strict=strict))
    sd.set_optimizer_state_dict(model, optimizer, osd)


def read_dcp_full(path: str | Path, cfg: HybridConfig) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state dict, FQN-keyed optimizer state dict) of DCP checkpoint `path`, consolidated in this
    process with canonical keys (the whole checkpoint in memory: for tools and tests, not for resuming)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    path = Path(path)
    dcp_metadata(path)
    state: dict[str, Any] = {}  # rebuilt from the metadata (as torch's dcp_to_torch_save does), in this process only
    with _quiet():
        _load_state_dict(state, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    return state_to_canonical(state["model"], cfg), optim_to_canonical(state["optim"], cfg)
