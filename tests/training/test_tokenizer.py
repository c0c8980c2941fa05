"""Tokenizer: exact byte-level round trips, training, foreign tokenizer.json files, errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from hybridlm.training.corpus import default_corpus_path
from hybridlm.training.tokenizer import EOS_TOKEN, Tokenizer, default_tokenizer, train_tokenizer

TRICKY = [
    "",
    " ",
    "  leading spaces",
    "trailing spaces   ",
    "\n",
    "line one\nline two\n\n\nafter blank lines\n",
    "windows\r\nline endings\r\n",
    "\ttabs\tand\x0bvertical\x0cfeeds",
    "naïve café, Straße, Ωμέγα, русский, 日本語のテキスト, 한국어",
    "emoji 🤖👩‍👩‍👧 flags 🇫🇷 and combining e\u0301",
    "zero\u200bwidth and nbsp\u00a0here",
    f"special {EOS_TOKEN} inside text{EOS_TOKEN}",
    "\x00 nul and \x7f del",
    "1234567890 3.14159 -42 1e-9",
    "'s 't 're 've 'm 'll 'd   contractions",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def test_default_tokenizer_shape(tok: Tokenizer) -> None:
    assert tok.vocab_size == 4096
    assert tok.eos_id == 0
    assert tok.id_to_token(0) == EOS_TOKEN
    assert tok.encode(EOS_TOKEN) == [0]


def test_round_trip_whole_bundled_corpus(tok: Tokenizer) -> None:
    text = gzip.decompress(default_corpus_path().read_bytes()).decode("utf-8")
    ids = tok.encode(text)
    assert len(text.encode("utf-8")) / len(ids) > 3.0  # it is a real compressor
    assert max(ids) < tok.vocab_size
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_tricky_strings(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


def test_encode_batch_matches_encode(tok: Tokenizer) -> None:
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_decode_accepts_arrays_and_tensors(tok: Tokenizer) -> None:
    ids = tok.encode("In the beginning God created the heaven and the earth.")
    assert tok.decode(np.asarray(ids, dtype=np.uint16)) == tok.decode(torch.tensor(ids)) == tok.decode(ids)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_train_save_load(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "a.txt", "the cat sat on the mat.\nthe dog sat on the log.\n" * 50)
    out = tmp_path / "tok" / "tokenizer.json"
    trained = train_tokenizer([corpus], vocab_size=300, out=out, show_progress=False)
    assert trained.eos_id == 0 and 257 < trained.vocab_size <= 300
    loaded = Tokenizer.from_file(out)
    text = "the cat sat on the log 🐈\n"
    assert loaded.encode(text) == trained.encode(text)
    assert loaded.decode(loaded.encode(text)) == text
    assert len(loaded.encode("the cat sat on the mat.")) < len("the cat sat on the mat.")
    assert Tokenizer.from_file(out.parent).eos_id == 0  # a directory holding tokenizer.json


def test_train_is_deterministic(tmp_path: Path) -> None:
    corpus = _write(tmp_path / "a.txt", "abracadabra alakazam " * 40)
    a = train_tokenizer(corpus, vocab_size=280, out=tmp_path / "a.json", show_progress=False)
    b = train_tokenizer(corpus, vocab_size=280, out=tmp_path / "b.json", show_progress=False)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert a.encode("abracadabra") == b.encode("abracadabra")


def test_train_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        train_tokenizer([missing], show_progress=False)
    empty = _write(tmp_path / "empty.txt", " \n\t\n")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        train_tokenizer([empty], show_progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([_write(tmp_path / "ok.txt", "text")], vocab_size=100, show_progress=False)


def _word_level(tmp_path: Path, vocab: dict[str, int]) -> Path:
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "foreign" / "tokenizer.json"
    path.parent.mkdir()
    hf.save(str(path))
    return path


def test_foreign_tokenizer_json(tmp_path: Path) -> None:
    path = _word_level(tmp_path, {"[UNK]": 0, "hello": 1, "world": 2, "</s>": 3})
    tok = Tokenizer.from_file(path)
    assert tok.vocab_size == 4
    assert tok.eos_id == 3 and tok.eos_token == "</s>"
    assert tok.encode("hello world xyz") == [1, 2, 0]
    assert tok.encode_batch(["world", "hello"]) == [[2], [1]]
    assert tok.decode([1, 2]) == "hello world"
    resaved = tok.save(tmp_path / "copy.json")
    assert Tokenizer.from_file(resaved).encode("hello") == [1]


def test_foreign_eos_from_config_or_absent(tmp_path: Path) -> None:
    path = _word_level(tmp_path, {"[UNK]": 0, "hi": 1, "<end>": 2})
    assert Tokenizer.from_file(path).eos_id is None
    (path.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))
    assert Tokenizer.from_file(path).eos_id == 2
    assert Tokenizer.from_file(path, eos_token="hi").eos_id == 1
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.from_file(path, eos_token="<missing>")


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.json"):
        Tokenizer.from_file(tmp_path / "absent.json")
    garbage = _write(tmp_path / "garbage.json", "{not json")
    with pytest.raises(ValueError, match="garbage.json is not a valid tokenizer.json"):
        Tokenizer.from_file(garbage)
    other = _write(tmp_path / "other.json", json.dumps({"hello": "world"}))
    with pytest.raises(ValueError, match="other.json is not a valid tokenizer.json"):
        Tokenizer.from_file(other)
