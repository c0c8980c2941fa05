"""`TokenDataset`: one split of prepared token shards, memory-mapped, with deterministic batches.

:meth:`TokenDataset.get_batch` is a pure function of ``(seed, step, rank, world_size,
batch_size, seq_len)``: the global batch of ``batch_size * world_size`` windows is drawn
from ``numpy.random.default_rng([seed, step])`` and rank ``r`` takes rows
``[r * batch_size, (r + 1) * batch_size)``. Resuming at a step and running under DDP
therefore reproduce single-process training bit-exactly.

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
from .shards import COPY_CHUNK, META_FILE, META_FORMAT


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

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError when the data was tokenized with more token ids than a model of `vocab_size` has."""
        if self.vocab_size is not None and self.vocab_size > vocab_size:
            raise ValueError(f"data {self.path} was tokenized with a {self.vocab_size}-token vocabulary but the "
                             f"model has vocab_size={vocab_size}")

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
