"""The GGUF v3 container, written without llama.cpp's ``gguf`` package: typed metadata, tensor infos, aligned data.

A file is: ``b"GGUF"``, version 3 (uint32), the tensor count and the metadata count (uint64);
then each metadata pair (a string key, a uint32 value type, the value); then each tensor's
info (name, number of dims, dims in ggml order: the fastest-varying first, i.e. the torch
shape reversed, the ggml type, the offset of its data); then zero padding to the 32-byte
alignment and each tensor's bytes (row-major, in torch's order), each starting at a multiple
of 32. Strings are a uint64 byte length + UTF-8 bytes; arrays an element type, a uint64
count and the elements; every number is little-endian.

Metadata values are given with their GGUF type (`u32`, `i32s`, `f32`, `strs`, ... below;
plain `str` and `bool` values are typed by themselves). Tensors are written one at a time
from their `TensorEntry.data` callable, so a large model is never converted all at once;
the file is written atomically (`files.atomic_write`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from .files import atomic_write

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32  # llama.cpp's default (no general.alignment key)

# GGUF metadata value types (gguf.h: enum gguf_type)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i",
                   FLOAT32: "<f", BOOL: "<?", UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_NUMPY_DTYPES = {UINT32: "<u4", INT32: "<i4", FLOAT32: "<f4", UINT64: "<u8", INT64: "<i8", FLOAT64: "<f8"}

# ggml tensor types (ggml.h: enum ggml_type) of the formats written here, with their element size
GGML_F32, GGML_F16, GGML_BF16 = 0, 1, 30
GGML_TYPE_SIZES = {GGML_F32: 4, GGML_F16: 2, GGML_BF16: 2}


@dataclass(frozen=True)
class Value:
    """A typed metadata value: ``kind`` is a GGUF type; for ARRAY, ``item`` is the element type."""

    kind: int
    value: Any
    item: int | None = None


def u32(v: int) -> Value:
    return Value(UINT32, int(v))


def f32(v: float) -> Value:
    return Value(FLOAT32, float(v))


def i32s(values: Iterable[int]) -> Value:
    return Value(ARRAY, [int(v) for v in values], INT32)


def strs(values: Iterable[str]) -> Value:
    return Value(ARRAY, list(values), STRING)


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: its GGUF name, torch-order shape, ggml type, and a callable that
    returns its data as a C-contiguous numpy array of exactly ``nbytes`` bytes (called once, at write time)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * GGML_TYPE_SIZES[self.ggml_type]


def _string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _typed(v: Any) -> Value:
    if isinstance(v, Value):
        return v
    if isinstance(v, bool):
        return Value(BOOL, v)
    if isinstance(v, str):
        return Value(STRING, v)
    raise TypeError(f"GGUF metadata value {v!r} needs an explicit type (u32(...), f32(...), i32s(...), ...)")


def _encode_value(v: Value) -> bytes:
    if v.kind == STRING:
        return _string(v.value)
    if v.kind in _SCALAR_FORMATS:
        return struct.pack(_SCALAR_FORMATS[v.kind], v.value)
    if v.kind != ARRAY or v.item is None or v.item == ARRAY:
        raise ValueError(f"unsupported GGUF value type {v.kind} (element type {v.item})")
    head = struct.pack("<IQ", v.item, len(v.value))
    if v.item == STRING:
        return head + b"".join(_string(s) for s in v.value)
    if v.item in _NUMPY_DTYPES:
        return head + np.asarray(v.value, dtype=_NUMPY_DTYPES[v.item]).tobytes()
    return head + b"".join(struct.pack(_SCALAR_FORMATS[v.item], x) for x in v.value)


def encode_metadata(metadata: dict[str, Any]) -> bytes:
    """The metadata section: each key, its value type, its value."""
    out = []
    for key, raw in metadata.items():
        v = _typed(raw)
        out.append(_string(key) + struct.pack("<I", v.kind) + _encode_value(v))
    return b"".join(out)


def _padding(n: int) -> int:
    return -n % ALIGNMENT


def encode_tensor_infos(tensors: list[TensorEntry]) -> bytes:
    """The tensor-info section: name, dims (ggml order), type and data offset of every tensor."""
    out, offset = [], 0
    for t in tensors:
        dims = tuple(reversed(t.shape))
        out.append(_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.ggml_type, offset))
        offset += t.nbytes + _padding(t.nbytes)
    return b"".join(out)


def write_gguf(path: str | Path, metadata: dict[str, Any], tensors: list[TensorEntry]) -> Path:
    """Write a GGUF v3 file (atomically); ValueError for duplicate names or a tensor whose data has the wrong size."""
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate GGUF tensor names: {sorted({n for n in names if names.count(n) > 1})}")
    header = (MAGIC + struct.pack("<IQQ", VERSION, len(tensors), len(metadata))
              + encode_metadata(metadata) + encode_tensor_infos(tensors))

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(header + b"\0" * _padding(len(header)))
            for t in tensors:
                _write_data(f, t)

    return atomic_write(path, write)


def _write_data(f: BinaryIO, t: TensorEntry) -> None:
    data = np.ascontiguousarray(t.data())
    if data.nbytes != t.nbytes:
        raise ValueError(f"GGUF tensor {t.name!r}: {data.nbytes} bytes of data for shape {t.shape} "
                         f"(ggml type {t.ggml_type}: {t.nbytes} expected)")
    f.write(memoryview(data).cast("B"))
    f.write(b"\0" * _padding(t.nbytes))
