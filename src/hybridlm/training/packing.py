"""Packed SFT data: conversations packed into fixed rows, each its own document, with a trained-token mask.

:func:`write_packed_dataset` turns ``(ids, trained)`` samples (one per conversation;
``trained[i]`` says whether the loss scores token ``i``, i.e. the prediction made at
position ``i - 1``; ``trained[0]`` is ignored since nothing predicts a first token) into a
directory in the ``hybridlm-packed-v1`` format::

    meta.json             format, seq_len, dtype, vocab_size, eos_id, val_fraction, seed, counts
    {split}_tokens.bin    rows x (seq_len + 1) token ids, raw, ``token_dtype(vocab_size)``
    {split}_trained.bin   rows x (seq_len + 1) uint8: 1 where the token is a trained target
    {split}_docs.npy      int64 document starts, offsets into the split's flat token array
    tokenizer.json

A seeded permutation holds out ``val_fraction`` of the samples (whole samples) as the
``val`` split. Each split is packed greedily in sample order: a sample goes into the
current row when it fits, else the row is closed and the sample starts the next one; a
sample longer than ``seq_len + 1`` tokens is truncated to that length. The rest of a
row is padding (the EOS id), a document of its own with no trained target. No sample
crosses rows, every row starts a document, and a target that crosses a document start
is never trained.

:class:`PackedDataset` reads a split back with the `TokenDataset` batch interface:
``(x, y, seq_idx)`` with ``y = -100`` where the target is not trained, rows drawn without
replacement within an epoch. :func:`open_dataset` opens either format from ``meta.json``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..model.lm import IGNORE_INDEX
from .corpus import PathLike
from .dataset import Batch, DataSplit, TokenDataset, check_batch_args, memmap_array, read_data_meta, window_seq_idx
from .shards import DOCS_SUFFIX, META_FILE, SPLITS, token_dtype

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

PACKED_FORMAT = "hybridlm-packed-v1"
TOKENS_SUFFIX, TRAINED_SUFFIX = "_tokens.bin", "_trained.bin"
_EPOCHS_CACHED = 2  # row permutations kept in memory (a batch can straddle two epochs)


def _stage_samples(samples: Iterable[tuple[Sequence[int], Sequence[bool]]], staging: Path, row_len: int,
                   vocab_size: int, dtype: np.dtype, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Write every sample (truncated to ``row_len``) to ``staging/{tokens,trained}.bin``.

    Returns each sample's (kept) length and whether it was truncated. ``trained[0]`` is
    stored as 0 (the first token of a sample is never predicted).
    """
    lengths: list[int] = []
    truncated: list[bool] = []
    with open(staging / "tokens.bin", "wb") as tok_f, open(staging / "trained.bin", "wb") as mask_f, \
            tqdm(desc="packing", unit="sample", disable=not progress) as bar:
        for i, (ids, trained) in enumerate(samples):
            ids_a, mask = np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=bool)
            if ids_a.ndim != 1 or mask.shape != ids_a.shape or not ids_a.size:
                raise ValueError(f"sample {i}: need non-empty 1-D ids and a trained mask of the same length, got "
                                 f"shapes {ids_a.shape} and {mask.shape}")
            if ids_a.min() < 0 or ids_a.max() >= vocab_size:
                raise ValueError(f"sample {i}: token ids must lie in [0, {vocab_size}), got range "
                                 f"[{ids_a.min()}, {ids_a.max()}]")
            truncated.append(ids_a.size > row_len)
            ids_a, mask = ids_a[:row_len], mask[:row_len].copy()
            mask[0] = False
            tok_f.write(ids_a.astype(dtype).tobytes())
            mask_f.write(mask.astype(np.uint8).tobytes())
            lengths.append(ids_a.size)
            bar.update(1)
    return np.asarray(lengths, dtype=np.int64), np.asarray(truncated, dtype=bool)


def _holdout(n: int, val_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Sample indices of each split (ascending): ``val`` is a seeded random ``val_fraction`` of them."""
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise ValueError(f"{n} samples cannot give a val split of {n_val} and a non-empty train split; "
                         "use more samples or a smaller val_fraction")
    perm = np.random.default_rng(seed).permutation(n)
    return {"train": np.sort(perm[n_val:]), "val": np.sort(perm[:n_val])}


def _pack_split(order: np.ndarray, lengths: np.ndarray, tokens: np.ndarray, trained: np.ndarray,
                row_len: int, eos_id: int, out: Path, split: str) -> dict[str, int]:
    """Pack the samples ``order`` greedily into rows written to ``out/{split}_*``; the split's counts."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    doc_starts: list[int] = []
    rows = used = 0
    row_tok = np.full(row_len, eos_id, dtype=tokens.dtype)
    row_mask = np.zeros(row_len, dtype=np.uint8)
    with open(out / f"{split}{TOKENS_SUFFIX}", "wb") as tok_f, open(out / f"{split}{TRAINED_SUFFIX}", "wb") as mask_f:
        def close_row() -> None:
            nonlocal rows, used
            if used < row_len:  # padding: its own document, nothing trained
                doc_starts.append(rows * row_len + used)
            tok_f.write(row_tok.tobytes())
            mask_f.write(row_mask.tobytes())
            row_tok.fill(eos_id)
            row_mask.fill(0)
            rows, used = rows + 1, 0

        for i in order:
            n = int(lengths[i])
            if used + n > row_len:
                close_row()
            doc_starts.append(rows * row_len + used)
            row_tok[used : used + n] = tokens[offsets[i] : offsets[i] + n]
            row_mask[used : used + n] = trained[offsets[i] : offsets[i] + n]
            used += n
        if used:
            close_row()
    np.save(out / f"{split}{DOCS_SUFFIX}", np.asarray(doc_starts, dtype=np.int64))
    n_trained = int(sum(int(trained[offsets[i] : offsets[i] + lengths[i]].sum()) for i in order))
    return {"samples": int(order.size), "rows": rows, "num_tokens": rows * row_len, "trained_tokens": n_trained}


def write_packed_dataset(samples: Iterable[tuple[Sequence[int], Sequence[bool]]], tokenizer: Tokenizer,
                         out_dir: PathLike, seq_len: int, val_fraction: float = 0.05, seed: int = 0,
                         progress: bool = True) -> dict[str, Any]:
    """Pack ``samples`` (``(ids, trained)`` per conversation) into ``out_dir``; returns ``meta.json`` as a dict.

    Rows hold ``seq_len + 1`` tokens (training reads ``seq_len`` inputs and their
    next-token targets from each). ``meta["truncated"]`` (and per split) counts the samples
    cut to ``seq_len + 1`` tokens. The samples stream through a staging file, so only
    their lengths are held in memory. ValueError for a bad sample (empty, mask length,
    ids outside the vocabulary), too few samples for both splits, or a split without a
    single trained token.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token, which is needed to pad packed rows")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    row_len, dtype = seq_len + 1, token_dtype(tokenizer.vocab_size)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=out_dir))
    try:
        lengths, truncated = _stage_samples(samples, staging, row_len, tokenizer.vocab_size, dtype, progress)
        if not lengths.size:
            raise ValueError("no samples to pack")
        tokens = memmap_array(staging / "tokens.bin", dtype)
        trained = memmap_array(staging / "trained.bin", np.dtype(np.uint8))
        splits: dict[str, dict[str, int]] = {}
        for split, order in _holdout(lengths.size, val_fraction, seed).items():
            splits[split] = _pack_split(order, lengths, tokens, trained, row_len, tokenizer.eos_id, staging, split)
            splits[split]["truncated"] = int(truncated[order].sum())
            if not splits[split]["trained_tokens"]:
                raise ValueError(f"the {split} split ({splits[split]['samples']} samples) has no trained token; "
                                 "check the trained masks, or use another seed / val_fraction")
        for split in SPLITS:
            for suffix in (TOKENS_SUFFIX, TRAINED_SUFFIX, DOCS_SUFFIX):
                (staging / f"{split}{suffix}").replace(out_dir / f"{split}{suffix}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    tokenizer.save(out_dir / "tokenizer.json")
    meta = {"format": PACKED_FORMAT, "seq_len": seq_len, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "val_fraction": val_fraction, "seed": seed, "tokenizer": "tokenizer.json",
            "samples": int(lengths.size), "truncated": int(truncated.sum()),
            "rows": sum(s["rows"] for s in splits.values()),
            "trained_tokens": sum(s["trained_tokens"] for s in splits.values()),
            "splits": {split: {**counts, "tokens": f"{split}{TOKENS_SUFFIX}", "trained": f"{split}{TRAINED_SUFFIX}",
                               "documents": f"{split}{DOCS_SUFFIX}"} for split, counts in splits.items()}}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


class PackedDataset(DataSplit):
    """One split of a packed dataset (:func:`write_packed_dataset`), memory-mapped.

    Batches are whole rows: ``x`` = tokens ``[0, seq_len)``, ``y`` = tokens ``[1, seq_len]``
    with ``IGNORE_INDEX`` (-100) where the target is not trained, ``seq_idx`` the
    document index of every input token (from 0 in each row). ValueError when the split
    has no trained token.
    """

    def __init__(self, data_dir: PathLike, split: str = "train") -> None:
        self.path, self.split = Path(data_dir), split
        if not self.path.is_dir():
            raise FileNotFoundError(f"packed data directory not found: {self.path}")
        self.meta = read_data_meta(self.path)
        if self.meta.get("format") != PACKED_FORMAT:
            raise ValueError(f"{self.path / META_FILE}: format {self.meta.get('format')!r}, expected {PACKED_FORMAT!r}")
        if split not in self.meta["splits"]:
            raise ValueError(f"{self.path}: unknown split {split!r}; have {sorted(self.meta['splits'])}")
        info = self.meta["splits"][split]
        self.seq_len = int(self.meta["seq_len"])
        row_len = self.seq_len + 1
        tokens = memmap_array(self.path / info["tokens"], np.dtype(self.meta["dtype"]))
        trained = memmap_array(self.path / info["trained"], np.dtype(np.uint8))
        if tokens.size != trained.size or not tokens.size or tokens.size % row_len:
            raise ValueError(f"{self.path} ({split}): the token and trained-mask files must hold the same "
                             f"non-zero number of {row_len}-token rows, got {tokens.size} and {trained.size} tokens")
        self._tokens, self._trained = tokens.reshape(-1, row_len), trained.reshape(-1, row_len)  # (rows, seq_len + 1)
        self.doc_starts = np.load(self.path / info["documents"], mmap_mode="r")
        if not info.get("trained_tokens"):
            raise ValueError(f"{self.path} ({split}): the split has no trained token")
        self._perms: dict[int, np.ndarray] = {}

    @property
    def num_rows(self) -> int:
        return int(self._tokens.shape[0])

    @property
    def num_tokens(self) -> int:
        """Tokens in this split, padding included (rows x (seq_len + 1))."""
        return int(self._tokens.size)

    @property
    def trained_tokens(self) -> int:
        return int(self.meta["splits"][self.split]["trained_tokens"])

    @property
    def has_documents(self) -> bool:
        return True

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"PackedDataset({str(self.path)!r}, split={self.split!r}, rows={self.num_rows}, seq_len={self.seq_len})"

    def _check_seq_len(self, seq_len: int) -> None:
        if seq_len != self.seq_len:
            raise ValueError(f"seq_len={seq_len} but {self.path} was packed with seq_len={self.seq_len}; "
                             f"train with seq_len={self.seq_len} or re-pack the data")

    def _perm(self, epoch: int, seed: int) -> np.ndarray:
        """The row order of ``epoch`` (a pure function of ``(seed, epoch)``)."""
        key = (seed, epoch)
        if key not in self._perms:
            if len(self._perms) >= _EPOCHS_CACHED:
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = np.random.default_rng([seed, epoch]).permutation(self.num_rows)
        return self._perms[key]

    def read_rows(self, rows: np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Whole rows as numpy: int64 tokens, bool trained mask and int64 seq_idx, each (n, seq_len + 1)."""
        rows = np.asarray(rows, dtype=np.int64)
        row_len = self.seq_len + 1
        return (self._tokens[rows].astype(np.int64), self._trained[rows].astype(bool),
                window_seq_idx(self.doc_starts, rows * row_len, row_len))

    def _rows(self, rows: np.ndarray, documents: bool) -> Batch:
        tokens = self._tokens[rows].astype(np.int64)  # (b, seq_len + 1)
        y = np.where(self._trained[rows, 1:].astype(bool), tokens[:, 1:], IGNORE_INDEX)
        seq_idx = window_seq_idx(self.doc_starts, rows * (self.seq_len + 1), self.seq_len) if documents else None
        return _tensors(tokens[:, :-1], y, seq_idx)

    def get_batch(self, step: int, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
                  documents: bool = True) -> Batch:
        """Rows for ``step``: ``(x, y, seq_idx)`` (``(x, y)`` with ``documents=False``), each (batch_size, seq_len).

        The global batch is the ``batch_size * world_size`` rows at positions
        ``[step * G, (step + 1) * G)`` of the endless row sequence made of one seeded
        permutation per epoch (``np.random.default_rng([seed, epoch])``), so every epoch
        visits each row once; rank ``r`` takes rows ``[r * batch_size, (r + 1) * batch_size)``.
        """
        check_batch_args(batch_size, seq_len, rank, world_size, step, seed)
        self._check_seq_len(seq_len)
        first = step * batch_size * world_size + rank * batch_size
        pos = np.arange(first, first + batch_size)
        epochs, within = np.divmod(pos, self.num_rows)
        rows = np.array([self._perm(int(e), seed)[i] for e, i in zip(epochs, within)], dtype=np.int64)
        return self._rows(rows, documents)

    def iter_eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0,
                          world_size: int = 1, documents: bool = True) -> Iterator[Batch]:
        """Walk the rows in order, in full global batches of ``batch_size * world_size`` rows."""
        check_batch_args(batch_size, seq_len, rank, world_size)
        self._check_seq_len(seq_len)
        global_bs = batch_size * world_size
        n_batches = self.num_rows // global_bs
        if n_batches == 0:
            raise ValueError(f"{self.path} ({self.split}): {self.num_rows} packed rows cannot fill one evaluation "
                             f"batch of {global_bs} rows; lower batch_size")
        if max_batches is not None:
            n_batches = min(n_batches, max_batches)
        for b in range(n_batches):
            first = b * global_bs + rank * batch_size
            yield self._rows(np.arange(first, first + batch_size), documents)


def _tensors(*arrays: np.ndarray | None) -> Batch:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays if a is not None)


def open_dataset(data_dir: PathLike, split: str = "train") -> TokenDataset | PackedDataset:
    """The split of a data directory: a `PackedDataset` for ``hybridlm-packed-v1``, else a `TokenDataset`
    (token shards v1/v2, or a ``.bin`` / ``.npy`` file)."""
    path = Path(data_dir)
    if path.is_dir() and (path / META_FILE).is_file() and read_data_meta(path).get("format") == PACKED_FORMAT:
        return PackedDataset(path, split)
    return TokenDataset(path, split)
