"""Post-training quantization end to end: a checkpoint + optional calibration data -> a compressed-tensors directory.

    from hybridlm.compress.quantize import quantize_checkpoint
    r = quantize_checkpoint("runs/x/final", "runs/x-nvfp4", fmt="nvfp4", calib="data/")
    print(r.summary())                      # then: vllm serve runs/x-nvfp4, or hybridlm generate --ckpt runs/x-nvfp4

The source is any directory `load` opens (ours or Hugging Face Nemotron-H). `calib` is a
prepared shard directory (its train split is sampled as `prune` does) or token batches
already in memory; it gives the static activation scales. The math is in
`hybridlm.lowp.ptq`, the format in `hybridlm.interop.compressed`; the source's tokenizer
files are copied beside the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

from ..interop.compressed import CompressedExport, export_compressed
from ..interop.convert import load
from ..interop.tokenizer_files import copy_tokenizer_files
from ..lowp.recipe import Recipe
from ..training.dataset import TokenDataset
from .importance import calibration_batches


def calibration_data(calib: str | Path | Iterable | None, vocab_size: int, n_seqs: int = 64, seq_len: int = 256,
                     batch_size: int = 8) -> Iterable | None:
    """Token batches for `calib`: None stays None, a path is a prepared shard directory (train split:
    `n_seqs` random windows of `seq_len` tokens), anything else is taken as batches already."""
    if calib is None or not isinstance(calib, (str, Path)):
        return calib
    path = Path(calib)
    if not path.exists():
        raise FileNotFoundError(f"calibration data not found: {path} (want a prepared shard directory: "
                                "`hybridlm data prepare --data TEXT --out DIR`)")
    ds = TokenDataset(path, "train")
    ds.check_vocab(vocab_size)
    return [x for x, _ in calibration_batches(ds, n_seqs, seq_len, batch_size)]


def quantize_checkpoint(src_dir: str | Path, out_dir: str | Path, fmt: str | None = None,
                        calib: str | Path | Iterable | None = None, high_precision_layers: str = "auto",
                        fp8_granularity: str = "tensor", recipe: Recipe | str | None = None,
                        dtype: torch.dtype | None = None, calib_seqs: int = 64, seq_len: int = 256,
                        batch_size: int = 8, device: str | torch.device = "cpu") -> CompressedExport:
    """Quantize the checkpoint in `src_dir` into a compressed-tensors Nemotron-H directory `out_dir`.

    `fmt` "nvfp4" (E2M1 weights, E4M3 scale per 16, FP32 global scale; the default) or "fp8"
    (E4M3, `fp8_granularity` "tensor" or "channel" weight scales). `recipe`: the ``--precision``
    the model was trained with (weights quantized as its forward did, e.g. NVFP4 16x16 tiles);
    it implies the format. `dtype` of the dense tensors: default the source's. See
    `interop.compressed.export_compressed` for the rest.
    """
    src, out = Path(src_dir), Path(out_dir)
    if out.exists() and out.resolve() == src.resolve():
        raise ValueError(f"output directory {out} is the source checkpoint; choose another one")
    model = load(src, device=device)
    dense_dtype = dtype or model.lm_head.weight.dtype  # default: the source's
    model = model.float()                              # quantize and calibrate in float32
    batches = calibration_data(calib, model.cfg.vocab_size, calib_seqs, seq_len, batch_size)
    result = export_compressed(model, out, fmt, batches, high_precision_layers, fp8_granularity, recipe,
                               dense_dtype)
    copy_tokenizer_files(src, out)
    return result
