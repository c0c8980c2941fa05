"""The `hybridlm` command line: one sub-command per job.

    hybridlm info --preset nemotron-h-8b
    hybridlm tokenizer train --data corpus/ --vocab-size 4096 --out tok.json
    hybridlm data prepare --data corpus/ --out data/
    hybridlm train --model tiny --data data/ --out runs/x
    hybridlm generate --ckpt runs/x/final --prompt "In the beginning"
    hybridlm eval --ckpt runs/x/final --data data/
    hybridlm report runs/x
    hybridlm convert SRC DST --to hf

Bad input (missing files, invalid configs, corrupt checkpoints) ends with a one-line
`error: ...` and exit status 1, never a traceback; argparse rejects unknown flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable

COMMANDS: dict[str, Callable[[argparse.ArgumentParser], Callable[[argparse.Namespace], Any]]] = {}


def command(name: str, help: str):
    """Register `fn(parser) -> runner` as sub-command `name`."""
    def wrap(fn):
        fn.help = help
        COMMANDS[name] = fn
        return fn
    return wrap


# ---- dataclass <-> argparse (litgpt-style configs) ---------------------------
def _field_comments(cls: type) -> dict[str, str]:
    """Trailing `# comments` of dataclass fields, used as --help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M)}


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of dataclass `cls` (bools take an optional true/false)."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        typ = hints[f.name]
        args = typing.get_args(typ)
        base = next((a for a in args if a is not type(None)), typ) if args else typ
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        help_text = f.metadata.get("help") or comments.get(f.name, "")
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default,
                                help=help_text)
        elif base in (int, float, str):
            parser.add_argument(flag, type=base, default=default, help=help_text)
        else:
            raise TypeError(f"cannot make a CLI flag for {cls.__name__}.{f.name}: {typ}")


def dataclass_from_args(cls: type, args: argparse.Namespace, **extra: Any):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **extra)


# ---- shared loaders ------------------------------------------------------------
def add_model_source(p: argparse.ArgumentParser, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--ckpt", help="hybridlm checkpoint directory (config.json + model.safetensors)")
    src.add_argument("--hf", help="Hugging Face Nemotron-H directory (config.json + safetensors)")
    src.add_argument("--preset", help="a preset name, with freshly initialised (random) weights")
    src.add_argument("--config", help="a HybridConfig JSON file, with random weights")


def load_config_from(args: argparse.Namespace):
    from .checkpoint import read_config
    from .config import HybridConfig, preset
    if args.preset:
        return preset(args.preset)
    if args.config:
        return HybridConfig.load(args.config)
    if args.ckpt:
        return read_config(args.ckpt)
    from .hf_interop import read_hf_config
    return read_hf_config(args.hf)


def load_model_from(args: argparse.Namespace):
    import torch
    from .checkpoint import load_model
    from .model import HybridLM
    device = resolve_device(getattr(args, "device", "auto"))
    if args.ckpt:
        return load_model(args.ckpt, device=device)
    if args.hf:
        from .hf_interop import load_hf_dir
        return load_hf_dir(args.hf, device=device)
    torch.manual_seed(getattr(args, "seed", 0) or 0)
    return HybridLM(load_config_from(args)).to(device).eval()


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", help="text/jsonl file or directory (repeatable; default: bundled corpus)")


def corpus_paths(args: argparse.Namespace) -> list:
    """The --data paths, or the bundled corpus."""
    from .data import default_corpus_path
    return args.data or [default_corpus_path()]


def resolve_device(name: str | None) -> str:
    import torch
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return name


def load_tokenizer_for(args: argparse.Namespace):
    from .tokenizer import Tokenizer, default_tokenizer
    if getattr(args, "tokenizer", None):
        return Tokenizer.from_file(args.tokenizer)
    for d in (args.ckpt, args.hf):
        if d and (Path(d) / "tokenizer.json").is_file():
            return Tokenizer.from_file(Path(d) / "tokenizer.json")
    return default_tokenizer()


# ---- commands -------------------------------------------------------------------
@command("info", "parameter count and inference memory of a model")
def _info(p: argparse.ArgumentParser):
    add_model_source(p)
    p.add_argument("--contexts", default="4096,32768,131072", help="comma-separated context lengths")
    p.add_argument("--batch", type=int, default=1, help="sequences held in the cache")
    p.add_argument("--dtype", default="bf16", help="weight dtype: fp32, bf16, fp8, nvfp4")

    def run(a):
        from .info import format_info
        contexts = tuple(int(c) for c in a.contexts.split(",") if c)
        print(format_info(load_config_from(a), a.preset, contexts, a.batch, a.dtype))
    return run


@command("generate", "generate text from a checkpoint")
def _generate(p: argparse.ArgumentParser):
    add_model_source(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument("--tokenizer", help="tokenizer.json (default: beside the checkpoint, else bundled)")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")

    def run(a):
        from .generation import SamplingParams, generate_text
        model, tok = load_model_from(a), load_tokenizer_for(a)
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
        params = SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
        for prompt, text in zip(a.prompt, generate_text(model, tok, a.prompt, params)):
            print(prompt + text)
            print("-" * 40)
    return run


@command("convert", "convert between hybridlm checkpoints and Hugging Face Nemotron-H directories")
def _convert(p: argparse.ArgumentParser):
    p.add_argument("src", help="source directory (format detected from its config.json)")
    p.add_argument("dst", help="destination directory")
    p.add_argument("--to", choices=["hf", "hybridlm"], default=None,
                   help="target format (default: the other one)")

    def run(a):
        from .hf_interop import convert
        out = convert(a.src, a.dst, to=a.to)
        print(f"wrote {out}")
    return run


@command("tokenizer", "train a byte-level BPE tokenizer on local text")
def _tokenizer(p: argparse.ArgumentParser):
    p.add_argument("action", choices=["train"])
    add_corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True, help="where to write tokenizer.json")

    def run(a):
        from .tokenizer import train_tokenizer
        tok = train_tokenizer(corpus_paths(a), a.vocab_size, Path(a.out))
        print(f"wrote {a.out} ({tok.vocab_size} tokens)")
    return run


@command("data", "tokenize local text into memory-mapped train/val shards")
def _data(p: argparse.ArgumentParser):
    p.add_argument("action", choices=["prepare"])
    add_corpus_args(p)
    p.add_argument("--out", required=True, help="output directory for shards + meta.json")
    p.add_argument("--tokenizer", help="tokenizer.json (default: bundled)")
    p.add_argument("--val-fraction", type=float, default=0.01)

    def run(a):
        from .data import prepare_shards
        from .tokenizer import Tokenizer, default_tokenizer
        tok = Tokenizer.from_file(a.tokenizer) if a.tokenizer else default_tokenizer()
        meta = prepare_shards(corpus_paths(a), tok, a.out, val_fraction=a.val_fraction)
        print(f"wrote {a.out}: {meta}")
    return run


@command("train", "train a model on local text (progress, checkpoints, resume, DDP/FSDP2 under torchrun)")
def _train(p: argparse.ArgumentParser):
    from .training import TrainConfig
    add_dataclass_args(p, TrainConfig)

    def run(a):
        from .training import TrainConfig, TrainingDiverged, train
        try:
            s = train(dataclass_from_args(TrainConfig, a))
        except TrainingDiverged as e:
            raise ValueError(str(e)) from None
        if s is not None and s.get("run_dir"):
            print(f"done: step {s['step']}, train loss {s['train_loss']}, val loss {s['val_loss']}, "
                  f"{s['tokens']:,} tokens -> {s['run_dir']}")
    return run


@command("eval", "validation loss and perplexity of a model on prepared token shards")
def _eval(p: argparse.ArgumentParser):
    add_model_source(p)
    p.add_argument("--data", required=True, help="prepared shard directory (hybridlm data prepare)")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=50, help="at most this many batches")
    p.add_argument("--device", default="auto")

    def run(a):
        import math

        from .data import TokenDataset
        from .distributed import DistEnv
        from .training import evaluate
        model = load_model_from(a)
        data = TokenDataset(a.data, split=a.split)
        if data.vocab_size and data.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"data was tokenized with {data.vocab_size} tokens, the model has {model.cfg.vocab_size}")
        env = DistEnv("none", 0, 1, 0, model.lm_head.weight.device, False)
        loss = evaluate(model, data, a.batch_size, a.seq_len, a.batches, env)
        print(f"{a.split} loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}")
    return run


@command("report", "write report.html (loss curves, lr, throughput, samples) for a training run")
def _report(p: argparse.ArgumentParser):
    p.add_argument("run_dir", help="the training run directory (holds metrics.jsonl)")
    p.add_argument("--prompt", action="append", help="prompts for the sample generations (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=60)

    def run(a):
        from .report import sample_run, write_report
        prompts = a.prompt or ["In the beginning", "And it came to pass"]
        print(f"wrote {write_report(a.run_dir, sample_run(a.run_dir, prompts, a.max_new_tokens))}")
    return run


# ---- low-precision training: quant-inspect -------------------------------------


# ---- training stability: sweep-lr ------------------------------------------------


# ---- compression: prune, distill, plan -------------------------------------------


# ---- serving: serve --------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridlm", description="Hybrid Mamba-2 / Transformer language models: build, train, "
        "compress and serve (Nemotron-H family).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, make in COMMANDS.items():
        p = sub.add_parser(name, help=make.help, description=make.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(run=make(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
