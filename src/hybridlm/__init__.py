"""hybridlm: hybrid Mamba-2 / Transformer language models (Nemotron-H family).

    from hybridlm import HybridConfig, HybridLM, preset, load, generate, train

    model = HybridLM(preset("tiny"))                    # or HybridConfig(pattern="M-M*M-", ...)
    new = generate(model, [[1, 2, 3]], max_new_tokens=20, temperature=0)
    model = load("runs/x/final")                        # ours, or a Hugging Face Nemotron-H directory

The subpackages, one idea each: `model` (layers, SSD scan, cache), `lowp` (FP8 / NVFP4),
`train` (data, loop, resume, stability monitoring), `compress` (prune + distill),
`serve` (generation, engine, OpenAI server), `interop` (checkpoints, Hugging Face).
Everything but the config is imported on first use, so ``import hybridlm`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import HybridConfig, preset

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "HybridLM": "hybridlm.model.lm",
    "load": "hybridlm.interop.convert",
    "save_model": "hybridlm.interop.checkpoint",
    "generate": "hybridlm.serve.generation",
    "generate_text": "hybridlm.serve.generation",
    "SamplingParams": "hybridlm.serve.sampling",
    "train": "hybridlm.training.loop",
    "TrainConfig": "hybridlm.training.train_config",
}

__all__ = ["HybridConfig", "HybridLM", "SamplingParams", "TrainConfig", "generate", "generate_text", "load", "preset",
           "save_model", "train"]

if TYPE_CHECKING:
    from .interop.checkpoint import save_model
    from .interop.convert import load
    from .model.lm import HybridLM
    from .serve.generation import generate, generate_text
    from .serve.sampling import SamplingParams
    from .training.loop import train
    from .training.train_config import TrainConfig


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'hybridlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
