"""The `hybridlm` command line: one sub-command per job.

    hybridlm info --preset nemotron-h-8b
    hybridlm tokenizer train --data corpus/ --vocab-size 4096 --out tok.json
    hybridlm data prepare --data corpus/ --out data/
    hybridlm train --model tiny --data data/ --out runs/x
    hybridlm generate --ckpt runs/x/final --prompt "In the beginning"
    hybridlm eval --ckpt runs/x/final --data data/
    hybridlm eval --ckpt runs/sft/final --tasks hybridlm_reasoning,hybridlm_kjv_verses
    hybridlm sft --model runs/x/final --data chats.jsonl --out runs/sft
    hybridlm report runs/x
    hybridlm convert SRC DST --to hf
    hybridlm train --precision nvfp4 --high-precision-layers first:1,last:4 --out runs/fp4
    hybridlm quant-inspect --ckpt runs/x/final
    hybridlm sweep-lr --lrs 1e-2,3e-2,1e-1 --out runs/sweep
    hybridlm prune --ckpt runs/x/final --data data/ --target-params 0.7x --out runs/pruned
    hybridlm distill --teacher runs/x/final --student runs/pruned --out runs/kd
    hybridlm plan --preset nemotron-nano-12b-v2 --gpu-mem 22GiB --search
    hybridlm serve --ckpt runs/x/final --port 8000

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
    """Trailing `# comments` of dataclass fields (a subclass's own comments win), used as --help text."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        comments.update({m.group(1): m.group(2).strip()
                         for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M)})
    return comments


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of dataclass `cls` (bools take an optional true/false; a field's
    ``metadata["choices"]`` limits its values)."""
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
        help_text = (f.metadata.get("help") or comments.get(f.name, "")).replace("%", "%%")  # argparse formats help
        flag = "--" + f.name.replace("_", "-")
        if base is bool:
            parser.add_argument(flag, type=_parse_bool, nargs="?", const=True, default=default,
                                help=help_text)
        elif base in (int, float, str):
            parser.add_argument(flag, type=base, default=default, help=help_text, choices=f.metadata.get("choices"))
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


def add_compile_flag(p: argparse.ArgumentParser, what: str = "the decode step") -> None:
    p.add_argument("--compile", action="store_true",
                   help=f"torch.compile {what} (inductor; CUDA graphs for decoding on CUDA). The compile time "
                        "is printed on stderr; if compiling fails, a warning says why and it runs eagerly")


def show_compile_log() -> None:
    """Print `hybridlm.model.compiled`'s messages (the compile time) on stderr."""
    import logging

    class ToStderr(logging.Handler):  # looks sys.stderr up at each message (it may be replaced)
        def emit(self, record: logging.LogRecord) -> None:
            print(record.getMessage(), file=sys.stderr, flush=True)
    logger = logging.getLogger("hybridlm.model.compiled")
    if not any(type(h).__name__ == "ToStderr" for h in logger.handlers):
        logger.addHandler(ToStderr())
    logger.setLevel(logging.INFO)


def load_config_from(args: argparse.Namespace):
    from .config import HybridConfig, preset
    if args.preset:
        return preset(args.preset)
    if args.config:
        return HybridConfig.load(args.config)
    if args.ckpt:
        from .interop.checkpoint import read_config
        return read_config(args.ckpt)
    from .interop.hf_config import read_hf_config
    return read_hf_config(args.hf)


def load_model_from(args: argparse.Namespace):
    import torch
    device = resolve_device(getattr(args, "device", "auto"))
    if args.ckpt or args.hf:  # either format; compressed-tensors NVFP4 / FP8 directories are dequantized
        from .interop.convert import load
        return load(args.ckpt or args.hf, device=device)
    from .model.lm import HybridLM
    torch.manual_seed(getattr(args, "seed", 0) or 0)
    return HybridLM(load_config_from(args)).to(device).eval()


def model_source(args: argparse.Namespace) -> str:
    """The --ckpt / --hf / --preset / --config value, for messages and provenance."""
    return args.ckpt or args.hf or args.preset or args.config


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", action="append", help="text/jsonl file or directory (repeatable; default: bundled corpus)")


def corpus_paths(args: argparse.Namespace) -> list:
    """The --data paths, or the bundled corpus."""
    from .training.corpus import default_corpus_path
    return args.data or [default_corpus_path()]


def resolve_device(name: str | None) -> str:
    import torch
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    return name


def load_tokenizer_for(args: argparse.Namespace):
    """--tokenizer, else the checkpoint's tokenizer.json, else the bundled one; the chat template is
    --chat-template, else the tokenizer's, else the checkpoint directory's (if any)."""
    from .interop.chat_template import load_chat_template, read_chat_template_file
    from .training.tokenizer import Tokenizer, default_tokenizer
    dirs = [Path(d) for d in (args.ckpt, args.hf) if d]
    if getattr(args, "tokenizer", None):
        tok = Tokenizer.from_file(args.tokenizer)
    else:
        found = [d / "tokenizer.json" for d in dirs if (d / "tokenizer.json").is_file()]
        tok = Tokenizer.from_file(found[0]) if found else default_tokenizer()
    template = read_chat_template_file(args.chat_template) if getattr(args, "chat_template", None) else None
    for d in dirs:
        template = template or tok.chat_template or (load_chat_template(d) if d.is_dir() else None)
    if template is not None:
        tok = Tokenizer(tok.backend, tok.eos_token, chat_template=template)
    return tok


def run_training(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` (train, sft, distill), a diverged run ending in one `error:` line like any bad input."""
    from .training.divergence import TrainingDiverged
    try:
        return fn(*args)
    except TrainingDiverged as e:
        raise ValueError(str(e)) from None


# ---- commands -------------------------------------------------------------------
@command("info", "parameter count and inference memory of a model")
def _info(p: argparse.ArgumentParser):
    add_model_source(p)
    p.add_argument("--contexts", default="4096,32768,131072", help="comma-separated context lengths")
    p.add_argument("--batch", type=int, default=1, help="sequences held in the cache")
    p.add_argument("--dtype", default="bf16", help="weight dtype: fp32, bf16, fp8, nvfp4")

    def run(a):
        from .model.info import format_info
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
    add_compile_flag(p)

    def run(a):
        from .serve.generation import generate_text
        from .serve.sampling import SamplingParams
        show_compile_log()
        model, tok = load_model_from(a), load_tokenizer_for(a)
        if tok.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
        params = SamplingParams(a.max_new_tokens, a.temperature, a.top_k, a.top_p, a.seed)
        for prompt, text in zip(a.prompt, generate_text(model, tok, a.prompt, params, compile=a.compile)):
            print(prompt + text)
            print("-" * 40)
    return run


@command("convert", "convert between hybridlm checkpoints and Hugging Face Nemotron-H directories, or to GGUF "
                    "for llama.cpp")
def _convert(p: argparse.ArgumentParser):
    p.add_argument("src", help="source directory (format detected from its config.json)")
    p.add_argument("dst", help="destination directory (gguf: a .gguf file, or a directory for model-<dtype>.gguf)")
    p.add_argument("--to", choices=["hf", "hybridlm", "gguf"], default=None,
                   help="target format (default: the other one of hf / hybridlm)")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], default=None,
                   help="cast the weights (default: keep the stored dtype)")

    def run(a):
        from .interop.convert import convert
        dtype = a.dtype
        if dtype is not None and a.to != "gguf":
            import torch
            dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
        out = convert(a.src, a.dst, to=a.to, dtype=dtype)
        print(f"wrote {out}")
    return run


@command("quantize", "post-training quantization to NVFP4 or FP8, written as a compressed-tensors checkpoint "
                     "(what vLLM loads)")
def _quantize(p: argparse.ArgumentParser):
    p.add_argument("--ckpt", help="source checkpoint: ours or a Hugging Face Nemotron-H directory")
    p.add_argument("--hf", help="same as --ckpt (a Hugging Face directory)")
    p.add_argument("--out", required=True, help="output directory (a Hugging Face directory with quantization_config)")
    p.add_argument("--format", choices=["nvfp4", "fp8"], default=None,
                   help="nvfp4: E2M1 + E4M3 scale per 16 + FP32 global; fp8: E4M3 (default: nvfp4, or the "
                        "--trained-precision format)")
    p.add_argument("--calib", help="prepared token shards (`hybridlm data prepare`) for the activation scales; "
                   "without it: NVFP4 weight-only (W4A16), FP8 dynamic per-token activations")
    p.add_argument("--calib-seqs", type=int, default=64, help="calibration sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")
    p.add_argument("--fp8-granularity", choices=["tensor", "channel"], default="tensor",
                   help="FP8 weight scales: one per tensor or one per output channel")
    p.add_argument("--high-precision-layers", default="auto",
                   help="blocks kept in BF16: auto (the papers' choice), none, first:N,last:M, or indices i,j")
    p.add_argument("--trained-precision", metavar="RECIPE",
                   help="the source was trained with --precision RECIPE (nvfp4, nvfp4-no-2d, fp8): export the "
                        "weights its forward used")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the tensors that stay dense (default: the source's)")
    p.add_argument("--device", default="auto")

    def run(a):
        src = a.ckpt or a.hf
        if not src:
            raise ValueError("give the source checkpoint with --ckpt DIR (or --hf DIR)")
        for flag in ("calib_seqs", "seq_len", "batch_size"):
            if getattr(a, flag) < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
        import torch
        from .compress.quantize import quantize_checkpoint
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, None: None}[a.dtype]
        r = quantize_checkpoint(src, a.out, fmt=a.format, calib=a.calib, high_precision_layers=a.high_precision_layers,
                                fp8_granularity=a.fp8_granularity, recipe=a.trained_precision, dtype=dtype,
                                calib_seqs=a.calib_seqs, seq_len=a.seq_len, batch_size=a.batch_size,
                                device=str(resolve_device(a.device)))
        print(r.summary())
    return run


@command("tokenizer", "train a byte-level BPE tokenizer on local text")
def _tokenizer(p: argparse.ArgumentParser):
    p.add_argument("action", choices=["train"])
    add_corpus_args(p)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--out", required=True, help="where to write tokenizer.json")

    def run(a):
        from .training.tokenizer import train_tokenizer
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
        from .training.shards import prepare_shards
        from .training.tokenizer import Tokenizer, default_tokenizer
        tok = Tokenizer.from_file(a.tokenizer) if a.tokenizer else default_tokenizer()
        meta = prepare_shards(corpus_paths(a), tok, a.out, val_fraction=a.val_fraction)
        print(f"wrote {a.out}: {meta}")
    return run


@command("train", "train a model on local text (progress, checkpoints, resume, DDP/FSDP2 under torchrun)")
def _train(p: argparse.ArgumentParser):
    from .training.train_config import TrainConfig
    add_dataclass_args(p, TrainConfig)

    def run(a):
        from .training.loop import train
        s = run_training(train, dataclass_from_args(TrainConfig, a))
        if s is not None and s.get("run_dir"):
            print(f"done: step {s['step']}, train loss {s['train_loss']}, val loss {s['val_loss']}, "
                  f"{s['tokens']:,} tokens -> {s['run_dir']}")
    return run


@command("sft", "fine-tune a checkpoint on chat JSONL (loss on assistant tokens only, <think> reasoning, packing "
                "with document boundaries, new special tokens; resume, DDP/FSDP2 under torchrun)")
def _sft(p: argparse.ArgumentParser):
    from .training.sft import SFTConfig
    add_dataclass_args(p, SFTConfig, skip=("init_from",))  # the base checkpoint is --model

    def run(a):
        from .training.sft import sft
        s = run_training(sft, dataclass_from_args(SFTConfig, a))
        if s is not None and s.get("run_dir"):
            info = s["sft"]
            print(f"done: step {s['step']}, train loss {s['train_loss']}, val loss {s['val_loss']}; "
                  f"{info['packed']['samples']:,} conversations, {info['packed']['trained_tokens']:,} trained "
                  f"tokens, added {info['added_tokens'] or 'no'} tokens -> {s['run_dir']}/final")
    return run


@command("eval", "validation loss / perplexity on token shards (--data), or lm-evaluation-harness tasks (--tasks)")
def _eval(p: argparse.ArgumentParser):
    add_model_source(p)
    p.add_argument("--data", help="prepared shard directory (hybridlm data prepare): loss and perplexity")
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=50, help="at most this many batches")
    p.add_argument("--documents", type=_parse_bool, nargs="?", const=True, default=True,
                   help="--data: use the data's document boundaries (false: one token stream)")
    p.add_argument("--tasks", help="lm-eval tasks, comma-separated: hybridlm_kjv_verses, hybridlm_reasoning, any "
                                   "installed lm-eval task (its dataset cached for offline use), or one of --include-path")
    p.add_argument("--include-path", action="append", help="a directory of lm-eval task YAMLs (repeatable)")
    p.add_argument("--limit", type=float, default=None, help="documents per task (below 1: a fraction of them)")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--max-gen-toks", type=int, default=None, help="generation limit of generate_until tasks "
                                                                  "(default: the task's)")
    p.add_argument("--thinking-budget", type=int, default=None, help="close <think> after this many tokens")
    p.add_argument("--no-think", action="store_true", help="chat prompts get the system message /no_think "
                                                           "instead of /think")
    p.add_argument("--chat", choices=["auto", "all", "none"], default="auto",
                   help="render prompts with the chat template: for the chat tasks only (auto), all tasks, none")
    p.add_argument("--metadata", help='JSON object given to every task, e.g. \'{"kjv_books": "Genesis"}\'')
    p.add_argument("--tokenizer", help="tokenizer.json (default: beside the checkpoint, else bundled)")
    p.add_argument("--chat-template", help="a .jinja file, tokenizer_config.json or directory (default: the "
                                           "checkpoint's, else the bundled SFT template)")
    p.add_argument("--output", help="--tasks: write lm-eval's results JSON here")
    p.add_argument("--device", default="auto")
    add_compile_flag(p, "the forward (--data) / the decode step (--tasks)")

    def run(a):
        if bool(a.data) == bool(a.tasks):
            raise ValueError("give one of --data (loss and perplexity) and --tasks (lm-eval tasks)")
        return _eval_tasks(a) if a.tasks else _eval_loss(a)
    return run


def _eval_loss(a: argparse.Namespace) -> None:
    """`hybridlm eval --data`: mean loss and perplexity over token shards or packed SFT data."""
    import math

    from .training.distributed import DistEnv
    from .training.loop import evaluate
    from .training.packing import open_dataset
    model = load_model_from(a)
    data = open_dataset(a.data, a.split)
    data.check_vocab(model.cfg.vocab_size)
    if a.compile:
        from .model.compiled import compile_forward
        show_compile_log()
        compile_forward(model)
    loss = evaluate(model, data, a.batch_size, a.seq_len, a.batches, DistEnv.single(model.lm_head.weight.device),
                    documents=a.documents)
    print(f"{a.split} loss {loss:.4f} nats/token, perplexity {math.exp(loss):.2f}")


def _eval_tasks(a: argparse.Namespace) -> None:
    """`hybridlm eval --tasks`: lm-eval tasks on the model in this process; prints lm-eval's table."""
    import json

    from .evaluation import evaluate_tasks, results_table
    try:
        metadata = json.loads(a.metadata) if a.metadata else None
    except ValueError as err:
        raise ValueError(f"--metadata is not valid JSON: {err}") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError("--metadata must be a JSON object")
    if a.compile:
        show_compile_log()
    gen = {k: v for k, v in (("max_gen_toks", a.max_gen_toks), ("thinking_budget", a.thinking_budget))
           if v is not None}
    limit = None if a.limit is None else int(a.limit) if a.limit >= 1 else a.limit
    results = evaluate_tasks(load_model_from(a), load_tokenizer_for(a), a.tasks, include_path=a.include_path,
                             limit=limit, num_fewshot=a.num_fewshot, batch_size=a.batch_size, gen_kwargs=gen or None,
                             apply_chat_template={"auto": None, "all": True, "none": False}[a.chat],
                             thinking=not a.no_think, metadata=metadata, compile=a.compile)
    print(results_table(results))
    if a.output:
        out = Path(a.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {out}")


@command("report", "write report.html (loss curves, lr, throughput, samples) for a training run")
def _report(p: argparse.ArgumentParser):
    p.add_argument("run_dir", help="the training run directory (holds metrics.jsonl)")
    p.add_argument("--prompt", action="append", help="prompts for the sample generations (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=60)

    def run(a):
        from .training.report import sample_run, write_report
        prompts = a.prompt or ["In the beginning", "And it came to pass"]
        print(f"wrote {write_report(a.run_dir, sample_run(a.run_dir, prompts, a.max_new_tokens))}")
    return run


# ---- low-precision training: quant-inspect -------------------------------------
@command("quant-inspect", "what FP8 / NVFP4 quantization does to a weight or a synthetic tensor "
         "(block scales, clipped / flushed fractions, error)")
def _quant_inspect(p: argparse.ArgumentParser):
    from .lowp.inspection import DISTRIBUTIONS
    add_model_source(p, required=False)
    p.add_argument("--tensor", help="parameter name, e.g. backbone.layers.0.mixer.in_proj.weight "
                   "(default with a model: a summary line for every block linear weight)")
    p.add_argument("--random", metavar="ROWSxCOLS", help="inspect a synthetic tensor of this shape instead")
    p.add_argument("--dist", default="normal", choices=DISTRIBUTIONS,
                   help="distribution of --random (student-t: heavy tails, df=3)")
    p.add_argument("--format", default="nvfp4", choices=["fp8", "nvfp4"])
    p.add_argument("--block", default="auto", choices=["auto", "1x16", "16x16"],
                   help="nvfp4 block shape (auto: 16x16 for weights, as in training; 1x16 for --random)")
    p.add_argument("--rht", action="store_true", help="apply the 16x16 random Hadamard transform first")
    p.add_argument("--seed", type=int, default=0, help="seed of --random, --rht signs and --preset weights")
    p.add_argument("--plot", help="also write a histogram PNG here")

    def run(a):
        from .lowp.inspection import model_weights, plot_inspect, quant_inspect, random_tensor, summary_table
        from .lowp.nvfp4 import apply_rht
        model_given = any(getattr(a, k) for k in ("ckpt", "hf", "preset", "config"))
        if model_given == bool(a.random):
            raise ValueError("give exactly one of a model (--ckpt/--hf/--preset/--config) or --random ROWSxCOLS")
        block = {"auto": "1x16" if a.random else "16x16"}.get(a.block, a.block)
        block_t = tuple(int(v) for v in block.split("x"))
        rht = a.seed if a.rht else None
        if a.random:
            tensors = dict([random_tensor(a.random, a.dist, a.seed)])
        else:
            a.device = "cpu"
            tensors = model_weights(load_model_from(a), a.tensor)
        if len(tensors) == 1:
            (name, x), = tensors.items()
            report, deq = quant_inspect(x, a.format, block_t, rht, name=name)
            print(report.format_text())
            if a.plot:  # with --rht, deq is of the transformed tensor: compare it with that
                shown = x if rht is None else apply_rht(x.detach().float(), rht, -1)
                print(f"wrote {plot_inspect(shown, deq, report, a.plot)}")
            return
        print(summary_table(tensors, a.format, block_t, rht))
        print(f"format {a.format}" + (f" {block}" if a.format == "nvfp4" else "") + (" +RHT" if a.rht else "")
              + "; --tensor NAME for block scales and value usage of one weight")
    return run


# ---- training stability: sweep-lr ------------------------------------------------
@command("sweep-lr", "train one model per stability variant x learning rate; table + plot of final loss vs LR")
def _sweep_lr(p: argparse.ArgumentParser):
    from .training.sweep import VARIANTS
    from .training.train_config import TrainConfig
    p.add_argument("--out", default="runs/sweep-lr", help="sweep directory (one sub-directory per run; "
                   "finished runs are skipped when the sweep is re-run)")
    p.add_argument("--variants", default="qk_norm,qk_post_norm,qkv_norm,qk_norm_softcap",
                   help=f"comma-separated stability variants, from: {', '.join(VARIANTS)}")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="comma-separated peak learning rates")
    p.add_argument("--softcap", type=float, default=30.0, help="logit cap of the qk_norm_softcap variant")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR of each run = ratio x its peak LR")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    add_dataclass_args(p, TrainConfig, skip=("out", "lr", "min_lr", "resume", "stop_at", "progress"))
    p.set_defaults(steps=300, warmup_steps=30, eval_every=0, save_every=0, diverge_factor=3.0, monitor_every=10)

    def run(a):
        import torch

        from .training.sweep import parse_list, sweep_lr
        if a.threads:
            torch.set_num_threads(a.threads)
        rows = sweep_lr(dataclass_from_args(TrainConfig, a), a.out, parse_list(a.variants, "--variants"),
                        parse_list(a.lrs, "--lrs", float), a.softcap, a.min_lr_ratio)
        print((Path(a.out) / "results.md").read_text(), end="")
        print(f"wrote {Path(a.out) / 'results.csv'}, {Path(a.out) / 'loss_vs_lr.png'} ({len(rows)} runs)")
    return run



# ---- compression: prune, distill, plan -------------------------------------------
@command("prune", "Minitron-style width/depth pruning from calibration activations (writes a checkpoint)")
def _prune(p: argparse.ArgumentParser):
    from .compress.pipeline import PruneConfig
    add_model_source(p)
    p.add_argument("--out", required=True, help="directory for the pruned checkpoint")
    p.add_argument("--data", help="prepared shard directory for the calibration set (not needed with --importance)")
    add_dataclass_args(p, PruneConfig)
    p.add_argument("--device", default="auto")

    def run(a):
        from .compress.pipeline import prune
        config = dataclass_from_args(PruneConfig, a)  # flag combinations are checked before any work
        src = model_source(a)
        r = prune(load_model_from(a), a.out, config, data=a.data, source=src)
        c = r.model.cfg
        print(f"pruned {r.params_before:,} -> {r.params_after:,} parameters ({r.params_after / r.params_before:.1%}): "
              f"pattern {c.pattern}, d_model {c.d_model}, ffn {c.ffn_dim}, mamba heads {c.mamba_heads}, heads "
              f"{c.n_heads}/{c.n_kv_heads}")
        if r.kl is not None:
            print(f"calibration KL(original || pruned) {r.kl:.4f} nats/token")
        print(f"wrote {r.out} (distill it: hybridlm distill --teacher {src} --student {r.out} --out RUN)")
    return run


@command("distill", "knowledge distillation (forward KL on logits) of a student from a teacher, with the training loop")
def _distill(p: argparse.ArgumentParser):
    from .compress.distill import DistillConfig
    from .training.train_config import TrainConfig
    p.add_argument("--student", required=True, help="student checkpoint directory (e.g. the output of prune)")
    add_dataclass_args(p, DistillConfig)
    add_dataclass_args(p, TrainConfig, skip=("model", "init_from"))

    def run(a):
        from .compress.distill import distill
        from .interop.checkpoint import read_config
        read_config(a.student)  # clear error for a missing or foreign student directory
        tc = dataclass_from_args(TrainConfig, a, model=a.student, init_from=a.student)
        s = run_training(distill, tc, dataclass_from_args(DistillConfig, a))
        print(f"done: step {s['step']}, train loss (KD objective) {s['train_loss']}, val LM loss {s['val_loss']}, "
              f"{s['tokens']:,} tokens -> {s['run_dir']}")
    return run


@command("plan", "inference memory plan: weights, KV cache, Mamba state, activations, longest context; "
                 "and a search over pruned shapes that fit")
def _plan(p: argparse.ArgumentParser):
    add_model_source(p)
    p.add_argument("--gpu-mem", default="22GiB", help="GPU memory budget (22GiB, 80GB, ...)")
    p.add_argument("--reserve", default=None, help="memory kept back for the framework / CUDA context, e.g. 1GiB")
    p.add_argument("--context", type=int, default=131072, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences served together")
    p.add_argument("--dtype", default="bf16", help="weight dtype: fp32, bf16, fp8, nvfp4")
    p.add_argument("--prefill-chunk", type=int, default=2048, help="tokens per prefill chunk (activation estimate)")
    p.add_argument("--search", action="store_true", help="search pruned shapes (layers, d_model, ffn, mamba heads) "
                   "that fit, best retained importance first")
    p.add_argument("--importance", help="importance.json (from prune) to rank the candidates; without it every unit counts the same")
    p.add_argument("--axes", default="both", choices=["width", "depth", "both", "mixed"],
                   help="what the search may prune (both: either or both; mixed: both at once)")
    p.add_argument("--top", type=int, default=5, help="candidates to list")

    def run(a):
        from .compress.importance import Importance
        from .compress.planner import describe_spec, format_plan, parse_bytes, search_architecture
        from .model.info import human_bytes
        cfg = load_config_from(a)
        budget = parse_bytes(a.gpu_mem) - (parse_bytes(a.reserve) if a.reserve else 0)
        if budget <= 0:
            raise ValueError(f"--reserve {a.reserve} leaves nothing of --gpu-mem {a.gpu_mem}")
        name = model_source(a)
        print(format_plan(cfg, name, budget, a.context, a.batch, a.dtype, a.prefill_chunk))
        if not a.search:
            return
        imp = Importance.load(a.importance) if a.importance else None  # checked against cfg by the search
        rows = search_architecture(cfg, budget, a.context, a.batch, a.dtype, imp, a.axes, a.prefill_chunk,
                                   a.top, progress=True)
        if not rows:
            raise ValueError(f"no pruned shape on axes {a.axes!r} serves {a.batch} x {a.context:,} tokens "
                             f"in {human_bytes(budget)}")
        print(f"\nbest pruned shapes that fit ({'importance' if imp else 'kept fraction'} score, higher is better):")
        for r in rows:
            print(f"  score {r['score']:.3f}  {r['plan'].params / 1e9:.3f} B  total {human_bytes(r['plan'].total)}  "
                  f"{describe_spec(cfg, r['spec'])}")
    return run


# ---- serving: serve --------------------------------------------------------------
@command("serve", "OpenAI-compatible HTTP server with continuous batching (/v1/completions, /v1/chat/completions)")
def _serve(p: argparse.ArgumentParser):
    add_model_source(p)
    p.add_argument("--tokenizer", help="tokenizer.json; if absent, the one beside the checkpoint, else the bundled one")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the `model` clients must send; if absent, the checkpoint directory's name")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + max_tokens limit per request; if absent, the config's max_seq_len")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (slots)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; more get HTTP 429")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger request bodies get HTTP 413")
    p.add_argument("--default-max-tokens", type=int, default=256, help="chat completions without max_tokens")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill forward call")
    p.add_argument("--prefill-budget", type=int, default=512,
                   help="prompt tokens prefilled between two decode steps (longer prompts take several steps, "
                        "so running streams never stall for a whole prefill)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; if absent, torch's choice")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--chat-template", help="a Jinja chat template (.jinja, or a tokenizer_config.json); if absent, "
                   "the checkpoint's, else a plain 'Role: text' template")
    p.add_argument("--reasoning-parser", metavar="NAME",
                   help="split <think>...</think> of chat answers into reasoning_content (vLLM's field): "
                        "think, deepseek_r1, qwen3 or nemotron (all the same <think> format)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health and /docs "
                   "(default: $HYBRIDLM_API_KEY if set, else no key)")
    p.add_argument("--allowed-origins", nargs="+", metavar="ORIGIN",
                   help="browser origins allowed by CORS, e.g. http://localhost:3000 or '*' (default: none)")
    add_compile_flag(p)

    def run(a):
        for flag in ("port", "max_batch", "max_request_bytes", "default_max_tokens", "prefill_chunk",
                     "prefill_budget"):
            if getattr(a, flag) < (0 if flag == "port" else 1):
                raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(a, flag)}")
        if a.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0, got {a.max_queue}")
        import torch
        if a.threads:
            torch.set_num_threads(a.threads)
        model, tok = load_model_from(a), load_tokenizer_for(a)
        from .serve.app import ServerSettings, create_app, serve
        from .serve.engine import Engine
        show_compile_log()
        name = a.model_name or Path(model_source(a)).name.removesuffix(".json")
        engine = Engine(model, tok, max_batch=a.max_batch, max_queue=a.max_queue, max_model_len=a.max_model_len,
                        prefill_chunk=a.prefill_chunk, prefill_tokens_per_step=a.prefill_budget,
                        compile=a.compile)
        from .serve.reasoning import reasoning_parser
        from .serve.security import api_key_from
        settings = ServerSettings(model_name=name, max_request_bytes=a.max_request_bytes,
                                  default_max_tokens=a.default_max_tokens, api_key=api_key_from(a.api_key),
                                  allowed_origins=a.allowed_origins,
                                  reasoning_tags=reasoning_parser(a.reasoning_parser) if a.reasoning_parser else None)
        app = create_app(engine, tok, settings)
        template = "its chat template" if tok.chat_template else "the plain chat template"
        print(f"serving {name!r} ({model.num_params():,} params, context {engine.max_model_len}, {template}"
              f"{', API key required' if settings.api_key else ''}) on http://{a.host}:{a.port}/v1", flush=True)
        serve(app, a.host, a.port, a.log_level)
    return run


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` only where there is a default worth reading (not None / off / empty)."""

    @staticmethod
    def _worth_showing(default: Any) -> bool:
        return not (default is None or default is False or default == "" or default is argparse.SUPPRESS)

    def _get_help_string(self, action: argparse.Action) -> str:
        if not self._worth_showing(action.default) or isinstance(action, argparse._StoreTrueAction):
            return action.help or ""
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and self._worth_showing(action.default):
            action.help = "(default: %(default)s)"  # argparse lists no default for a flag without help
        return super()._format_action(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hybridlm", description="Hybrid Mamba-2 / Transformer language models: build, train, "
        "compress and serve (Nemotron-H family).",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, make in COMMANDS.items():
        p = sub.add_parser(name, help=make.help, description=make.help,
                           formatter_class=_HelpFormatter)
        p.set_defaults(run=make(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError) as e:
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
