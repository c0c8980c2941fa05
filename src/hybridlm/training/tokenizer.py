"""Tokenizers: byte-level BPE training, loading any Hugging Face ``tokenizer.json``, the default.

This module owns

* :class:`Tokenizer` - a small wrapper over ``tokenizers.Tokenizer`` with the interface the
  rest of hybridlm uses (``encode`` / ``encode_batch`` / ``decode`` / ``vocab_size`` /
  ``eos_id`` / ``chat_template`` / ``add_special_tokens`` / ``save``). Encoding never adds
  special tokens and decoding never drops them, so for byte-level BPE
  ``decode(encode(text)) == text`` for every string.
* :func:`train_tokenizer` - trains a GPT-2 style byte-level BPE (ByteLevel pre-tokenizer
  without prefix space + ByteLevel decoder, all 256 bytes in the base vocabulary) whose
  only special token is ``<|endoftext|>`` (id 0), the EOS / document separator.
* :func:`default_tokenizer` - the bundled ``assets/tokenizer.json``: that recipe with
  ``vocab_size=4096`` trained on the bundled King James Bible corpus.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..interop.chat_template import ChatTemplate, load_chat_template
from ..interop.tokenizer_files import BUNDLED_TOKENIZER, config_eos_token
from .corpus import PathLike, iter_documents

EOS_TOKEN = "<|endoftext|>"
DEFAULT_TOKENIZER_PATH = BUNDLED_TOKENIZER
# EOS candidates for foreign tokenizers without a tokenizer_config.json, in priority order.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eos|>")
_MIN_VOCAB = 257  # 256 byte tokens + <|endoftext|>


class Tokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer`` with an explicit EOS token and an optional chat template.

    A ``chat_template`` without an ``eos_token`` of its own gets this tokenizer's EOS token.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_token: str | None = None,
                 chat_template: ChatTemplate | None = None) -> None:
        self._tok = tokenizer
        self.eos_token = eos_token if eos_token is not None else _guess_eos_token(tokenizer)
        self.eos_id: int | None = None if self.eos_token is None else tokenizer.token_to_id(self.eos_token)
        if self.eos_token is not None and self.eos_id is None:
            raise ValueError(f"EOS token {self.eos_token!r} is not in the vocabulary")
        if chat_template is not None and chat_template.eos_token is None and self.eos_token is not None:
            chat_template = dataclasses.replace(chat_template, eos_token=self.eos_token)
        self.chat_template = chat_template

    @classmethod
    def from_file(cls, path: PathLike, eos_token: str | None = None) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json`` (or a directory containing one).

        The EOS token is ``eos_token`` if given, else ``eos_token`` from a sibling
        ``tokenizer_config.json``, else the first of ``<|endoftext|>``, ``</s>``,
        ``<eos>``, ... present in the vocabulary, else None. The chat template is the
        directory's ``chat_template.jinja`` or ``tokenizer_config.json``'s ``chat_template``
        (see :func:`hybridlm.interop.chat_template.load_chat_template`), else None.
        """
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises plain Exception for malformed files
            raise ValueError(f"{path} is not a valid tokenizer.json: {err}") from None
        return cls(tok, eos_token if eos_token is not None else config_eos_token(path.parent),
                   chat_template=load_chat_template(path.parent))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` (a list, numpy array or tensor); special tokens are kept."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None if it is not in the vocabulary."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None if out of range."""
        return self._tok.id_to_token(token_id)

    def add_special_tokens(self, tokens: Sequence[str]) -> list[str]:
        """Make `tokens` special (never split, kept by `decode`); returns those that got a new id.

        A token already in the vocabulary keeps its id (it is only marked special); new ones get
        the next ids in order. ValueError for an empty or whitespace-only token.
        """
        tokens = list(dict.fromkeys(tokens))
        bad = [t for t in tokens if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"special tokens must be non-blank strings, got {bad}")
        new = [t for t in tokens if self._tok.token_to_id(t) is None]
        self._tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in tokens])
        return new

    def save(self, path: PathLike) -> Path:
        """Write the tokenizer as a ``tokenizer.json`` file; returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))
        return path

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r}, eos_id={self.eos_id})"


def _guess_eos_token(tokenizer: tokenizers.Tokenizer) -> str | None:
    return next((t for t in _EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)


def _new_byte_level_bpe() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    paths: PathLike | Sequence[PathLike],
    vocab_size: int = 4096,
    out: PathLike | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` as id 0 on the documents at ``paths``.

    ``paths`` are anything :func:`hybridlm.training.corpus.read_documents` accepts. Raises
    FileNotFoundError naming a missing path and ValueError for an empty corpus. The
    result is saved to ``out`` when given. Training is deterministic.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} (256 bytes + {EOS_TOKEN}), got {vocab_size}")
    docs = iter_documents(paths)  # checks that every path exists
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tok = _new_byte_level_bpe()
    tok.train_from_iterator(docs, trainer=trainer)
    wrapped = Tokenizer(tok, EOS_TOKEN)
    if out is not None:
        wrapped.save(out)
    return wrapped


def default_tokenizer() -> Tokenizer:
    """The bundled 4096-token byte-level BPE trained on the bundled KJV corpus."""
    return Tokenizer.from_file(DEFAULT_TOKENIZER_PATH)
