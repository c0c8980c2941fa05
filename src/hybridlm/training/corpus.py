"""Reading a text corpus: documents out of ``.txt``, ``.txt.gz``, ``.jsonl`` (``.jsonl.gz``) files or directories.

What a document is (``hybridlm data prepare`` records where each one starts, and training
resets the Mamba state and masks attention at those boundaries):

* ``.jsonl`` / ``.jsonl.gz``: one document per record, its ``text`` field verbatim
  (blank lines inside a ``text`` do not split it). Blank lines between records are skipped.
* ``.txt`` / ``.txt.gz``: one document per blank-line-separated block. A line ends at
  ``\n`` (so ``\r\n`` files work); a line that is empty or holds only whitespace is a
  separator, and one or more of them in a row end the current document. Separator lines
  are dropped; the lines of a block are kept verbatim, each with its line ending, so a
  document ends with ``\n`` unless it is the end of the file. A file with no blank line
  is one document (its text verbatim); one that is all prose paragraphs is one document
  per paragraph.
* a directory: every such file below it, recursively, in sorted path order; documents
  never span two files.

Whitespace-only documents are skipped everywhere.

* :func:`read_documents` / :func:`iter_documents` stream documents with strict UTF-8
  decoding and errors that name the offending file (and line / byte offset).
* :func:`default_corpus_path` is the bundled King James Bible (``assets/kjv.txt.gz``,
  one verse per line and no blank line: a single document).
"""

from __future__ import annotations

import gzip
import io
import itertools
import json
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

PathLike = str | Path

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"
TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES


def default_corpus_path() -> Path:
    """Path of the bundled corpus: the King James Bible, one verse per line, gzipped."""
    return ASSETS_DIR / "kjv.txt.gz"


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
    """The blank-line-separated blocks of a ``.txt`` / ``.txt.gz`` file, lines kept verbatim.

    Lines are split at ``\n`` bytes, which never occur inside a multi-byte UTF-8 character,
    so each line decodes on its own (the file streams).
    """
    offset = 0
    block: list[str] = []
    with _open_binary(path) as f:
        for raw in f:
            line = _decode_utf8(raw, path, offset)
            offset += len(raw)
            if line.strip():
                block.append(line)
            elif block:
                yield "".join(block)
                block = []
    if block:
        yield "".join(block)


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

    ``path`` may be a ``.txt`` / ``.txt.gz`` file (one document per blank-line-separated
    block), a ``.jsonl`` / ``.jsonl.gz`` file (one document per record, its ``text`` field)
    or a directory (all such files below it, recursively, in sorted order); the module
    docstring defines documents exactly. Whitespace-only documents are skipped. Raises FileNotFoundError for a missing path (immediately) and, while
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
