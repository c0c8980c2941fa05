"""Files on disk: atomic writes, safetensors reads and writes with errors that name the file.

Writes go to a temp file beside the target, are fsynced, then renamed over it, so a
crash never leaves a half-written file under the final name. Reads raise
FileNotFoundError / ValueError (corrupt, truncated) with the path in the message.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..config import read_json

_UNREADABLE = (SafetensorError, OSError, RuntimeError, ValueError)


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call write(tmp_path) on a temp file next to `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`text` written atomically as UTF-8 (whatever the locale)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors file written atomically; tensors are made contiguous and de-aliased."""
    flat = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))


def _unreadable(path: Path, err: Exception) -> ValueError:
    return ValueError(f"{path} is not a readable safetensors file (corrupt or truncated?): {err}")


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; FileNotFoundError / ValueError (corrupt) with the path in the message."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except _UNREADABLE as e:
        raise _unreadable(path, e) from None


def read_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype such as "BF16") from a safetensors header, without reading the data."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
            return out
    except _UNREADABLE as e:
        raise _unreadable(path, e) from None


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor(name)
    except _UNREADABLE as e:
        raise _unreadable(path, e) from None


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def uniform_dtype(stored: set[str]) -> torch.dtype | None:
    """The torch dtype when every stored tensor has the same floating dtype, else None."""
    dtypes = {SAFETENSORS_DTYPES.get(s) for s in stored}
    return dtypes.pop() if len(dtypes) == 1 and None not in dtypes else None


def require_dir(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"not a directory: {path}")


def read_json_file(path: Path, what: str) -> Any:
    """`read_json`, with a FileNotFoundError saying which file of the directory (`what`) is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"no {path.name} in {path.parent} ({what})")
    return read_json(path)
