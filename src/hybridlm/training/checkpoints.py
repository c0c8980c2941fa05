"""Training-run checkpoints: `OUT/checkpoints/step_XXXXXXXX/` with the model, optimizer,
RNG and trainer state, written crash-safely, plus the `latest` pointer and pruning.

What a checkpoint holds: ``config.json`` + ``model.safetensors`` (the full model, canonical
names: a `load_model` directory), ``rng.pt``, ``trainer_state.json``, and the optimizer either
as ``optimizer.pt`` (one process / DDP: the full, FQN-keyed state) or, for sharded runs (FSDP2,
TP, TP x FSDP2), inside ``dcp/``: model and optimizer as a sharded DCP checkpoint written by
every rank (`hybridlm.training.dcp_checkpoint`), which is what such a checkpoint resumes from,
in any layout. There ``model.safetensors`` is gathered on rank 0 (one full copy of the weights,
not of the optimizer).

A checkpoint is built in `checkpoints/.tmp-step_*` (every file written atomically),
renamed into place only when complete, then `latest` is rewritten atomically, then old
checkpoints beyond `keep_last` are removed. A kill at any moment leaves the previous
checkpoint intact. See `hybridlm.training.loop` for the loop that uses them; `publish_dir`
also writes the run's final model.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..config import HybridConfig, read_json
from ..interop.checkpoint import CONFIG_NAME, WEIGHTS_NAME, check_state_dict, model_from_state, read_config, save_model
from ..interop.files import atomic_write, atomic_write_text, load_tensors
from ..model.lm import HybridLM
from .dcp_checkpoint import DCP_DIR, DCP_METADATA, dcp_metadata, read_dcp_full

CKPT_DIR = "checkpoints"
LATEST = "latest"
OPTIMIZER_NAME = "optimizer.pt"
RNG_NAME = "rng.pt"
STATE_NAME = "trainer_state.json"
STATE_FORMAT = "hybridlm-trainer-v1"
CKPT_FILES = (CONFIG_NAME, WEIGHTS_NAME, OPTIMIZER_NAME, RNG_NAME, STATE_NAME)
DCP_CKPT_FILES = (CONFIG_NAME, WEIGHTS_NAME, f"{DCP_DIR}/{DCP_METADATA}", RNG_NAME, STATE_NAME)  # (sharded runs)
_STEP_DIR = re.compile(r"step_(\d{8,})")
# Test hook: seconds to sleep after each file of a checkpoint (to SIGKILL mid-write).
_SLEEP_ENV = "HYBRIDLM_TEST_CKPT_SLEEP"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temp dirs are ignored)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint named by ``checkpoints/latest`` (else the newest ``step_*`` dir), or None.

    ValueError if ``latest`` names something that is not a checkpoint directory.
    """
    root = Path(run_dir) / CKPT_DIR
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if not _STEP_DIR.fullmatch(name) or not (root / name).is_dir():
            raise ValueError(f"{pointer} names {name!r}, which is not a checkpoint directory in {root}; "
                             f"remove {pointer} to resume from the newest step_* directory")
        return root / name
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _pause() -> None:
    delay = float(os.environ.get(_SLEEP_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_dir(path: Path) -> None:
    """Rename aside (atomic, so no half-deleted dir keeps a checkpoint name), then delete."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def clean_stale(run_dir: str | Path) -> None:
    """Delete ``.tmp-*`` / ``.trash-*`` leftovers of interrupted checkpoint (and final model) writes."""
    for root in (Path(run_dir) / CKPT_DIR, Path(run_dir)):
        if root.is_dir():
            for p in root.iterdir():
                if p.name.startswith((".tmp-", ".trash-")) and p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                elif p.is_file() and p.name.startswith(".") and p.name.endswith(".tmp"):  # atomic_write temps
                    p.unlink(missing_ok=True)


def new_temp_dir(final: Path) -> Path:
    """A fresh `.tmp-*` sibling of `final` to build it in (`publish_dir`'s `tmp`); cleaned by `clean_stale`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))


def publish_dir(final: Path, fill: Callable[[Path], None], tmp: Path | None = None) -> Path:
    """Build directory `final` via fill(tmp) in a `.tmp-*` sibling, fsync it, then rename it into place.

    A crash at any point leaves either the old `final` or the complete new one, never a part.
    `tmp`: a `new_temp_dir(final)` already holding files (other ranks' DCP shards), else a new one.
    """
    tmp = tmp if tmp is not None else new_temp_dir(final)
    try:
        fill(tmp)
        _fsync_dir(tmp)
        if final.exists():  # e.g. a newer-than-latest leftover of a crash right after its rename
            remove_dir(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(final.parent)
    return final


def checkpoint_temp_dir(run_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` is built before `save_checkpoint` publishes it (rank 0 creates it)."""
    return new_temp_dir(Path(run_dir) / CKPT_DIR / checkpoint_name(step))


def save_checkpoint(run_dir: str | Path, step: int, cfg: HybridConfig, model_sd: dict[str, torch.Tensor],
                    optim_sd: dict[str, Any] | None, rng: dict[str, Any], state: dict[str, Any],
                    keep_last: int = 0, tmp: Path | None = None) -> Path:
    """Write ``checkpoints/step_{step:08d}`` atomically, point ``latest`` at it, prune to `keep_last`.

    `optim_sd` None: the optimizer is in ``tmp/dcp`` already (a `checkpoint_temp_dir` the ranks wrote
    their DCP shards into), and `tmp` gets the other files before it is renamed into place.
    """
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)

    def fill(tmp: Path) -> None:
        save_model(model_from_state(cfg, model_sd), tmp, extra={"step": step})
        _pause()
        if optim_sd is not None:
            atomic_write(tmp / OPTIMIZER_NAME, lambda p: torch.save(optim_sd, p))
            _pause()
        atomic_write(tmp / RNG_NAME, lambda p: torch.save(rng, p))
        _pause()
        atomic_write_text(tmp / STATE_NAME, json.dumps({"format": STATE_FORMAT, **state}, indent=2) + "\n")

    final = publish_dir(root / name, fill, tmp)
    _pause()
    atomic_write_text(root / LATEST, name + "\n")
    if keep_last > 0:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            if old != final:
                remove_dir(old)
    return final


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip/EOF/Runtime errors of a damaged file
        raise ValueError(f"{path} is not a readable checkpoint file (corrupt or truncated?): {e}") from None


def load_checkpoint(path: str | Path, tensors: bool = True) -> dict[str, Any]:
    """Read and check a training checkpoint directory.

    Returns ``{"path", "config", "model", "optimizer", "rng", "state", "dcp"}``; ``dcp`` is the
    DCP directory of a sharded run's checkpoint (else None). "model" and "optimizer" are full,
    canonical, FQN-keyed dicts (a DCP optimizer consolidated in this process), or None for a DCP
    checkpoint read with ``tensors=False`` (resuming loads them sharded: `load_dcp`). A missing,
    corrupt or inconsistent file raises ValueError naming it.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    dcp = path / DCP_DIR if (path / DCP_DIR).is_dir() else None
    for name in CKPT_FILES if dcp is None else DCP_CKPT_FILES:
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path} is incomplete: {name} is missing")
    try:
        cfg = read_config(path)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{path / CONFIG_NAME} is not a valid hybridlm config: {e}") from None
    model = optim = None
    if dcp is None or tensors:
        model = load_tensors(path / WEIGHTS_NAME)
        with torch.device("meta"):
            check_state_dict(HybridLM(cfg), model, str(path / WEIGHTS_NAME))
    if dcp is None:
        optim = _torch_load(path / OPTIMIZER_NAME)
        if not isinstance(optim, dict) or "state" not in optim or "param_groups" not in optim:
            raise ValueError(f"{path / OPTIMIZER_NAME} does not hold an optimizer state dict")
    elif tensors:
        optim = read_dcp_full(dcp, cfg)[1]
    else:
        dcp_metadata(dcp)  # readable (its shapes are checked against the model by load_dcp)
    rng = _torch_load(path / RNG_NAME)
    state = read_json(path / STATE_NAME)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int):
        raise ValueError(f"{path / STATE_NAME} is not a {STATE_FORMAT} trainer state")
    return {"path": path, "config": cfg, "model": model, "optimizer": optim, "rng": rng, "state": state, "dcp": dcp}


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
