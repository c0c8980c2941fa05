"""`TokenDataset`: one split of prepared token shards, memory-mapped, with deterministic batches.

:meth:`TokenDataset.get_batch` is a pure function of ``(seed, step, rank, world_size,
batch_size, seq_len)``: the global batch of ``batch_size * world_size`` windows is drawn
from ``numpy.random.default_rng([seed, step])`` and rank ``r`` takes rows
``[r * batch_size, (r + 1) * batch_size)``. Resuming at a step and running under DDP
therefore reproduce single-process training bit-exactly.

With ``documents=True`` the batches also carry ``seq_idx`` (b, seq_len) int64: the
document index of every input token, counted from 0 inside each window (a window that
starts mid-document starts at 0), from the document starts that ``prepare_shards``
records (`hybridlm.training.shards`; the EOS that ends a document belongs to it and its
target, the next document's first token, is kept). The windows are the same either way.

:func:`unigram_entropy` is the entropy of the token distribution (nats/token), the loss of
the best context-free model; a language model should beat it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import read_json
from .corpus import PathLike
from .shards import COPY_CHUNK, META_FILE, META_FORMAT, TOKEN_FORMATS

Batch = tuple[torch.Tensor, ...]  # (x, y) or (x, y, seq_idx), each (b, seq_len) int64


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
        """Iterate over the stream in pieces of at most ``COPY_CHUNK`` tokens."""
        for arr in self.arrays:
            for i in range(0, arr.size, COPY_CHUNK):
                yield np.asarray(arr[i : i + COPY_CHUNK])


def read_data_meta(directory: Path) -> dict[str, Any]:
    """``directory/meta.json`` of a data directory as a dict (ValueError when there is none)."""
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise ValueError(f"{directory}: no {META_FILE}; create token shards with prepare_shards()")
    return read_json(meta_path)


def _read_meta(directory: Path) -> dict[str, Any]:
    meta = read_data_meta(directory)
    if meta.get("format") not in TOKEN_FORMATS:
        raise ValueError(f"{directory / META_FILE}: format {meta.get('format')!r} is not a token-shard format "
                         f"({', '.join(TOKEN_FORMATS)}); open packed SFT data with "
                         "hybridlm.training.packing.open_dataset")
    return meta


def _load_doc_starts(path: Path, num_tokens: int) -> np.ndarray:
    """The int64 document starts in ``path`` (memory-mapped), checked against the split."""
    if not path.is_file():
        raise FileNotFoundError(f"document starts not found: {path} (re-run data prepare)")
    starts = np.load(path, mmap_mode="r")
    if (starts.ndim != 1 or starts.dtype != np.int64 or not starts.size or starts[0] != 0
            or starts[-1] >= max(num_tokens, 1) or (starts.size > 1 and not (np.diff(starts) > 0).all())):
        raise ValueError(f"{path}: expected ascending int64 document starts beginning at 0 and below "
                         f"{num_tokens} (the split's token count)")
    return starts


def window_seq_idx(doc_starts: np.ndarray | None, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """(len(starts), seq_len) int64 document index of the tokens ``[s, s + seq_len)`` of each window.

    Counted from 0 in every window: position ``p`` gets the number of document starts in
    ``(s, p]``. Without ``doc_starts`` (data without boundaries) every index is 0.
    """
    if doc_starts is None:
        return np.zeros((starts.size, seq_len), dtype=np.int64)
    pos = starts[:, None].astype(np.int64) + np.arange(seq_len)  # (n, seq_len) stream offsets
    upto = np.searchsorted(doc_starts, pos, side="right")  # document starts <= p
    return (upto - upto[:, :1]).astype(np.int64)


def memmap_array(path: Path, dtype: np.dtype) -> np.ndarray:
    """Read-only memory map of a raw array file (FileNotFoundError / ValueError for a bad file)."""
    if not path.is_file():
        raise FileNotFoundError(f"token file not found: {path}")
    if path.stat().st_size % dtype.itemsize:
        raise ValueError(f"{path}: size is not a multiple of the {dtype.name} item size")
    return np.memmap(path, dtype=dtype, mode="r")


def _batch_tensors(rows: np.ndarray, seq_idx: np.ndarray | None = None) -> Batch:
    """Split ``(B, T + 1)`` token windows into int64 inputs ``x`` and next-token targets ``y``
    (and ``seq_idx`` (B, T) as a tensor when given)."""
    rows = rows.astype(np.int64)
    x, y = torch.from_numpy(np.ascontiguousarray(rows[:, :-1])), torch.from_numpy(np.ascontiguousarray(rows[:, 1:]))
    return (x, y) if seq_idx is None else (x, y, torch.from_numpy(np.ascontiguousarray(seq_idx)))


def check_batch_args(batch_size: int, seq_len: int, rank: int, world_size: int, step: int = 0, seed: int = 0) -> None:
    """ValueError for a non-positive batch shape, a rank outside the world, a negative step or seed."""
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")


class DataSplit:
    """What `TokenDataset` and `hybridlm.training.packing.PackedDataset` share: the data's
    ``meta.json`` (``path``, ``split``, ``meta``) and the vocabulary checks."""

    path: Path
    split: str
    meta: dict[str, Any]

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size of the tokenizer that produced the data (None for bare arrays)."""
        return self.meta.get("vocab_size")

    @property
    def eos_id(self) -> int | None:
        """Document separator id (None for bare arrays)."""
        return self.meta.get("eos_id")

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError when the data was tokenized with more token ids than a model of `vocab_size` has."""
        if self.vocab_size is not None and self.vocab_size > vocab_size:
            raise ValueError(f"data {self.path} was tokenized with a {self.vocab_size}-token vocabulary but the "
                             f"model has vocab_size={vocab_size}")


class TokenDataset(DataSplit):
    """One split of a token corpus, memory-mapped.

    ``path`` is a directory written by :func:`prepare_shards` (then ``split`` picks
    ``"train"`` or ``"val"``), a single ``.bin`` shard from such a directory, or a
    ``.npy`` file holding a 1-D integer array. Only a directory in the v2 format has
    document boundaries (:attr:`doc_starts`); the others are one token stream.
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
        self.doc_starts: np.ndarray | None = None  # int64 document start offsets, or None
        docs = self.meta.get("splits", {}).get(split, {}).get("documents") if self.path.is_dir() else None
        if self.meta.get("format") == META_FORMAT and docs:
            self.doc_starts = _load_doc_starts(self.path / docs, self.num_tokens)

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
            return [memmap_array(self.path, dtype)]
        if self.split not in self.meta["splits"]:
            raise ValueError(f"{self.path}: unknown split {self.split!r}; have {sorted(self.meta['splits'])}")
        return [memmap_array(directory / name, dtype) for name in self.meta["splits"][self.split]["shards"]]

    @property
    def num_tokens(self) -> int:
        """Total number of tokens in this split."""
        return len(self._tokens)

    @property
    def has_documents(self) -> bool:
        """Whether the data records document boundaries (``documents=True`` batches use them)."""
        return self.doc_starts is not None

    @property
    def num_documents(self) -> int:
        """Documents in this split (1 for data without boundaries)."""
        return 1 if self.doc_starts is None else int(self.doc_starts.size)

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

    def _windows(self, starts: np.ndarray, seq_len: int, documents: bool) -> Batch:
        rows = self._tokens.windows(starts, seq_len + 1)
        return _batch_tensors(rows, window_seq_idx(self.doc_starts, starts, seq_len) if documents else None)

    def get_batch(
        self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
        documents: bool = False,
    ) -> Batch:
        """Random training windows for ``step``: int64 ``(x, y)`` of shape ``(batch_size, seq_len)``.

        Window starts for the global batch of ``batch_size * world_size`` rows come from
        ``np.random.default_rng([seed, step])``; this rank gets rows
        ``[rank * batch_size, (rank + 1) * batch_size)``. ``y`` is ``x`` shifted by one.
        ``documents=True`` returns ``(x, y, seq_idx)`` for the same windows (module docstring;
        all zeros for data without boundaries).
        """
        check_batch_args(batch_size, seq_len, rank, world_size, step, seed)
        self._check_seq_len(seq_len)
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.num_tokens - seq_len, size=batch_size * world_size)
        mine = starts[rank * batch_size : (rank + 1) * batch_size]
        return self._windows(mine, seq_len, documents)

    def num_eval_windows(self, seq_len: int) -> int:
        """Number of non-overlapping ``seq_len`` windows :meth:`iter_eval_batches` walks."""
        return max(0, (self.num_tokens - 1) // seq_len)

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1,
        documents: bool = False,
    ) -> Iterator[Batch]:
        """Walk the split in order with non-overlapping windows (window ``i`` starts at ``i * seq_len``).

        Yields only full global batches of ``batch_size * world_size`` windows (rank ``r``
        gets rows ``[r * batch_size, (r + 1) * batch_size)``), at most ``max_batches`` of
        them; ``(x, y, seq_idx)`` with ``documents=True``. ValueError if the split cannot
        fill a single global batch.
        """
        check_batch_args(batch_size, seq_len, rank, world_size)
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
            yield self._windows(starts, seq_len, documents)

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
