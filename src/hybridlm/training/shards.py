"""Token shards: tokenize a corpus into raw memory-mappable token files plus ``meta.json``.

:func:`prepare_shards` writes ``train_00000.bin``, ..., ``val_00000.bin``, the document
starts ``train_docs.npy`` / ``val_docs.npy``, ``meta.json`` and a copy of the tokenizer.
Documents (`hybridlm.training.corpus`) are separated by the tokenizer's EOS token; the
validation split is the last ``val_fraction`` of the token stream (held out, contiguous,
deterministic). `hybridlm.training.dataset.TokenDataset` reads them back.

Format ``hybridlm-tokens-v2`` (``meta.json``'s ``format``): ``{split}_docs.npy`` is a 1-D
int64 array of the offsets, into that split's token stream, where a document starts
(ascending; 0 is always one; the val split starts a document at 0 even when the cut
falls inside one). The EOS that ends a document belongs to that document, so its
next-token target is the following document's first token (the target is kept, as
Megatron-LM does by default). ``hybridlm-tokens-v1`` directories (no document files)
are still read, as one token stream.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from .corpus import PathLike, iter_documents

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

META_FILE = "meta.json"
META_FORMAT = "hybridlm-tokens-v2"
META_FORMAT_V1 = "hybridlm-tokens-v1"  # no document starts: read as one stream
TOKEN_FORMATS = (META_FORMAT_V1, META_FORMAT)
DOCS_SUFFIX = "_docs.npy"  # {split}_docs.npy: int64 document start offsets
# Tokenizer files a data directory may hold; training copies them into its exported model.
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 1 << 27  # 128 Mi tokens = 256 MiB per uint16 shard
_ENCODE_BATCH_CHARS = 1 << 20  # tokenize documents in batches of about this many chars
_ENCODE_BATCH_DOCS = 1024
COPY_CHUNK = 1 << 24  # tokens per chunk when copying / counting shards


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
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(tokens, starts)`` per document batch: the stream is ``doc0 EOS doc1 EOS ... docN``.

    ``starts`` (int64) are the stream offsets where the batch's documents start; each EOS
    is the last token of the document before it.
    """
    eos = np.array([eos_id], dtype=dtype)
    first, total = True, 0
    with tqdm(desc="tokenizing", unit="doc", disable=not progress) as bar:
        for batch in _document_batches(docs):
            pieces: list[np.ndarray] = []
            starts: list[int] = []
            pos = total
            for ids in tokenizer.encode_batch(batch):
                if not first:
                    pieces.append(eos)
                    pos += 1
                starts.append(pos)
                pieces.append(np.asarray(ids, dtype=dtype))
                pos += len(ids)
                first = False
            arr = np.concatenate(pieces)
            total += arr.size
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{total:,}")
            yield arr, np.asarray(starts, dtype=np.int64)


def split_doc_starts(starts: np.ndarray, n_train: int, n_total: int) -> dict[str, np.ndarray]:
    """Document starts of the train stream ``[0, n_train)`` and the val stream ``[n_train, n_total)``.

    ``starts`` are ascending offsets into the whole stream; starts at or past the end of
    the stream (documents that tokenized to nothing) are dropped, and each split starts
    a document at its offset 0.
    """
    starts = np.unique(starts[starts < n_total])
    train = starts[starts < n_train]
    val = starts[starts > n_train] - n_train
    return {"train": np.concatenate([[0], train[train > 0]]).astype(np.int64),
            "val": np.concatenate([[0], val]).astype(np.int64)}


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
        for offset in range(start, train.sizes[i], COPY_CHUNK):
            count = min(COPY_CHUNK, train.sizes[i] - offset)
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
        for stale in [*out_dir.glob(f"{split}_*.bin"), out_dir / f"{split}{DOCS_SUFFIX}"]:
            stale.unlink(missing_ok=True)
    for split, writer in writers.items():
        for shard in writer.shards:
            shard.replace(out_dir / shard.name)
        (writer.directory / f"{split}{DOCS_SUFFIX}").replace(out_dir / f"{split}{DOCS_SUFFIX}")


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

    Documents (see :mod:`hybridlm.training.corpus`) are concatenated with the tokenizer's
    EOS id between them. The last ``val_fraction`` of the token stream (at least one token,
    and at least ``min_val_tokens``) becomes the ``val`` split, the rest ``train``; so
    decoding train followed by val gives back ``EOS.join(documents)``. Token files are raw
    little-endian arrays of ``token_dtype(tokenizer.vocab_size)`` holding at most
    ``shard_tokens`` tokens each; ``{split}_docs.npy`` holds the split's document starts
    (module docstring). ``meta.json`` (returned as a dict) records the format, dtype,
    shard names, token and document counts, tokenizer vocab size / EOS id and the
    sources; the tokenizer itself is saved as ``tokenizer.json`` next to them.
    Tokenization streams: one batch of documents (and the int64 document starts) is held
    in memory at a time.
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
    starts: list[np.ndarray] = []
    try:
        for arr, doc_starts in _tokenize_stream(iter_documents(inputs), tokenizer, tokenizer.eos_id, dtype, progress):
            writers["train"].write(arr)
            starts.append(doc_starts)
        writers["train"].close()
        total = writers["train"].num_tokens
        n_val = _val_size(total, val_fraction, min_val_tokens)
        _move_tail(writers["train"], writers["val"], n_val)
        writers["val"].close()
        docs = split_doc_starts(np.concatenate(starts), total - n_val, total)
        for split, doc_starts in docs.items():
            np.save(staging / f"{split}{DOCS_SUFFIX}", doc_starts)
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
            split: {"num_tokens": w.num_tokens, "shards": [p.name for p in w.shards],
                    "num_documents": int(docs[split].size), "documents": f"{split}{DOCS_SUFFIX}"}
            for split, w in writers.items()
        },
    }
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
