"""Document boundaries: blank-line documents, the starts `data prepare` records, seq_idx windows, training with them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.training.corpus import read_documents
from hybridlm.training.dataset import TokenDataset, window_seq_idx
from hybridlm.training.distributed import DistEnv
from hybridlm.training.loop import evaluate, train
from hybridlm.training.packing import open_dataset
from hybridlm.training.shards import META_FORMAT, prepare_shards
from hybridlm.training.tokenizer import EOS_TOKEN, Tokenizer, default_tokenizer

from test_loop import _losses, _tc

pytestmark = pytest.mark.usefixtures("one_thread")

TXT = "  \n\nFirst para, line one\nline two\n\n \t \r\nSecond para\r\n\r\n\n\nThird, no final newline"
TXT_DOCS = ["First para, line one\nline two\n", "Second para\r\n", "Third, no final newline"]
JSONL_DOCS = ["a record\n\nwith a blank line stays one document", "second record", "  third  "]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def _corpus(root: Path) -> list[str]:
    """A directory of blank-line .txt, .txt.gz (no blank line: one document) and .jsonl; its documents in order."""
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(TXT, encoding="utf-8", newline="")
    gz_doc = "one document\nover two lines\n"
    (root / "sub" / "b.txt.gz").write_bytes(gzip.compress(gz_doc.encode()))
    (root / "sub" / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in JSONL_DOCS))
    return TXT_DOCS + [gz_doc] + JSONL_DOCS


def _pieces(ds: TokenDataset) -> list[np.ndarray]:
    """The split's tokens cut at its recorded document starts."""
    bounds = list(ds.doc_starts) + [ds.num_tokens]
    return [ds.tokens(int(a), int(b)) for a, b in zip(bounds, bounds[1:])]


# ----------------------------------------------------------------------------- reading


def test_txt_blank_lines_separate_documents(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(TXT, encoding="utf-8", newline="")
    assert list(read_documents(path)) == TXT_DOCS
    gz = tmp_path / "t.txt.gz"
    gz.write_bytes(gzip.compress(TXT.encode()))
    assert list(read_documents(gz)) == TXT_DOCS
    single = tmp_path / "s.txt"
    single.write_text("no blank line\r\nhere\n", encoding="utf-8", newline="")
    assert list(read_documents(single)) == ["no blank line\r\nhere\n"]
    jsonl = tmp_path / "j.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n\n" for d in JSONL_DOCS))
    assert list(read_documents(jsonl)) == JSONL_DOCS


# ----------------------------------------------------------------------------- shards


@pytest.mark.parametrize("shard_tokens", [5, 1 << 20])
def test_recorded_starts_decode_to_the_documents(tmp_path: Path, tok: Tokenizer, shard_tokens: int) -> None:
    docs = _corpus(tmp_path / "corpus")
    meta = prepare_shards(tmp_path / "corpus", tok, tmp_path / "out", val_fraction=0.3, shard_tokens=shard_tokens,
                          progress=False)
    assert meta["format"] == META_FORMAT == "hybridlm-tokens-v2"
    train, val = (TokenDataset(tmp_path / "out", s) for s in ("train", "val"))
    assert train.doc_starts[0] == 0 and val.doc_starts[0] == 0 and train.has_documents and val.has_documents
    assert [meta["splits"][s]["num_documents"] for s in ("train", "val")] == [train.num_documents, val.num_documents]
    pieces_train, pieces_val = _pieces(train), _pieces(val)
    # the cut falls inside a document: its train tail and val head join into one document
    whole = [tok.encode(d) for d in docs]
    n_train = train.num_tokens
    cut_inside = n_train not in np.cumsum([len(w) + 1 for w in whole])
    assert cut_inside, "pick val_fraction so that the train/val cut splits a document"
    joined = pieces_train[:-1] + [np.concatenate([pieces_train[-1], pieces_val[0]])] + pieces_val[1:]
    decoded = [tok.decode(p) for p in joined]
    assert decoded == [d + EOS_TOKEN for d in docs[:-1]] + [docs[-1]]  # the EOS ends (belongs to) its document
    assert train.num_documents + val.num_documents == len(docs) + 1


def test_seq_idx_by_hand() -> None:
    starts = np.array([0, 3, 7], dtype=np.int64)  # documents [0, 3), [3, 7), [7, ...)
    got = window_seq_idx(starts, np.array([0, 2, 3, 6]), 4)
    assert got.tolist() == [[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 1]]
    assert window_seq_idx(None, np.array([5]), 3).tolist() == [[0, 0, 0]]


@pytest.fixture(scope="module")
def doc_shards(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> tuple[Path, Path]:
    """Short JSONL documents, prepared as one shard and as many small shards."""
    root = tmp_path_factory.mktemp("docs")
    with (root / "docs.jsonl").open("w", encoding="utf-8") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"Document {i}: " + "and it was so. " * (i % 5 + 1)}) + "\n")
    one, many = root / "one", root / "many"
    prepare_shards(root / "docs.jsonl", tok, one, val_fraction=0.2, progress=False)
    prepare_shards(root / "docs.jsonl", tok, many, val_fraction=0.2, shard_tokens=97, progress=False)
    return one, many


def _check_seq_idx(x: torch.Tensor, seq_idx: torch.Tensor, eos_id: int) -> None:
    """seq_idx starts at 0 in every row and steps by one exactly after each EOS (the last token of a document)."""
    assert seq_idx.dtype == torch.int64 and seq_idx.shape == x.shape
    assert (seq_idx[:, 0] == 0).all()
    assert torch.equal(seq_idx.diff(dim=1), (x[:, :-1] == eos_id).long())


def test_seq_idx_windows(doc_shards: tuple[Path, Path]) -> None:
    one, many = (TokenDataset(d) for d in doc_shards)
    for step in range(4):
        x, y = one.get_batch(step, 8, 32, seed=3)
        x1, y1, s1 = one.get_batch(step, 8, 32, seed=3, documents=True)
        x2, y2, s2 = many.get_batch(step, 8, 32, seed=3, documents=True)
        assert torch.equal(x, x1) and torch.equal(y, y1) and torch.equal(x, x2) and torch.equal(y, y2)
        assert torch.equal(s1, s2)
        _check_seq_idx(x1, s1, one.eos_id)
        assert (s1[:, -1] > 0).any()  # these windows do cross documents
    ranks = [one.get_batch(2, 2, 32, seed=3, rank=r, world_size=4, documents=True)[2] for r in range(4)]
    assert torch.equal(torch.cat(ranks), one.get_batch(2, 8, 32, seed=3, documents=True)[2])
    val = TokenDataset(doc_shards[1], "val")
    plain = list(val.iter_eval_batches(3, 16, max_batches=4))
    for (x, y), (xd, yd, sd) in zip(plain, val.iter_eval_batches(3, 16, max_batches=4, documents=True), strict=True):
        assert torch.equal(x, xd) and torch.equal(y, yd)
        _check_seq_idx(xd, sd, val.eos_id)


def test_v1_data_is_read_as_one_stream(tmp_path: Path, doc_shards: tuple[Path, Path]) -> None:
    v1 = tmp_path / "v1"
    v1.mkdir()
    meta = json.loads((doc_shards[0] / "meta.json").read_text())
    meta["format"] = "hybridlm-tokens-v1"
    for split in meta["splits"].values():
        del split["num_documents"], split["documents"]
        for name in split["shards"]:
            (v1 / name).write_bytes((doc_shards[0] / name).read_bytes())
    (v1 / "meta.json").write_text(json.dumps(meta))
    old, new = open_dataset(v1, "train"), TokenDataset(doc_shards[0], "train")
    assert isinstance(old, TokenDataset) and not old.has_documents and old.num_documents == 1
    assert np.array_equal(old.tokens(), new.tokens())
    x, y, seq_idx = old.get_batch(1, 4, 32, seed=0, documents=True)
    assert torch.equal(x, new.get_batch(1, 4, 32, seed=0)[0]) and not seq_idx.any()


# ------------------------------------------------------------------------------ training


def _model(model_file: str, seed: int) -> HybridLM:
    model = HybridLM(HybridConfig.load(model_file))
    model.init_weights(seed)
    return model


@pytest.mark.slow  # two short runs; the first train() of a process also pays the imports
def test_training_uses_the_boundaries(doc_shards: tuple[Path, Path], tiny_model_file: str, tmp_path: Path) -> None:
    data = doc_shards[0]
    kw = dict(steps=3, save_every=0, eval_batches=1, eval_every=0)
    on = train(_tc(tiny_model_file, data, tmp_path / "on", **kw))
    off = train(_tc(tiny_model_file, data, tmp_path / "off", documents=False, **kw))
    l_on, l_off = _losses(tmp_path / "on"), _losses(tmp_path / "off")
    assert list(l_on) == list(l_off) == [1, 2, 3] and all(l_on[s] != l_off[s] for s in l_on)
    assert on["val_loss"] != off["val_loss"]
    # step 1's loss is the initial model's loss on batch 0, with and without seq_idx
    model = _model(tiny_model_file, seed=0).train()
    x, y, seq_idx = TokenDataset(data).get_batch(0, 4, 32, seed=0, documents=True)
    assert (seq_idx[:, -1] > 0).any()
    with torch.no_grad():
        assert model.loss(x, y, seq_idx).item() == l_on[1]
        assert model.loss(x, y).item() == l_off[1]
    val0_on = _losses(tmp_path / "on", "val", "val_loss")[0]
    val = TokenDataset(data, "val")
    x, y, seq_idx = next(val.iter_eval_batches(4, 32, documents=True))
    with torch.no_grad():
        assert model.eval().loss(x, y, seq_idx).item() == val0_on
    assert evaluate(model, val, 4, 32, 1, DistEnv.single()) == val0_on


def test_resume_with_documents_is_bit_exact(doc_shards: tuple[Path, Path], tiny_model_file: str,
                                            tmp_path: Path) -> None:
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    kw = dict(steps=4, save_every=2, eval_every=2, eval_batches=1)
    a = train(_tc(tiny_model_file, doc_shards[1], straight, **kw))
    train(_tc(tiny_model_file, doc_shards[1], parts, stop_at=2, **kw))
    b = train(_tc(tiny_model_file, doc_shards[1], parts, resume=True, **kw))
    assert _losses(straight) == _losses(parts) and b["train_loss"] == a["train_loss"]
    assert _losses(straight, "val", "val_loss") == _losses(parts, "val", "val_loss")
