"""The tokenizer side of an export: the tokenizer of a checkpoint, its special tokens, ``tokenizer_config.json``.

* `ExportTokenizer` / `read_tokenizer_dir`: a directory's ``tokenizer.json`` (else the bundled
  4096-token byte-level BPE), its EOS token (``tokenizer_config.json``'s ``eos_token``) and its
  chat template (`chat_template.load_chat_template`). It has the attributes `save_gguf` reads from
  a `hybridlm.training.tokenizer.Tokenizer` (``backend``, ``eos_token``, ``chat_template``), so
  either can be passed; interop cannot import `training` (which imports interop).
* `special_token_ids`: bos / eos / pad ids: EOS from the tokenizer's own EOS token when it has one,
  else the model config's ``eos_token_id``; BOS and PAD from the config.
* `tokenizer_config` / `write_tokenizer_config`: the ``tokenizer_config.json`` that transformers'
  ``AutoTokenizer`` and llama.cpp's ``convert_hf_to_gguf.py`` need next to a bare ``tokenizer.json``
  (``PreTrainedTokenizerFast``, the special tokens, ``model_max_length``, no BOS/EOS added, the
  chat template when there is one); `added_tokens_decoder` lists its added tokens for one that
  declares them (chat fine-tuning's special tokens).
* `TOKENIZER_FILES` / `copy_tokenizer_files`: the files next to the weights that travel with a
  model (conversion, quantization, the training loop's final export), copied atomically.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

from ..config import HybridConfig
from .chat_template import JINJA_NAME, TOKENIZER_CONFIG_NAME, ChatTemplate, load_chat_template
from .files import atomic_write, atomic_write_text

TOKENIZER_NAME = "tokenizer.json"
BUNDLED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / TOKENIZER_NAME  # training.tokenizer's default
# Files next to the weights that travel with a model unchanged.
TOKENIZER_FILES = (TOKENIZER_NAME, TOKENIZER_CONFIG_NAME, "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", JINJA_NAME)


def copy_tokenizer_files(src_dir: str | Path, dest_dir: str | Path,
                         names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copy each of `names` that ``src_dir`` holds into ``dest_dir`` (atomically per file); the names copied."""
    src_dir, dest_dir = Path(src_dir), Path(dest_dir)
    copied = []
    for name in names:
        if (src_dir / name).is_file():
            atomic_write(dest_dir / name, lambda tmp, n=name: shutil.copyfile(src_dir / n, tmp))
            copied.append(name)
    return copied


@dataclass
class ExportTokenizer:
    """A ``tokenizers.Tokenizer`` with the EOS token and chat template of its directory."""

    backend: tokenizers.Tokenizer
    eos_token: str | None = None
    chat_template: ChatTemplate | None = None


def read_tokenizer_dir(directory: str | Path) -> ExportTokenizer:
    """The tokenizer of a checkpoint directory: its ``tokenizer.json``, else the bundled one.

    The EOS token is ``eos_token`` of the directory's ``tokenizer_config.json`` (None without one);
    the chat template is the directory's (None without one). ValueError for a malformed tokenizer.json.
    """
    d = Path(directory)
    path = d / TOKENIZER_NAME if (d / TOKENIZER_NAME).is_file() else BUNDLED_TOKENIZER
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception for malformed files
        raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None
    template = load_chat_template(d) if path != BUNDLED_TOKENIZER else None
    return ExportTokenizer(backend, config_eos_token(d), template)


def config_eos_token(directory: str | Path) -> str | None:
    """``eos_token`` of ``directory/tokenizer_config.json`` (string or AddedToken dict), if any."""
    path = Path(directory) / TOKENIZER_CONFIG_NAME
    try:
        config: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    eos = config.get("eos_token") if isinstance(config, dict) else None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return eos if isinstance(eos, str) else None


def special_token_ids(backend: tokenizers.Tokenizer, cfg: HybridConfig,
                      eos_token: str | None = None) -> dict[str, int | None]:
    """``{"bos": id, "eos": id, "pad": id}`` (None when unset); ValueError for an id outside the vocabulary."""
    eos = backend.token_to_id(eos_token) if eos_token is not None else None
    if eos_token is not None and eos is None:
        raise ValueError(f"EOS token {eos_token!r} is not in the tokenizer's vocabulary")
    ids = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id if eos is None else eos, "pad": cfg.pad_token_id}
    n = backend.get_vocab_size(with_added_tokens=True)
    for what, i in ids.items():
        if i is not None and not 0 <= i < n:
            raise ValueError(f"{what}_token_id {i} is outside the tokenizer's {n}-token vocabulary")
    return ids


def tokenizer_config(backend: tokenizers.Tokenizer, cfg: HybridConfig, chat_template: ChatTemplate | None = None,
                     eos_token: str | None = None) -> dict[str, Any]:
    """The ``tokenizer_config.json`` dict of a bare ``tokenizer.json`` for a model of config ``cfg``."""
    ids = special_token_ids(backend, cfg, eos_token)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for what, i in ids.items():
        config[f"{what}_token"] = None if i is None else backend.id_to_token(i)
    config.update(model_max_length=cfg.max_seq_len, add_bos_token=False, add_eos_token=False,
                  clean_up_tokenization_spaces=False)
    if chat_template is not None:
        config["chat_template"] = chat_template.source
    return config


def added_tokens_decoder(backend: tokenizers.Tokenizer) -> dict[str, dict[str, Any]]:
    """``added_tokens_decoder`` of a ``tokenizer_config.json``: id (a string) -> the added token's flags."""
    return {str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(backend.get_added_tokens_decoder().items())}


def write_tokenizer_config(src: str | Path, dst: str | Path, cfg: HybridConfig) -> Path | None:
    """Write ``dst/tokenizer_config.json`` when ``src`` has a ``tokenizer.json`` but no ``tokenizer_config.json``.

    Returns the file written, or None (nothing to do). The chat template is ``src``'s
    ``chat_template.jinja`` when there is one. A tokenizer.json that cannot be read, or special
    token ids outside its vocabulary, only warn: the weights are converted all the same.
    """
    src, dst = Path(src), Path(dst)
    if not (src / TOKENIZER_NAME).is_file() or (src / TOKENIZER_CONFIG_NAME).is_file():
        return None
    try:
        tok = read_tokenizer_dir(src)
        config = tokenizer_config(tok.backend, cfg, tok.chat_template)
    except ValueError as err:
        warnings.warn(f"not writing {dst / TOKENIZER_CONFIG_NAME}: {err}", stacklevel=2)
        return None
    return atomic_write_text(dst / TOKENIZER_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
