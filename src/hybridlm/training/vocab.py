"""New special tokens for chat fine-tuning: which tokens to add, and growing the model's vocabulary for them.

* `template_special_tokens` - the special tokens a chat template writes (``<|im_start|>``-style
  ``<|...|>`` tokens, ``<think>`` / ``</think>``, ``<extra_id_N>``), found in its source text.
* `special_tokens_for` - the ``--special-tokens`` value: ``auto`` (the template's) or a
  comma-separated list.
* `resize_vocab` - a model with ``vocab_size`` rows in its embeddings and lm_head (tied or not):
  the old rows unchanged (so the logits of old tokens are too), the new rows (and any
  re-used ``init_ids``) the mean of the other old rows; the config's ``vocab_size`` updated.
* `resize_for_tokenizer` - `resize_vocab` to fit a tokenizer after
  :meth:`~hybridlm.training.tokenizer.Tokenizer.add_special_tokens`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from ..interop.checkpoint import model_from_state, model_state
from ..model.lm import HybridLM
from .tokenizer import Tokenizer

AUTO = "auto"
_JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.S)
_SPECIAL = re.compile(r"<\|[^\s<>|]{1,64}\|>|</?think>|<extra_id_\d+>")
EMBEDDING, LM_HEAD = "backbone.embeddings.weight", "lm_head.weight"


def template_special_tokens(source: str) -> list[str]:
    """The special tokens written by a chat template's code (comments ignored), in order of appearance."""
    return list(dict.fromkeys(_SPECIAL.findall(_JINJA_COMMENT.sub("", source))))


def special_tokens_for(spec: str, template_source: str) -> list[str]:
    """``auto`` -> `template_special_tokens`; else the comma-separated tokens of `spec` (blanks dropped)."""
    if spec.strip() == AUTO:
        return template_special_tokens(template_source)
    return list(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))


@torch.no_grad()
def resize_vocab(model: HybridLM, vocab_size: int, init_ids: Sequence[int] = ()) -> HybridLM:
    """`model` with `vocab_size` token rows (a new HybridLM; unchanged tensors are shared, not copied).

    Rows ``>= model.cfg.vocab_size`` and the rows ``init_ids`` (tokens that re-use rows a padded
    vocabulary had spare) are set to the mean, over the other old rows, of the embedding and,
    separately, of an untied lm_head. ValueError when `vocab_size` is smaller than the model's.
    """
    old = model.cfg.vocab_size
    if vocab_size < old:
        raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size} rows")
    reused = {int(i) for i in init_ids}
    if any(not 0 <= i < old for i in reused):
        raise ValueError(f"init_ids must lie in [0, {old}), got {sorted(reused)}")
    fresh = sorted(reused | set(range(old, vocab_size)))
    keep = torch.tensor([i for i in range(old) if i not in reused])
    cfg = model.cfg.replace(vocab_size=vocab_size)
    sd = model_state(model)
    for name in (EMBEDDING,) if cfg.tie_embeddings else (EMBEDDING, LM_HEAD):
        w = sd[name]  # (old, d_model)
        mean = w[keep].double().mean(0).to(w.dtype)  # (d_model,)
        grown = torch.cat([w, w.new_empty(vocab_size - old, w.shape[1])])
        grown[fresh] = mean
        sd[name] = grown
    new = model_from_state(cfg, sd)
    if cfg.tie_embeddings:
        new.lm_head.weight = new.backbone.embeddings.weight
    return new.train(model.training)


def resize_for_tokenizer(model: HybridLM, tokenizer: Tokenizer, added: Sequence[str]) -> HybridLM:
    """`model` grown to the tokenizer's vocabulary, `added` tokens (new ids) initialised to the mean.

    Returns `model` itself when nothing needs to change.
    """
    ids = [tokenizer.token_to_id(t) for t in added]
    reused = [i for i in ids if i is not None and i < model.cfg.vocab_size]
    size = max(model.cfg.vocab_size, tokenizer.vocab_size)
    if size == model.cfg.vocab_size and not reused:
        return model
    return resize_vocab(model, size, reused)
