"""Training: data, tokenizer, the loop, resume, distributed, run checkpoints, stability monitoring, sweeps, reports.

    corpus.py       documents out of .txt / .txt.gz / .jsonl files and directories
    tokenizer.py    byte-level BPE (train, load any tokenizer.json), the bundled default
    shards.py       tokenize a corpus into memory-mapped train/val token files
    dataset.py      `TokenDataset`: deterministic batches, a pure function of (seed, step, rank)
    train_config.py `TrainConfig`, validated         inputs.py   --model / --data resolution
    loop.py         `train()`, `evaluate()`           resume.py   resume and init_from
    optim.py        AdamW + cosine / WSD              distributed.py  DDP / FSDP2, rank-0 helpers
    checkpoints.py  crash-safe run checkpoints        metrics.py  metrics.jsonl
    monitor.py      linear-output RMS + attention-logit monitoring (Rybakov et al.)
    divergence.py   stopping a diverged run           sweep.py    stability variants x learning rates
    report.py       report.html with plots and samples
    packing.py      packed SFT rows (each conversation its own document, trained-token mask), `open_dataset`
    chat_data.py    chat JSONL, checked          sft_render.py  conversations -> ids + assistant-only mask
    vocab.py        special tokens, vocabulary resize (new rows = the mean)    sft.py  `SFTConfig`, `sft()`
    tensor_parallel.py  Megatron TP on DTensor   dcp_checkpoint.py  sharded checkpoints that reshard
    flops.py        model FLOPs per token and MFU
"""

from .dataset import TokenDataset
from .divergence import TrainingDiverged
from .loop import evaluate, train
from .shards import prepare_shards
from .tokenizer import Tokenizer, default_tokenizer, train_tokenizer
from .train_config import TrainConfig

__all__ = ["TokenDataset", "Tokenizer", "TrainConfig", "TrainingDiverged", "default_tokenizer", "evaluate",
           "prepare_shards", "train", "train_tokenizer"]
