"""What a run trains: the model config a `--model` names, and the token shards a `--data` names.

`resolve_model_config` accepts a preset name, a `HybridConfig` JSON file or a hybridlm
checkpoint directory (its config). `resolve_data` accepts prepared shards as they are
and tokenizes raw text (``.txt`` / ``.jsonl`` / a directory; default: the bundled King
James Bible) into ``OUT/data`` on rank 0, reusing an earlier tokenization of the same
source in the current format. Prepared data may also be packed SFT data
(`hybridlm.training.packing`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..config import PRESETS, HybridConfig, preset, read_json
from ..interop.checkpoint import read_config
from .corpus import default_corpus_path
from .distributed import DistEnv, on_main, say
from .shards import META_FILE, META_FORMAT, prepare_shards
from .tokenizer import default_tokenizer
from .train_config import TrainConfig


def resolve_model_config(spec: str) -> HybridConfig:
    """A preset name, a HybridConfig JSON file, or a hybridlm checkpoint directory / its config.json."""
    if spec in PRESETS:
        return preset(spec)
    path = Path(spec)
    if path.is_dir():
        return read_config(path)
    if not path.is_file():
        raise FileNotFoundError(f"model {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) "
                                "nor an existing config file")
    payload = read_json(path)
    if isinstance(payload, dict) and "hybridlm" in payload:  # a checkpoint's config.json
        return read_config(path.parent)
    return HybridConfig.load(path)


def resolve_data(tc: TrainConfig, env: DistEnv) -> Path:
    """The prepared shard directory for `tc.data` (tokenizing raw text into OUT/data on rank 0)."""
    src = Path(tc.data) if tc.data else default_corpus_path()
    if src.is_dir() and (src / META_FILE).is_file():
        return src
    dest = Path(tc.out) / "data"

    def prepare() -> str:
        if not src.exists():
            raise FileNotFoundError(f"data path not found: {src}")
        meta_path = dest / META_FILE
        if meta_path.is_file():
            with contextlib.suppress(ValueError, OSError):
                meta = read_json(meta_path)
                if (meta.get("sources") == [str(src)] and meta.get("val_fraction") == tc.val_fraction
                        and meta.get("format") == META_FORMAT):  # (an older format is re-tokenized)
                    return str(dest)
        say(env, f"tokenizing {src} into {dest}")
        prepare_shards(src, default_tokenizer(), dest, val_fraction=tc.val_fraction, progress=tc.progress)
        return str(dest)

    return Path(on_main(env, prepare))
