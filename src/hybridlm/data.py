"""Corpus reading, token shards and deterministic batches.

This module owns everything between raw text on disk and ``(x, y)`` training tensors:

* :func:`read_documents` / :func:`iter_documents` - stream documents out of ``.txt``,
  ``.txt.gz``, ``.jsonl`` (``.jsonl.gz``) files or whole directories, with strict UTF-8
  decoding and errors that name the offending file (and line / byte offset).
* :func:`prepare_shards` - tokenize a corpus into raw memory-mappable token files
  (``train_00000.bin``, ..., ``val_00000.bin``) plus ``meta.json`` and a copy of the
  tokenizer. Documents are separated by the tokenizer's EOS token; the validation split
  is the last ``val_fraction`` of the token stream (held out, contiguous, deterministic).
* :class:`TokenDataset` - a split over ``np.memmap``. :meth:`TokenDataset.get_batch` is a
  pure function of ``(seed, step, rank, world_size, batch_size, seq_len)``: the global
  batch of ``batch_size * world_size`` windows is drawn from
  ``numpy.random.default_rng([seed, step])`` and rank ``r`` takes rows
  ``[r * batch_size, (r + 1) * batch_size)``. Resuming at a step and running under DDP
  therefore reproduce single-process training bit-exactly.
* :func:`unigram_entropy` - entropy of the token distribution (nats/token), the loss of
  the best context-free model; a language model should beat it.
* :func:`default_corpus_path` - the bundled King James Bible (``assets/kjv.txt.gz``).
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import read_json

if TYPE_CHECKING:
    from hybridlm.tokenizer import Tokenizer

PathLike = str | Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
META_FILE = "meta.json"
META_FORMAT = "hybridlm-tokens-v1"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens = 256 MiB per uint16 shard
_ENCODE_BATCH_CHARS = 1 << 20  # tokenize documents in batches of about this many chars
_ENCODE_BATCH_DOCS = 1024
_COPY_CHUNK = 1 << 24  # tokens per chunk when copying / counting shards


def default_corpus_path() -> Path:
    """Path of the bundled corpus: the King James Bible, one verse per line, gzipped."""
    return ASSETS_DIR / "kjv.txt.gz"


# ----------------------------------------------------------------------------- reading


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def _open_binary(path: Path) -> io.BufferedIOBase:
    """Open ``path`` for binary reading, decompressing ``*.gz`` transparently."""
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode_utf8(data: bytes, path: Path, base_offset: int = 0) -> str:
    """Strict UTF-8 decode; a ValueError names the file and the first bad byte offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        where = " of the decompressed data" if path.name.lower().endswith(".gz") else ""
        raise ValueError(
            f"{path}: invalid UTF-8 at byte offset {base_offset + err.start}{where} "
            f"({err.reason}); re-encode the file as UTF-8"
        ) from None


def _read_text_file(path: Path) -> Iterator[str]:
    """A ``.txt`` / ``.txt.gz`` file is exactly one document (bytes kept verbatim)."""
    with _open_binary(path) as f:
        yield _decode_utf8(f.read(), path)


def _read_jsonl_file(path: Path) -> Iterator[str]:
    """Yield the ``text`` field of every non-blank line of a JSON-lines file."""
    offset = 0
    with _open_binary(path) as f:
        for lineno, raw in enumerate(f, start=1):
            line = _decode_utf8(raw, path, offset)
            offset += len(raw)
            if line.strip():
                yield _jsonl_text(line, path, lineno)


def _jsonl_text(line: str, path: Path, lineno: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a string 'text' field")
    return record["text"]


def _corpus_files(path: Path) -> list[Path]:
    """The files behind ``path``: itself, or every supported file below a directory (sorted)."""
    if not path.exists():
        raise FileNotFoundError(f"corpus path not found: {path}")
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and _has_suffix(p, SUPPORTED_SUFFIXES))
    if not _has_suffix(path, SUPPORTED_SUFFIXES):
        raise ValueError(f"{path}: unsupported corpus file type (expected one of {', '.join(SUPPORTED_SUFFIXES)})")
    return [path]


def _read_file(path: Path) -> Iterator[str]:
    reader = _read_jsonl_file if _has_suffix(path, JSONL_SUFFIXES) else _read_text_file
    try:
        yield from reader(path)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: corrupt gzip data ({err})") from None


def read_documents(path: PathLike) -> Iterator[str]:
    """Stream the documents stored at ``path``.

    ``path`` may be a ``.txt`` / ``.txt.gz`` file (one document), a ``.jsonl`` /
    ``.jsonl.gz`` file (one document per line, in the ``text`` field) or a directory
    (all such files below it, recursively, in sorted order). Whitespace-only documents
    are skipped. Raises FileNotFoundError for a missing path (immediately) and, while
    iterating, ValueError for invalid UTF-8 / JSON or when no document has any text.
    """
    path = Path(path)
    files = _corpus_files(path)
    return _nonempty_documents(path, files)


def _nonempty_documents(path: Path, files: list[Path]) -> Iterator[str]:
    found = False
    for file in files:
        for doc in _read_file(file):
            if doc.strip():
                found = True
                yield doc
    if not found:
        kinds = "/".join(SUPPORTED_SUFFIXES)
        raise ValueError(f"corpus {path} is empty: no non-whitespace text in any {kinds} file")


def iter_documents(paths: PathLike | Iterable[PathLike]) -> Iterator[str]:
    """Chain :func:`read_documents` over several paths (each path must be non-empty).

    All paths are checked for existence here, before the first document is read.
    """
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("no corpus paths given")
    return itertools.chain.from_iterable([read_documents(p) for p in paths])


# ------------------------------------------------------------------------------ shards


def token_dtype(vocab_size: int) -> np.dtype:
    """Unsigned dtype for token ids: ``uint16`` when ``vocab_size < 65536``, else ``uint32``."""
    return np.dtype(np.uint16 if vocab_size < 1 << 16 else np.uint32)


class _ShardWriter:
    """Append token arrays to ``{prefix}_{i:05d}.bin`` files of at most ``shard_tokens`` tokens."""

    def __init__(self, directory: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.prefix, self.dtype, self.shard_tokens = directory, prefix, dtype, shard_tokens
        self.shards: list[Path] = []
        self.sizes: list[int] = []
        self._file: BinaryIO | None = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._file is None or self.sizes[-1] >= self.shard_tokens:
                self._roll()
            room = self.shard_tokens - self.sizes[-1]
            head, tokens = tokens[:room], tokens[room:]
            assert self._file is not None
            self._file.write(head.tobytes())
            self.sizes[-1] += head.size

    def _roll(self) -> None:
        self.close()
        self.shards.append(self.directory / f"{self.prefix}_{len(self.shards):05d}.bin")
        self.sizes.append(0)
        self._file = open(self.shards[-1], "wb")  # noqa: SIM115 (closed by close())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)


def _document_batches(docs: Iterable[str]) -> Iterator[list[str]]:
    """Group documents into batches of roughly ``_ENCODE_BATCH_CHARS`` characters."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _ENCODE_BATCH_CHARS or len(batch) >= _ENCODE_BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize_stream(
    docs: Iterable[str], tokenizer: Tokenizer, eos_id: int, dtype: np.dtype, progress: bool
) -> Iterator[np.ndarray]:
    """Yield one array per document batch: ``doc0 EOS doc1 EOS ... docN`` across the stream."""
    eos = np.array([eos_id], dtype=dtype)
    first, total = True, 0
    with tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:
        for batch in _document_batches(docs):
            pieces: list[np.ndarray] = []
            for ids in tokenizer.encode_batch(batch):
                if not first:
                    pieces.append(eos)
                pieces.append(np.asarray(ids, dtype=dtype))
                first = False
            arr = np.concatenate(pieces)
            total += arr.size
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{total:,}")
            yield arr


def _val_size(total: int, val_fraction: float, min_val_tokens: int) -> int:
    """Number of held-out tokens; ValueError when val or train would be too small."""
    n_val = max(1, round(total * val_fraction))
    if n_val < min_val_tokens:
        raise ValueError(
            f"validation split would hold {n_val} tokens ({val_fraction:.2%} of {total}), fewer than "
            f"min_val_tokens={min_val_tokens}; use a larger corpus or val_fraction"
        )
    if total - n_val < 2:
        raise ValueError(f"training split would hold {total - n_val} tokens (of {total}); the corpus is too small")
    return n_val


def _move_tail(train: _ShardWriter, val: _ShardWriter, n_tail: int) -> None:
    """Move the last ``n_tail`` tokens of ``train``'s shards (in order) into ``val``."""
    itemsize = train.dtype.itemsize
    cuts: list[tuple[int, int]] = []  # (shard index, first token moved), last shard first
    remaining = n_tail
    for i in range(len(train.shards) - 1, -1, -1):
        take = min(remaining, train.sizes[i])
        cuts.append((i, train.sizes[i] - take))
        remaining -= take
        if not remaining:
            break
    for i, start in reversed(cuts):
        for offset in range(start, train.sizes[i], _COPY_CHUNK):
            count = min(_COPY_CHUNK, train.sizes[i] - offset)
            val.write(np.fromfile(train.shards[i], dtype=train.dtype, count=count, offset=offset * itemsize))
    for i, start in cuts:  # truncate from the last shard backwards
        if start:
            with open(train.shards[i], "r+b") as f:
                f.truncate(start * itemsize)
            train.sizes[i] = start
        else:
            train.shards[i].unlink()
            del train.shards[i], train.sizes[i]


def _replace_split_files(out_dir: Path, writers: dict[str, _ShardWriter]) -> None:
    """Remove stale shard files in ``out_dir`` and move the freshly written ones in."""
    for split in SPLITS:
        for stale in out_dir.glob(f"{split}_*.bin"):
            stale.unlink()
    for writer in writers.values():
        for shard in writer.shards:
            shard.replace(out_dir / shard.name)


def prepare_shards(
    inputs: PathLike | Sequence[PathLike],
    tokenizer: Tokenizer,
    out_dir: PathLike,
    val_fraction: float = 0.01,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    min_val_tokens: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``train_*.bin`` / ``val_*.bin`` token files in ``out_dir``.

    Documents (see :func:`read_documents`) are concatenated with the tokenizer's EOS id
    between them. The last ``val_fraction`` of the token stream (at least one token,
    and at least ``min_val_tokens``) becomes the ``val`` split, the rest ``train``; so
    decoding train followed by val gives back ``EOS.join(documents)``. Token files are raw
    little-endian arrays of ``token_dtype(tokenizer.vocab_size)`` holding at most
    ``shard_tokens`` tokens each. ``meta.json`` (returned as a dict) records the dtype,
    shard names, token counts, tokenizer vocab size / EOS id and the sources; the
    tokenizer itself is saved as ``tokenizer.json`` next to them. Tokenization streams:
    only one batch of documents is held in memory at a time.
    """
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token, which is needed to separate documents")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    writers = {split: _ShardWriter(staging, split, dtype, shard_tokens) for split in SPLITS}
    try:
        for arr in _tokenize_stream(iter_documents(inputs), tokenizer, tokenizer.eos_id, dtype, progress):
            writers["train"].write(arr)
        writers["train"].close()
        n_val = _val_size(writers["train"].num_tokens, val_fraction, min_val_tokens)
        _move_tail(writers["train"], writers["val"], n_val)
        writers["val"].close()
        _replace_split_files(out_dir, writers)
    finally:
        for writer in writers.values():
            writer.close()
        shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save(out_dir / "tokenizer.json")
    meta = {
        "format": META_FORMAT,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "val_fraction": val_fraction,
        "sources": [str(p) for p in inputs],
        "tokenizer": "tokenizer.json",
        "splits": {
            split: {"num_tokens": w.num_tokens, "shards": [p.name for p in w.shards]} for split, w in writers.items()
        },
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


# ----------------------------------------------------------------------------- dataset


class _ShardedTokens:
    """Read-only view of several token arrays as one contiguous stream."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self.arrays = arrays
        self.starts = np.cumsum([0] + [a.size for a in arrays])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def slice(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream (may span shards)."""
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            arr, base = self.arrays[first], int(self.starts[first])
            end = min(stop, base + arr.size)
            parts.append(arr[start - base : end - base])
            start, first = end, first + 1
        return np.concatenate(parts) if len(parts) != 1 else np.array(parts[0])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Stack the windows ``[s, s + length)`` for every ``s`` in ``starts``."""
        if len(self.arrays) == 1:
            return self.arrays[0][starts[:, None] + np.arange(length)]
        return np.stack([self.slice(int(s), int(s) + length) for s in starts])

    def chunks(self) -> Iterator[np.ndarray]:
        """Iterate over the stream in pieces of at most ``_COPY_CHUNK`` tokens."""
        for arr in self.arrays:
            for i in range(0, arr.size, _COPY_CHUNK):
                yield np.asarray(arr[i : i + _COPY_CHUNK])


def _read_meta(directory: Path) -> dict[str, Any]:
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{directory}: no {META_FILE}; create token shards with prepare_shards()")
    meta = read_json(meta_path)
    if meta.get("format") != META_FORMAT:
        raise ValueError(f"{meta_path}: unknown format {meta.get('format')!r}, expected {META_FORMAT!r}")
    return meta


def _memmap(path: Path, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    if path.stat().st_size % dtype.itemsize:
        raise ValueError(f"{path}: size is not a multiple of the {dtype.name} item size")
    return np.memmap(path, dtype=dtype, mode="r")


def _batch_tensors(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``(B, T + 1)`` token windows into int64 inputs ``x`` and next-token targets ``y``."""
    rows = rows.astype(np.int64)
    return torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))


def _check_batch_args(batch_size: int, seq_len: int, rank: int, world_size: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class TokenDataset:
    """One split of a token corpus, memory-mapped.

    ``path`` is a directory written by :func:`prepare_shards` (then ``split`` picks
    ``"train"`` or ``"val"``), a single ``.bin`` shard from such a directory, or a
    ``.npy`` file holding a 1-D integer array.
    """

    def __init__(self, path: PathLike, split: str = "train") -> None:
        self.path = Path(path)
        self.split = split
        self.meta: dict[str, Any] = {}
        if not self.path.exists():
            raise FileNotFoundError(f"token data not found: {self.path}")
        self._tokens = _ShardedTokens(self._open_arrays())
        if not len(self._tokens):
            raise ValueError(f"{self.path}: split {split!r} holds no tokens")

    def _open_arrays(self) -> list[np.ndarray]:
        if self.path.suffix == ".npy":
            arr = np.load(self.path, mmap_mode="r")
            if arr.ndim != 1 or arr.dtype.kind not in "ui":
                raise ValueError(f"{self.path}: expected a 1-D integer array, got {arr.dtype} {arr.shape}")
            return [arr]
        directory = self.path if self.path.is_dir() else self.path.parent
        self.meta = _read_meta(directory)
        dtype = np.dtype(self.meta["dtype"])
        if not self.path.is_dir():
            return [_memmap(self.path, dtype)]
        if self.split not in self.meta["splits"]:
            raise ValueError(f"{self.path}: unknown split {self.split!r}; have {sorted(self.meta['splits'])}")
        return [_memmap(directory / name, dtype) for name in self.meta["splits"][self.split]["shards"]]

    @property
    def num_tokens(self) -> int:
        """Total number of tokens in this split."""
        return len(self._tokens)

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size of the tokenizer that produced the data (None for bare arrays)."""
        return self.meta.get("vocab_size")

    @property
    def eos_id(self) -> int | None:
        """Document separator id (None for bare arrays)."""
        return self.meta.get("eos_id")

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, split={self.split!r}, num_tokens={self.num_tokens})"

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A copy of tokens ``[start, stop)`` of the split."""
        stop = self.num_tokens if stop is None else min(stop, self.num_tokens)
        return self._tokens.slice(start, stop) if start < stop else np.zeros(0, dtype=np.int64)

    def _check_seq_len(self, seq_len: int) -> None:
        if self.num_tokens < seq_len + 1:
            raise ValueError(
                f"{self.path} ({self.split}): {self.num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "use a shorter seq_len or more data"
            )

    def get_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows for ``step``: int64 ``(x, y)`` of shape ``(batch_size, seq_len)``.

        Window starts for the global batch of ``batch_size * world_size`` rows come from
        ``np.random.default_rng([seed, step])``; this rank gets rows
        ``[rank * batch_size, (rank + 1) * batch_size)``. ``y`` is ``x`` shifted by one.
        """
        _check_batch_args(batch_size, seq_len, rank, world_size)
        if seed < 0 or step < 0:
            raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
        self._check_seq_len(seq_len)
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.num_tokens - seq_len, size=batch_size * world_size)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        return _batch_tensors(self._tokens.windows(mine, seq_len + 1))

    def num_eval_windows(self, seq_len: int) -> int:
        """Number of non-overlapping ``seq_len`` windows :meth:`iter_eval_batches` walks."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Walk the split in order with non-overlapping windows (window ``i`` starts at ``i * seq_len``).

        Yields only full global batches of ``batch_size * world_size`` windows (rank ``r``
        gets rows ``[r * batch_size, (r + 1) * batch_size)``), at most ``max_batches`` of
        them. ValueError if the split cannot fill a single global batch.
        """
        _check_batch_args(batch_size, seq_len, rank, world_size)
        self._check_seq_len(seq_len)
        global_bs = batch_size * world_size
        n_batches = self.num_eval_windows(seq_len) // global_bs
        if n_batches == 0:
            raise ValueError(
                f"{self.path} ({self.split}): {self.num_tokens} tokens cannot fill one evaluation batch of "
                f"{global_bs} x {seq_len} tokens; lower batch_size or seq_len"
            )
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            first = b * global_bs + rank * batch_size
            starts = np.arange(first, first + batch_size) * seq_len
            yield _batch_tensors(self._tokens.windows(starts, seq_len + 1))

    def token_counts(self, minlength: int = 0) -> np.ndarray:
        """Occurrence count of every token id in the split (``np.bincount``)."""
        return _token_counts(self._tokens.chunks(), minlength)


def _token_counts(chunks: Iterable[np.ndarray], minlength: int = 0) -> np.ndarray:
    counts = np.zeros(minlength, dtype=np.int64)
    for chunk in chunks:
        c = np.bincount(np.asarray(chunk, dtype=np.int64), minlength=counts.size)
        c[: counts.size] += counts
        counts = c
    return counts


def unigram_entropy(data: TokenDataset | np.ndarray) -> float:
    """Entropy in nats/token of the empirical token distribution of ``data``.

    This is the cross-entropy of the best model that ignores context, so a trained
    language model's validation loss should be well below it.
    """
    counts = data.token_counts() if isinstance(data, TokenDataset) else _token_counts([np.ravel(data)])
    total = counts.sum()
    if total == 0:
        raise ValueError("unigram_entropy of an empty token array")
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())
