"""Data layer: document reading and its errors, token shards, deterministic batches, entropy."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm.training.corpus import default_corpus_path, iter_documents, read_documents
from hybridlm.training.dataset import TokenDataset, unigram_entropy
from hybridlm.training.shards import prepare_shards, token_dtype
from hybridlm.training.tokenizer import EOS_TOKEN, Tokenizer, default_tokenizer

DOCS = [
    "In the beginning God created the heaven and the earth.\n",
    "And the earth was without form, and void;\r\nand darkness was upon the face of the deep.",
    "  naïve café 🤖 — unicode survives\n\n",
    "short",
    "Let there be light: and there was light. " * 20,
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def _write_corpus(root: Path) -> list[Path]:
    """DOCS spread over a .txt, a .txt.gz and a .jsonl file; returns the files in sorted order."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_bytes(DOCS[0].encode())
    sub = root / "b"
    sub.mkdir()
    (sub / "c.txt.gz").write_bytes(gzip.compress(DOCS[1].encode()))
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[2:])]
    (sub / "d.jsonl").write_text("\n".join(lines[:1] + [""] + lines[1:]) + "\n", encoding="utf-8")
    (root / "ignored.md").write_text("not a corpus file")
    return [root / "a.txt", sub / "c.txt.gz", sub / "d.jsonl"]


# ----------------------------------------------------------------------------- reading


def test_bundled_corpus_is_the_kjv() -> None:
    path = default_corpus_path()
    assert path.name == "kjv.txt.gz" and 1_000_000 < path.stat().st_size < 1_600_000
    (text,) = list(read_documents(path))
    lines = text.splitlines()
    assert len(lines) == 31102
    assert lines[0] == "Genesis 1:1 In the beginning God created the heaven and the earth."
    assert lines[-1] == "Revelation 22:21 The grace of our Lord Jesus Christ be with you all. Amen."


def test_read_each_format_and_directory(tmp_path: Path) -> None:
    files = _write_corpus(tmp_path / "corpus")
    assert list(read_documents(files[0])) == DOCS[:1]
    assert list(read_documents(files[1])) == DOCS[1:2]
    assert list(read_documents(files[2])) == DOCS[2:]
    assert list(read_documents(tmp_path / "corpus")) == DOCS
    assert list(iter_documents([files[2], str(files[0])])) == DOCS[2:] + DOCS[:1]


def test_whitespace_documents_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "  "}\n{"text": "kept"}\n{"text": ""}\n', encoding="utf-8")
    assert list(read_documents(path)) == ["kept"]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents(tmp_path / "missing.txt")  # raised eagerly, before iteration
    with pytest.raises(FileNotFoundError, match="gone"):
        iter_documents([tmp_path / "gone"])


@pytest.mark.parametrize(
    "name, content",
    [("empty.txt", b""), ("blank.txt", b" \n\r\n\t"), ("empty.jsonl", b'\n{"text": "   "}\n'), ("emptydir", None)],
)
def test_empty_corpus(tmp_path: Path, name: str, content: bytes | None) -> None:
    path = tmp_path / name
    if content is None:
        path.mkdir()
        (path / "notes.md").write_text("unsupported files do not count")
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"{name} is empty"):
        list(read_documents(path))


def test_non_utf8_names_file_and_offset(tmp_path: Path) -> None:
    txt = tmp_path / "latin1.txt"
    txt.write_bytes("abc café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt: invalid UTF-8 at byte offset 7"):
        list(read_documents(txt))
    jsonl = tmp_path / "bad.jsonl"
    first = b'{"text": "ok"}\n'
    jsonl.write_bytes(first + b'{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=rf"bad\.jsonl: invalid UTF-8 at byte offset {len(first) + 10}"):
        list(read_documents(jsonl))


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "invalid JSON"),
        ('{"txt": "x"}', "'text' field"),
        ('["a"]', "'text' field"),
        ('{"text": 3}', "'text'"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"docs\.jsonl:3: .*{message}"):
        list(read_documents(path))


def test_corrupt_gzip_names_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.txt.gz"
    path.write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match=r"broken\.txt\.gz: corrupt gzip"):
        list(read_documents(path))
    truncated = tmp_path / "cut.txt.gz"
    truncated.write_bytes(gzip.compress(b"some text " * 100)[:-12])
    with pytest.raises(ValueError, match=r"cut\.txt\.gz: corrupt gzip"):
        list(read_documents(truncated))


def test_unsupported_file_type(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("a,b")
    with pytest.raises(ValueError, match=r"data\.csv: unsupported"):
        read_documents(path)


# ------------------------------------------------------------------------------ shards


def _stream(ds_dir: Path) -> np.ndarray:
    return np.concatenate([TokenDataset(ds_dir, split).tokens() for split in ("train", "val")])


@pytest.mark.parametrize("shard_tokens", [7, 1 << 20])
def test_shards_round_trip(tmp_path: Path, tok: Tokenizer, shard_tokens: int) -> None:
    _write_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    meta = prepare_shards([tmp_path / "corpus"], tok, out, val_fraction=0.1, shard_tokens=shard_tokens, progress=False)
    stream = _stream(out)
    assert tok.decode(stream) == EOS_TOKEN.join(DOCS)
    n_train, n_val = (meta["splits"][s]["num_tokens"] for s in ("train", "val"))
    assert n_val == round(0.1 * stream.size) and n_train + n_val == stream.size
    assert json.loads((out / "meta.json").read_text()) == meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == 4096 and meta["eos_id"] == 0
    assert meta["sources"] == [str(tmp_path / "corpus")]
    for split in ("train", "val"):
        for name in meta["splits"][split]["shards"]:
            assert 0 < (out / name).stat().st_size <= 2 * shard_tokens
    assert Tokenizer.from_file(out / "tokenizer.json").encode("light") == tok.encode("light")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # staging dir removed


def test_reprepare_replaces_stale_shards(tmp_path: Path, tok: Tokenizer) -> None:
    files = _write_corpus(tmp_path / "corpus")
    out = tmp_path / "shards"
    prepare_shards(files, tok, out, val_fraction=0.2, shard_tokens=5, progress=False)
    meta = prepare_shards(files, tok, out, val_fraction=0.2, shard_tokens=1000, progress=False)
    on_disk = sorted(p.name for p in out.glob("*.bin"))
    assert on_disk == sorted(meta["splits"]["train"]["shards"] + meta["splits"]["val"]["shards"])
    assert tok.decode(_stream(out)) == EOS_TOKEN.join(DOCS)


def test_val_split_size_checks(tmp_path: Path, tok: Tokenizer) -> None:
    files = _write_corpus(tmp_path / "corpus")
    with pytest.raises(ValueError, match="min_val_tokens"):
        prepare_shards(files, tok, tmp_path / "o1", val_fraction=0.01, min_val_tokens=1000, progress=False)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_shards(files, tok, tmp_path / "o2", val_fraction=0.0, progress=False)
    one = tmp_path / "one.txt"
    one.write_text("x")
    with pytest.raises(ValueError, match="training split"):
        prepare_shards([one], tok, tmp_path / "o3", progress=False)
    assert not list((tmp_path / "o1").iterdir())  # a refused run leaves nothing behind


def test_tokenizer_without_eos_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    path = tmp_path / "tokenizer.json"
    HFTokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")).save(str(path))
    with pytest.raises(ValueError, match="no EOS"):
        prepare_shards(_write_corpus(tmp_path / "c"), Tokenizer.from_file(path), tmp_path / "o", progress=False)


class _BigVocabTokenizer:
    """Stub with 70000 ids (id = code point + 65536) to exercise the uint32 path."""

    vocab_size = 70_000
    eos_id = 69_999

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [[ord(c) + 65_536 for c in text] for text in texts]

    def save(self, path: Path) -> None:
        Path(path).write_text("{}")


def test_dtype_choice(tmp_path: Path, tok: Tokenizer) -> None:
    assert token_dtype(4096) == np.uint16 and token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint32 and token_dtype(200_000) == np.uint32
    doc = tmp_path / "doc.txt"
    doc.write_text("hello world, " * 20)
    prepare_shards([doc], tok, tmp_path / "small", progress=False)
    assert TokenDataset(tmp_path / "small").tokens().dtype == np.uint16
    meta = prepare_shards([doc], _BigVocabTokenizer(), tmp_path / "big", progress=False)  # type: ignore[arg-type]
    assert meta["dtype"] == "uint32"
    stream = _stream(tmp_path / "big")
    assert stream.dtype == np.uint32 and stream.max() >= 65_536
    assert "".join(chr(i - 65_536) for i in stream) == "hello world, " * 20


# ----------------------------------------------------------------------------- batches


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> tuple[Path, Path]:
    """The same token stream prepared as one shard and as many small shards."""
    root = tmp_path_factory.mktemp("batches")
    docs = root / "docs.jsonl"
    with docs.open("w", encoding="utf-8") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"Document {i}: " + "and it was so. " * (i % 7 + 1)}) + "\n")
    one, many = root / "one", root / "many"
    prepare_shards([docs], tok, one, val_fraction=0.2, progress=False)
    prepare_shards([docs], tok, many, val_fraction=0.2, shard_tokens=97, progress=False)
    return one, many


def test_get_batch_shapes_shift_and_determinism(shard_dirs: tuple[Path, Path]) -> None:
    ds = TokenDataset(shard_dirs[0])
    x, y = ds.get_batch(step=3, batch_size=4, seq_len=16, seed=7)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = torch.from_numpy(ds.tokens().astype(np.int64))
    for row_x, row_y in zip(x, y, strict=True):  # every row is a real window of the split
        starts = [s for s in range(ds.num_tokens - 16) if torch.equal(tokens[s : s + 16], row_x)]
        assert any(torch.equal(tokens[s + 1 : s + 17], row_y) for s in starts)
    again = ds.get_batch(step=3, batch_size=4, seq_len=16, seed=7)
    assert torch.equal(x, again[0]) and torch.equal(y, again[1])
    assert not torch.equal(x, ds.get_batch(step=4, batch_size=4, seq_len=16, seed=7)[0])
    assert not torch.equal(x, ds.get_batch(step=3, batch_size=4, seq_len=16, seed=8)[0])


def test_get_batch_independent_of_sharding(shard_dirs: tuple[Path, Path]) -> None:
    one, many = (TokenDataset(d) for d in shard_dirs)
    assert len(many.meta["splits"]["train"]["shards"]) > 5 and one.num_tokens == many.num_tokens
    for step in range(5):
        a, b = one.get_batch(step, 8, 32, seed=0), many.get_batch(step, 8, 32, seed=0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_batches_concatenate_to_single_process_batch(shard_dirs: tuple[Path, Path], world_size: int) -> None:
    ds = TokenDataset(shard_dirs[1])
    for step in (0, 11):
        full_x, full_y = ds.get_batch(step, 4 * world_size, 24, seed=5)
        parts = [ds.get_batch(step, 4, 24, seed=5, rank=r, world_size=world_size) for r in range(world_size)]
        assert torch.equal(torch.cat([p[0] for p in parts]), full_x)
        assert torch.equal(torch.cat([p[1] for p in parts]), full_y)


def test_batch_argument_errors(shard_dirs: tuple[Path, Path]) -> None:
    ds = TokenDataset(shard_dirs[0], "val")
    with pytest.raises(ValueError, match=r"fewer than seq_len \+ 1"):
        ds.get_batch(0, 1, ds.num_tokens, seed=0)
    ds.get_batch(0, 1, ds.num_tokens - 1, seed=0)  # exactly seq_len + 1 tokens is enough
    with pytest.raises(ValueError, match="rank"):
        ds.get_batch(0, 1, 8, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="unknown split"):
        TokenDataset(shard_dirs[0], "test")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TokenDataset(shard_dirs[0] / "nowhere")


def test_iter_eval_batches_walks_val_in_order(shard_dirs: tuple[Path, Path]) -> None:
    ds = TokenDataset(shard_dirs[1], "val")
    seq_len, bs = 16, 3
    batches = list(ds.iter_eval_batches(bs, seq_len))
    assert len(batches) == ((ds.num_tokens - 1) // seq_len) // bs
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    tokens = torch.from_numpy(ds.tokens().astype(np.int64))
    assert torch.equal(xs, tokens[: xs.numel()]) and torch.equal(ys, tokens[1 : xs.numel() + 1])
    assert len(list(ds.iter_eval_batches(bs, seq_len, max_batches=2))) == 2
    ranked = [list(ds.iter_eval_batches(1, seq_len, rank=r, world_size=bs)) for r in range(bs)]
    single = list(ds.iter_eval_batches(bs, seq_len))
    for b, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranked[r][b][0] for r in range(bs)]), x)
        assert torch.equal(torch.cat([ranked[r][b][1] for r in range(bs)]), y)
    with pytest.raises(ValueError, match="cannot fill one evaluation batch"):
        next(ds.iter_eval_batches(ds.num_tokens, seq_len))


def test_single_file_and_npy_datasets(tmp_path: Path, shard_dirs: tuple[Path, Path]) -> None:
    one = TokenDataset(shard_dirs[0], "val")
    shard = shard_dirs[0] / one.meta["splits"]["val"]["shards"][0]
    assert np.array_equal(TokenDataset(shard).tokens(), one.tokens())
    npy = tmp_path / "tokens.npy"
    np.save(npy, np.arange(100, dtype=np.int32))
    x, y = TokenDataset(npy).get_batch(0, 2, 5, seed=0)
    assert torch.equal(y - x, torch.ones(2, 5, dtype=torch.int64))


# ----------------------------------------------------------------------------- entropy


def test_unigram_entropy_by_hand(tmp_path: Path) -> None:
    tokens = np.array([3, 3, 1, 7, 3, 1, 3, 3], dtype=np.uint16)  # p = 5/8, 2/8, 1/8
    expected = -(5 / 8 * math.log(5 / 8) + 2 / 8 * math.log(2 / 8) + 1 / 8 * math.log(1 / 8))
    assert unigram_entropy(tokens) == pytest.approx(expected, rel=1e-12)
    np.save(tmp_path / "t.npy", tokens)
    assert unigram_entropy(TokenDataset(tmp_path / "t.npy")) == pytest.approx(expected, rel=1e-12)
    assert unigram_entropy(np.zeros(10, dtype=np.int64)) == 0.0
    assert unigram_entropy(np.arange(16)) == pytest.approx(math.log(16))


def test_check_vocab_refuses_a_model_with_fewer_tokens(small_shards):
    ds = TokenDataset(small_shards, "train")
    ds.check_vocab(4096)  # the bundled tokenizer's size: fine
    with pytest.raises(ValueError, match="4096-token vocabulary but the model has vocab_size=97"):
        ds.check_vocab(97)
