"""The ``tokenizer.*`` metadata of a GGUF file: a byte-level BPE as llama.cpp's ``gpt2`` tokenizer model.

What `vocab_metadata` writes, and why:

* ``tokenizer.ggml.model = "gpt2"`` (llama.cpp's byte-level BPE), ``tokenizer.ggml.tokens`` (one
  string per id, in the GPT-2 byte-to-unicode spelling ``tokenizer.json`` uses; ids the tokenizer
  does not define, up to the model's vocabulary size, are ``[PAD<id>]``), ``tokenizer.ggml.token_type``
  (1 normal; added tokens 3 control when special, else 4 user-defined; 5 unused for the pads) and
  ``tokenizer.ggml.merges`` (``"left right"``, in rank order);
* ``tokenizer.ggml.pre``: llama.cpp only knows some pre-tokenizer names, each a fixed regex.
  Ours (`hybridlm.training.tokenizer`) is GPT-2's: ``ByteLevel(add_prefix_space=False,
  use_regex=True)``, no normalizer, so it is written as ``"gpt-2"``. A tokenizer that pre-tokenizes
  otherwise (a normalizer, a prefix space, a ``Split`` regex, byte fallback, ``ignore_merges``) is
  refused unless the caller names the llama.cpp pre-tokenizer that matches it (``tokenizer_pre``);
* ``tokenizer.ggml.bos/eos/padding_token_id`` (`tokenizer_files.special_token_ids`; without a BOS id
  the EOS id is written, GPT-2's convention, since llama.cpp would otherwise take token 11) and
  ``tokenizer.ggml.add_bos_token = add_eos_token = false``: hybridlm never adds special tokens;
* ``tokenizer.chat_template`` when there is a template.
"""

from __future__ import annotations

import json
from typing import Any

import tokenizers

from ..config import HybridConfig
from .chat_template import ChatTemplate
from .gguf_file import i32s, strs, u32
from .tokenizer_files import special_token_ids

GPT2_PRE = "gpt-2"
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5  # llama.cpp's token types


def _backend(tokenizer: Any) -> tokenizers.Tokenizer:
    backend = getattr(tokenizer, "backend", tokenizer)
    if not isinstance(backend, tokenizers.Tokenizer):
        raise TypeError("tokenizer must be a hybridlm Tokenizer, an interop ExportTokenizer or a "
                        f"tokenizers.Tokenizer, not {type(tokenizer).__name__}")
    return backend


def _not_gpt2_reason(spec: dict[str, Any]) -> str | None:
    """Why this tokenizer.json does not pre-tokenize as llama.cpp's "gpt-2" does (None when it does)."""
    pre, model = spec.get("pre_tokenizer") or {}, spec["model"]
    if spec.get("normalizer") is not None:
        return f"it has a {spec['normalizer'].get('type')!r} normalizer"
    if pre.get("type") != "ByteLevel":
        return f"its pre-tokenizer is {pre.get('type')!r}, not ByteLevel"
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "its ByteLevel pre-tokenizer adds a prefix space or has no GPT-2 regex"
    for key in ("byte_fallback", "ignore_merges", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            return f"its BPE model sets {key}={model[key]!r}"
    return None


def pre_tokenizer_name(backend: tokenizers.Tokenizer, tokenizer_pre: str | None = None) -> str:
    """``tokenizer.ggml.pre`` for a BPE tokenizer: ``"gpt-2"`` for GPT-2's byte-level one, else ``tokenizer_pre``.

    ValueError for a non-BPE tokenizer, and for one that pre-tokenizes otherwise with no ``tokenizer_pre``.
    """
    spec = json.loads(backend.to_str())
    model_type = (spec.get("model") or {}).get("type")
    if model_type != "BPE":
        raise ValueError(f"only BPE tokenizers can be written to GGUF here (llama.cpp's 'gpt2' model); "
                         f"this one is {model_type!r}")
    if tokenizer_pre is not None:
        return tokenizer_pre
    reason = _not_gpt2_reason(spec)
    if reason is not None:
        raise ValueError(f"the tokenizer does not pre-tokenize like llama.cpp's {GPT2_PRE!r} ({reason}), so llama.cpp "
                         "would split text differently; pass tokenizer_pre=NAME (a pre-tokenizer llama.cpp knows "
                         "that matches it), or run llama.cpp's convert_hf_to_gguf.py on the Hugging Face export")
    return GPT2_PRE


def _merges(backend: tokenizers.Tokenizer) -> list[str]:
    merges = json.loads(backend.to_str())["model"].get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _tokens(backend: tokenizers.Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    n = backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"the tokenizer has {n} tokens but the model's vocabulary only {vocab_size}")
    added = backend.get_added_tokens_decoder()
    by_id = {i: t for t, i in backend.get_vocab(with_added_tokens=True).items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
    return tokens, types


def vocab_metadata(tokenizer: Any, cfg: HybridConfig, chat_template: str | ChatTemplate | None = None,
                   tokenizer_pre: str | None = None) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF metadata of ``tokenizer`` for a model of config ``cfg`` (see the module docstring).

    ``tokenizer`` is a hybridlm ``Tokenizer``, an `ExportTokenizer` or a ``tokenizers.Tokenizer``;
    ``chat_template`` defaults to the tokenizer's own (``tokenizer.chat_template``).
    """
    backend = _backend(tokenizer)
    pre = pre_tokenizer_name(backend, tokenizer_pre)
    tokens, types = _tokens(backend, cfg.vocab_size)
    ids = special_token_ids(backend, cfg, getattr(tokenizer, "eos_token", None))
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": strs(tokens), "tokenizer.ggml.token_type": i32s(types),
        "tokenizer.ggml.merges": strs(_merges(backend)),
    }
    bos = ids["bos"] if ids["bos"] is not None else ids["eos"]
    for key, i in (("bos_token_id", bos), ("eos_token_id", ids["eos"]), ("padding_token_id", ids["pad"])):
        if i is not None:
            meta[f"tokenizer.ggml.{key}"] = u32(i)
    meta["tokenizer.ggml.add_bos_token"] = False
    meta["tokenizer.ggml.add_eos_token"] = False
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if template is not None:
        meta["tokenizer.chat_template"] = template.source if isinstance(template, ChatTemplate) else str(template)
    return meta
