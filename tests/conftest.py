"""Shared fixtures: a small token-shard directory cut from the bundled corpus, a tiny model config file,
one intra-op thread, exact (non-TF32) CUDA matmuls. Without CUDA, Triton kernels run in
Triton's interpreter (it must be on before triton is first imported)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hybridlm.training.corpus import default_corpus_path, read_documents
from hybridlm.training.shards import prepare_shards
from hybridlm.training.tokenizer import default_tokenizer

from helpers import TINY_MODEL

SMALL_CORPUS_CHARS = 200_000  # ~50k tokens: the first books of Genesis


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prepared train/val shards (val = last 10%) of the first 200k characters of the KJV.

    Session-scoped and shared: treat it as read-only.
    """
    root = tmp_path_factory.mktemp("small_shards")
    (text,) = read_documents(default_corpus_path())
    corpus = root / "corpus.txt"
    corpus.write_text(text[:SMALL_CORPUS_CHARS], encoding="utf-8")
    out = root / "shards"
    prepare_shards(corpus, default_tokenizer(), out, val_fraction=0.1, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a HybridConfig JSON for a ~0.6M-parameter model (M, MLP, attention, MLP) on the default vocab."""
    from hybridlm.config import HybridConfig

    path = tmp_path_factory.mktemp("tiny_model") / "tiny.json"
    HybridConfig(**TINY_MODEL).save(path)
    return str(path)


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: small models barely gain from more, and a single
    thread cannot stall on the OpenMP barriers when other processes load the CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_tf32():
    """Exact float32 CUDA matmuls (TF32 off) for one test; the previous setting is restored."""
    import torch

    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before
