"""Packed SFT data: packing keeps every sample whole, the masked loss, epochs, training on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hybridlm.config import HybridConfig
from hybridlm.model import HybridLM
from hybridlm.training.dataset import TokenDataset
from hybridlm.training.loop import train
from hybridlm.training.packing import PACKED_FORMAT, PackedDataset, open_dataset, write_packed_dataset
from hybridlm.interop.tokenizer_files import TOKENIZER_FILES
from hybridlm.training.tokenizer import Tokenizer, default_tokenizer

from helpers import small_model
from test_loop import _losses, _tc

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ_LEN = 31  # rows of 32 tokens


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return default_tokenizer()


def _samples(n: int, seed: int, vocab: int = 97, max_len: int = 45) -> list[tuple[list[int], list[bool]]]:
    """Random conversations: ids in [1, vocab) (never the EOS id 0), a random trained mask; some longer than a row."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, max_len))
        out.append((rng.integers(1, vocab, length).tolist(), (rng.random(length) < 0.6).tolist()))
    return out


def _expected(sample: tuple[list[int], list[bool]]) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """A sample as packing keeps it: truncated to a row, the first token never trained."""
    ids, mask = sample[0][: SEQ_LEN + 1], list(sample[1][: SEQ_LEN + 1])
    mask[0] = False
    return tuple(ids), tuple(mask)


def _unpack(ds: PackedDataset) -> list[list[tuple[tuple[int, ...], tuple[bool, ...]]]]:
    """Per row, its documents (tokens, trained) in order, split by seq_idx."""
    tokens, trained, seq_idx = ds.read_rows(np.arange(ds.num_rows))
    rows = []
    for t, m, s in zip(tokens, trained, seq_idx, strict=True):
        rows.append([(tuple(t[s == d].tolist()), tuple(m[s == d].tolist())) for d in range(int(s[-1]) + 1)])
    return rows


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> tuple[Path, list, dict]:
    out = tmp_path_factory.mktemp("packed")
    samples = _samples(120, seed=0)
    meta = write_packed_dataset(samples, tok, out, SEQ_LEN, val_fraction=0.2, seed=1, progress=False)
    return out, samples, meta


def test_packing_keeps_every_sample_whole(packed: tuple[Path, list, dict]) -> None:
    out, samples, meta = packed
    assert meta == json.loads((out / "meta.json").read_text()) and meta["format"] == PACKED_FORMAT
    found: dict[str, list] = {}
    for split in ("train", "val"):
        ds = PackedDataset(out, split)
        kept, used = [], []
        for row in _unpack(ds):
            for j, (ids, mask) in enumerate(row):
                if set(ids) == {ds.eos_id}:  # padding: the last document of its row, nothing trained
                    assert j == len(row) - 1 and not any(mask)
                else:
                    kept.append((ids, mask))
            used.append(sum(len(ids) for ids, _ in row if set(ids) != {ds.eos_id}))
            assert len(row[0][0]) <= SEQ_LEN + 1
        # greedy: a row is closed only when the next sample does not fit in it
        assert all(u + len(row[0][0]) > SEQ_LEN + 1 for u, row in zip(used, _unpack(ds)[1:]))
        assert ds.num_rows == meta["splits"][split]["rows"] and len(kept) == meta["splits"][split]["samples"]
        assert ds.trained_tokens == meta["splits"][split]["trained_tokens"] == sum(sum(m) for _, m in kept)
        found[split] = kept
    expected = [_expected(s) for s in samples]
    # every sample is one whole document of one row (no sample crosses rows), in exactly one split
    assert sorted(found["train"] + found["val"]) == sorted(expected)
    assert not set(found["train"]) & set(found["val"]) and len(found["val"]) == meta["splits"]["val"]["samples"] == 24
    assert meta["truncated"] == sum(len(ids) > SEQ_LEN + 1 for ids, _ in samples) > 0
    assert meta["samples"] == 120 and meta["rows"] == sum(meta["splits"][s]["rows"] for s in ("train", "val"))


def test_batch_targets_are_masked(packed: tuple[Path, list, dict]) -> None:
    ds = PackedDataset(packed[0], "train")
    x, y, seq_idx = ds.get_batch(3, 4, SEQ_LEN, seed=0)
    assert x.shape == y.shape == seq_idx.shape == (4, SEQ_LEN)
    tokens, trained, full_seq_idx = ds.read_rows(np.arange(ds.num_rows))
    for r in range(4):
        (i,) = [i for i in range(ds.num_rows) if torch.equal(torch.from_numpy(tokens[i, :-1]), x[r])]
        target = np.where(trained[i, 1:], tokens[i, 1:], -100)
        assert torch.equal(y[r], torch.from_numpy(target)) and torch.equal(seq_idx[r], torch.from_numpy(full_seq_idx[i, :-1]))
    assert torch.equal(ds.get_batch(3, 4, SEQ_LEN, seed=0, documents=False)[1], y)


def test_packed_loss_equals_the_samples_run_alone(tmp_path: Path, tok: Tokenizer) -> None:
    write_packed_dataset(_samples(30, seed=2, max_len=20), tok, tmp_path, SEQ_LEN, val_fraction=0.1, progress=False)
    ds = PackedDataset(tmp_path, "train")
    model = small_model(seed=0).double()  # vocab 97
    x, y, seq_idx = ds.get_batch(0, 4, SEQ_LEN, seed=0)
    assert (seq_idx[:, -1] > 0).all()  # several documents per row
    tokens, trained, full_seq_idx = ds.read_rows(np.arange(ds.num_rows))
    rows = [i for r in range(4) for i in range(ds.num_rows) if torch.equal(torch.from_numpy(tokens[i, :-1]), x[r])]
    total, count = 0.0, 0
    for i in rows:
        for d in range(int(full_seq_idx[i, -1]) + 1):
            ids = torch.from_numpy(tokens[i][full_seq_idx[i] == d])[None]
            mask = torch.from_numpy(trained[i][full_seq_idx[i] == d])
            if ids.shape[1] < 2 or not mask[1:].any():
                continue
            with torch.no_grad():
                logits = model(ids)[0, :-1].double()  # (n - 1, vocab), float64
            ce = F.cross_entropy(logits, ids[0, 1:], reduction="none")
            total += float(ce[mask[1:]].sum())
            count += int(mask[1:].sum())
    with torch.no_grad():
        loss = model.loss(x, y, seq_idx).item()
    assert count == int((y != -100).sum())
    assert loss == pytest.approx(total / count, rel=1e-6, abs=0)  # model.loss reduces in float32
    assert not math.isclose(model.loss(x, y).item(), loss, rel_tol=1e-4)  # without seq_idx documents mix


def test_epochs_visit_every_row_once(packed: tuple[Path, list, dict]) -> None:
    ds = PackedDataset(packed[0], "train")
    tokens = ds.read_rows(np.arange(ds.num_rows))[0]
    index = {tuple(t[:-1].tolist()): i for i, t in enumerate(tokens)}
    assert len(index) == ds.num_rows
    world, bs = 3, 2  # a global batch of 6 rows; the row count is not a multiple of it
    assert ds.num_rows % (world * bs)
    order = []
    for step in range(math.ceil(2 * ds.num_rows / (world * bs))):
        parts = [ds.get_batch(step, bs, SEQ_LEN, seed=4, rank=r, world_size=world)[0] for r in range(world)]
        assert torch.equal(torch.cat(parts), ds.get_batch(step, bs * world, SEQ_LEN, seed=4)[0])
        order += [index[tuple(row.tolist())] for row in torch.cat(parts)]
    first, second = order[: ds.num_rows], order[ds.num_rows : 2 * ds.num_rows]
    assert sorted(first) == sorted(second) == list(range(ds.num_rows)) and first != second
    again = PackedDataset(packed[0], "train").get_batch(7, bs, SEQ_LEN, seed=4, rank=1, world_size=world)
    assert all(torch.equal(a, b) for a, b in zip(again, ds.get_batch(7, bs, SEQ_LEN, seed=4, rank=1, world_size=world)))
    val = PackedDataset(packed[0], "val")
    walked = torch.cat([x for x, _, _ in val.iter_eval_batches(1, SEQ_LEN)])
    assert torch.equal(walked, torch.from_numpy(val.read_rows(np.arange(val.num_rows))[0][:, :-1]))


def test_bad_inputs(packed: tuple[Path, list, dict], tmp_path: Path, tok: Tokenizer) -> None:
    ds = PackedDataset(packed[0], "train")
    with pytest.raises(ValueError, match=rf"seq_len=64 but .* packed with seq_len={SEQ_LEN}"):
        ds.get_batch(0, 2, 64, seed=0)
    with pytest.raises(ValueError, match=rf"seq_len=8 but .* packed with seq_len={SEQ_LEN}"):
        next(ds.iter_eval_batches(2, 8))
    assert isinstance(open_dataset(packed[0], "val"), PackedDataset)
    with pytest.raises(ValueError, match="open_dataset"):
        TokenDataset(packed[0], "train")
    untrained = [(ids, [False] * len(ids)) for ids, _ in _samples(10, seed=5)]
    with pytest.raises(ValueError, match="no trained token"):
        write_packed_dataset(untrained, tok, tmp_path / "u", SEQ_LEN, progress=False)
    with pytest.raises(ValueError, match="sample 1: .*same length"):
        write_packed_dataset([([1, 2], [True, True]), ([1, 2], [True])], tok, tmp_path / "m", SEQ_LEN, progress=False)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in packed[0].iterdir():
        copy.joinpath(f.name).write_bytes(f.read_bytes())
    meta = json.loads((copy / "meta.json").read_text())
    meta["splits"]["val"]["trained_tokens"] = 0
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"\(val\): the split has no trained token"):
        PackedDataset(copy, "val")


def test_train_on_packed_data(tmp_path: Path, tok: Tokenizer, tiny_model_file: str) -> None:
    data = tmp_path / "data"
    write_packed_dataset(_samples(80, seed=6, vocab=4096), tok, data, SEQ_LEN, val_fraction=0.1, progress=False)
    (data / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    (data / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    run = tmp_path / "run"
    summary = train(_tc(tiny_model_file, data, run, steps=2, batch_size=4, seq_len=SEQ_LEN, save_every=0,
                        eval_batches=1))
    assert summary["step"] == 2 and math.isfinite(summary["val_loss"])
    model = HybridLM(HybridConfig.load(tiny_model_file))
    model.init_weights(0)
    x, y, seq_idx = PackedDataset(data, "train").get_batch(0, 4, SEQ_LEN, seed=0)
    with torch.no_grad():
        assert model.train().loss(x, y, seq_idx).item() == _losses(run)[1]
    copied = sorted(p.name for p in (run / "final").iterdir() if p.name in TOKENIZER_FILES)
    assert copied == sorted(["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"])
    assert (run / "final" / "chat_template.jinja").read_text() == (data / "chat_template.jinja").read_text()
