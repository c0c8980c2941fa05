"""`sft()`: supervised fine-tuning of a base checkpoint on chat conversations (`hybridlm sft`).

    from hybridlm.training.sft import SFTConfig, sft
    sft(SFTConfig(model="runs/base/final", data="chats.jsonl", out="runs/sft", steps=500))

What it does, on rank 0 (the other ranks wait for it), before handing over to `train()`:

1. the base tokenizer (the checkpoint's ``tokenizer.json``, else the bundled one) and chat template
   (``chat_template``, else the checkpoint's, else the bundled `default_chat_template`);
2. the template's special tokens (``<|im_start|>``, ``<|im_end|>``, ``<think>``, ``</think>``, or
   ``special_tokens``) added to the tokenizer; when the vocabulary grew, the base model resized
   (`vocab.resize_vocab`, new rows the mean of the old ones) and written to ``OUT/base``;
3. the conversations (`chat_data`) rendered with loss masks (`sft_render`) and packed
   (`packing.write_packed_dataset`) into ``OUT/sft_data``, with the tokenizer files a served or
   exported model needs: ``tokenizer.json``, ``tokenizer_config.json`` (``eos_token`` = the
   end-of-turn token, ``chat_template``, ``added_tokens_decoder``) and ``chat_template.jinja``;
   ``sft.json`` records the inputs (``OUT/sft_config.json`` the config). A later call with the
   same inputs (``resume=True`` after ``stop_at``, say) re-uses both directories as they are;
   changed inputs are refused while ``OUT`` holds checkpoints.

Then ``train(TrainConfig(model=OUT/base or the base, init_from=the same, data=OUT/sft_data, ...))``
trains on the assistant tokens only, with everything the loop has (progress bar, resume,
DDP / FSDP2, metrics, ``precision`` recipes); ``OUT/final`` gets the tokenizer files, so
``hybridlm serve --ckpt OUT/final`` uses the template and stops at the end-of-turn token.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..config import HybridConfig, read_json
from ..interop.chat_template import JINJA_NAME, TOKENIZER_CONFIG_NAME, ChatTemplate, read_chat_template_file
from ..interop.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_model, save_model
from ..interop.files import atomic_write_text
from ..interop.tokenizer_files import TOKENIZER_NAME, added_tokens_decoder, tokenizer_config
from ..model.lm import HybridLM
from . import distributed as D
from .chat_data import iter_chat_jsonl
from .checkpoints import CKPT_DIR, latest_checkpoint, publish_dir
from .inputs import resolve_model_config
from .loop import train
from .packing import write_packed_dataset
from .sft_render import default_chat_template, render_samples
from .tokenizer import Tokenizer, default_tokenizer
from .train_config import TrainConfig
from .vocab import resize_for_tokenizer, special_tokens_for, template_special_tokens

SFT_FORMAT = "hybridlm-sft-v1"
SFT_META = "sft.json"
SFT_CONFIG = "sft_config.json"  # the SFTConfig of the run that prepared OUT (train_config.json has the loop's part)
BASE_DIR, DATA_DIR = "base", "sft_data"
CHAT_END_TOKEN = "<|im_end|>"  # ChatML's end of turn: the EOS of a chat model whose template writes it


@dataclass
class SFTConfig(TrainConfig):
    """`TrainConfig` (its fields and flags) for chat fine-tuning, plus the chat fields; see the module docstring."""

    model: str = ""  # base checkpoint dir (required): weights, tokenizer.json, chat template; a preset / config JSON = random weights (tests only)
    data: Optional[str] = None  # chat JSONL (required): {"messages": [{"role", "content", "reasoning_content"?}, ...]} per line
    out: str = "runs/sft"  # run directory (base/ and sft_data/ when prepared, checkpoints, final model)
    steps: int = 500  # total optimizer steps (the LR schedule spans them)
    lr: float = 1e-4  # peak learning rate
    min_lr: float = 1e-5  # final learning rate of the cosine / WSD decay
    warmup_steps: int = 20  # linear warmup steps
    val_fraction: float = 0.05  # held-out fraction of the conversations (whole conversations)
    chat_template: Optional[str] = None  # .jinja file or tokenizer_config.json; default: the base checkpoint's, else the bundled ChatML one
    special_tokens: str = "auto"  # comma-separated tokens to add as special tokens; auto = the template's (<|..|>, <think>, </think>)
    eos_token: Optional[str] = None  # end of an assistant turn (trained; the result's EOS); default <|im_end|> if the template writes it, else its EOS

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("SFTConfig: model must name the base checkpoint directory")
        if not self.data:
            raise ValueError("SFTConfig: data must name a chat JSONL file")
        if self.init_from:
            raise ValueError("SFTConfig: init_from is not used; the base checkpoint is `model`")
        super().__post_init__()

    def train_config(self, **changes: Any) -> TrainConfig:
        """The `TrainConfig` fields of this config, with `changes`."""
        return TrainConfig(**{**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}, **changes})


def sft(cfg: SFTConfig) -> dict[str, Any]:
    """Prepare (rank 0) and run the fine-tuning of `cfg`; `train()`'s summary plus ``sft`` (what was prepared)."""
    env = D.setup(cfg.distributed, cfg.device)  # train() re-uses this process group
    try:
        prepared = D.on_main(env, lambda: prepare_sft(cfg))
        summary = train(cfg.train_config(model=prepared["model"], init_from=prepared["init_from"],
                                         data=prepared["data"]))
        return {**summary, "sft": prepared}
    finally:
        D.teardown(env)


# ---- preparation ------------------------------------------------------------------------------
def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _base_fingerprint(spec: str, model_cfg: HybridConfig, seed: int) -> dict[str, Any]:
    """What identifies the base weights: a checkpoint's config and weights file, or a random init."""
    d = Path(spec)
    if d.is_dir():
        weights = (d / WEIGHTS_NAME).stat()
        return {"dir": str(d.resolve()), "config_sha256": _sha256_file(d / CONFIG_NAME),
                "weights": [weights.st_size, weights.st_mtime_ns]}
    return {"random_init": model_cfg.to_dict(), "seed": seed}


def load_base_tokenizer(spec: str) -> Tokenizer:
    """The base checkpoint's tokenizer (``tokenizer.json`` with its EOS and template), else the bundled one."""
    d = Path(spec)
    return Tokenizer.from_file(d) if (d / TOKENIZER_NAME).is_file() else default_tokenizer()


def choose_template(cfg: SFTConfig, tokenizer: Tokenizer) -> ChatTemplate:
    """``cfg.chat_template``, else the base tokenizer's (its checkpoint's), else the bundled default."""
    if cfg.chat_template:
        return read_chat_template_file(cfg.chat_template)
    return tokenizer.chat_template or default_chat_template()


def end_of_turn_token(cfg: SFTConfig, template: ChatTemplate, tokenizer: Tokenizer) -> str:
    """The token that ends an assistant turn (see ``SFTConfig.eos_token``); ValueError if not in the vocabulary."""
    if cfg.eos_token:
        token = cfg.eos_token
    elif CHAT_END_TOKEN in template_special_tokens(template.source):
        token = CHAT_END_TOKEN
    else:
        token = template.eos_token or tokenizer.eos_token
    if token is None or tokenizer.token_to_id(token) is None:
        raise ValueError(f"end-of-turn token {token!r} is not in the tokenizer's vocabulary; pass eos_token "
                         "(--eos-token) and, if it is new, add it with special_tokens (--special-tokens)")
    return token


def chat_tokenizer_config(tokenizer: Tokenizer, model_cfg: HybridConfig, template: ChatTemplate,
                          end_token: str) -> dict[str, Any]:
    """The fine-tuned model's ``tokenizer_config.json``: EOS = the end-of-turn token, the template, added tokens."""
    config = tokenizer_config(tokenizer.backend, model_cfg, template, eos_token=end_token)
    config["added_tokens_decoder"] = added_tokens_decoder(tokenizer.backend)
    return config


def write_chat_tokenizer_files(directory: Path, tokenizer: Tokenizer, config: dict[str, Any],
                               template: ChatTemplate) -> None:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` into `directory`."""
    tokenizer.save(directory / TOKENIZER_NAME)
    atomic_write_text(directory / TOKENIZER_CONFIG_NAME, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(directory / JINJA_NAME, template.source)


def _reusable(meta_path: Path, inputs: dict[str, Any], out: Path) -> dict[str, Any] | None:
    """The recorded preparation when it was made from the same `inputs` and is still complete, else None."""
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != SFT_FORMAT or meta.get("inputs") != inputs:
        return None
    prepared = meta.get("prepared", {})
    if prepared.get("base") and not (out / BASE_DIR / WEIGHTS_NAME).is_file():
        return None
    return prepared


def _refuse_changed_inputs(cfg: SFTConfig, out: Path) -> None:
    """ValueError when `out` holds checkpoints of a run that was prepared from other inputs (or none recorded)."""
    found = latest_checkpoint(out) if (out / CKPT_DIR).is_dir() else None
    if found is None:
        return
    if cfg.resume:
        raise ValueError(f"{out} holds checkpoints (latest {found.name}) of a fine-tuning prepared from other inputs "
                         f"(data, base, template, tokens, seq_len, val_fraction or seed changed; see "
                         f"{out / DATA_DIR / SFT_META}); resume with the same inputs, or choose another out directory")
    raise ValueError(f"{out} already holds checkpoints (latest {found.name}); pass resume=True (--resume) to "
                     "continue that run, or choose another out directory")


def prepare_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Steps 1-3 of the module docstring; returns ``{"model", "init_from", "data", "base", "added_tokens",
    "end_token", "reused", "packed"}`` (paths as strings)."""
    out = Path(cfg.out)
    model_cfg = resolve_model_config(cfg.model)  # FileNotFoundError / ValueError for a bad --model
    data = Path(cfg.data)
    if not data.is_file():
        raise FileNotFoundError(f"chat data file not found: {data}")
    tokenizer = load_base_tokenizer(cfg.model)
    template = choose_template(cfg, tokenizer)
    template.compile()
    added = tokenizer.add_special_tokens(special_tokens_for(cfg.special_tokens, template.source))
    end_token = end_of_turn_token(cfg, template, tokenizer)
    grows = tokenizer.vocab_size > model_cfg.vocab_size or any(
        tokenizer.token_to_id(t) < model_cfg.vocab_size for t in added)
    trained_cfg = model_cfg.replace(vocab_size=max(model_cfg.vocab_size, tokenizer.vocab_size))
    config = chat_tokenizer_config(tokenizer, trained_cfg, template, end_token)
    served = ChatTemplate(template.source, config["bos_token"], config["eos_token"])  # as the server loads it
    inputs = {"data": {"path": str(data.resolve()), "sha256": _sha256_file(data)},
              "base": _base_fingerprint(cfg.model, model_cfg, cfg.seed),
              "tokenizer_sha256": _sha256(tokenizer.backend.to_str()), "template_sha256": _sha256(template.source),
              "end_token": end_token, "seq_len": cfg.seq_len, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    meta_path = out / DATA_DIR / SFT_META
    prepared = _reusable(meta_path, inputs, out)
    if prepared is not None:
        return {**prepared, "reused": True}
    _refuse_changed_inputs(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SFT_CONFIG, json.dumps(cfg.to_dict(), indent=2) + "\n")
    base = out / BASE_DIR if grows else None
    if base is not None:
        _write_resized_base(cfg, model_cfg, tokenizer, added, base, config, served)
    packed: dict[str, Any] = {}

    # rows are padded with the base EOS (<|endoftext|>), else with the end-of-turn token; padding is never trained
    pad_tok = tokenizer if tokenizer.eos_id is not None else Tokenizer(tokenizer.backend, end_token)

    def fill(tmp: Path) -> None:
        samples = render_samples(iter_chat_jsonl(data), served, tokenizer, end_token)
        packed.update(write_packed_dataset(samples, pad_tok, tmp, seq_len=cfg.seq_len,
                                           val_fraction=cfg.val_fraction, seed=cfg.seed, progress=cfg.progress))
        write_chat_tokenizer_files(tmp, tokenizer, config, served)

    publish_dir(out / DATA_DIR, fill)
    model = str(base) if base is not None else cfg.model
    prepared = {"model": model, "init_from": model if base is not None or Path(cfg.model).is_dir() else None,
                "data": str(out / DATA_DIR), "base": str(base) if base is not None else None, "added_tokens": added,
                "end_token": end_token,
                "packed": {k: packed[k] for k in ("samples", "rows", "trained_tokens", "truncated")}}
    record = {"format": SFT_FORMAT, "inputs": inputs, "prepared": prepared}
    atomic_write_text(meta_path, json.dumps(record, indent=2) + "\n")
    return {**prepared, "reused": False}


def _write_resized_base(cfg: SFTConfig, model_cfg: HybridConfig, tokenizer: Tokenizer, added: list[str],
                        base: Path, config: dict[str, Any], template: ChatTemplate) -> None:
    """``OUT/base``: the base model grown to the tokenizer's vocabulary, with the chat tokenizer files."""
    if Path(cfg.model).is_dir():
        model = load_model(cfg.model)
    else:  # a preset / config: random weights, as train() would initialise them
        model = HybridLM(model_cfg)
        model.init_weights(cfg.seed)
    model = resize_for_tokenizer(model, tokenizer, added)

    def fill(tmp: Path) -> None:
        save_model(model, tmp, extra={"sft_base": cfg.model, "added_tokens": added})
        write_chat_tokenizer_files(tmp, tokenizer, config, template)

    publish_dir(base, fill)
