"""Helpers of `bench_peers.py`: the shared checkpoint, the GGUF conversion, llama.cpp runs, engine runners.

* `model_config` / `prepare_checkpoint`: one random-init checkpoint per model (fixed seed),
  saved once as hybridlm (`save_model`), exported with `hybridlm convert` to a Hugging Face
  Nemotron-H directory, and converted by llama.cpp's own `convert_hf_to_gguf.py` to GGUF
  F32; everything cached under ``runs/peers/<model>-<hash>/``.
* The converter is run by this file (``python _peers.py gguf TREE HF_DIR OUT``): it imports
  llama.cpp's converter and patches two things from outside: the BPE pre-tokenizer detection,
  when it fails (our byte-level BPE uses GPT-2's regex: ``"gpt-2"``), and the config it reads
  (`_dense_nemotron_h`: without it a dense model converts as ``nemotron_h_moe`` with no MLPs).
  No llama.cpp code is copied here.
* `find_llama` / `llama_bench_cell`: llama.cpp's own benchmarks, ``llama-bench`` (one
  sequence: prefill from an empty context with ``-p C``; decode with ``-n STEPS -d C``, i.e.
  after C tokens are already in the context) and, when it is there, ``llama-batched-bench``
  for batch > 1.
* `HybridRunner` (hybridlm's fixed-shape `Decoder`, eager or compiled) and `TransformersRunner`
  (`NemotronHForCausalLM`, its pure-PyTorch path): ``prefill(ids) -> last logits`` and
  ``step(tokens) -> logits``, timed by `bench_peers.py --worker`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from hybridlm.config import HybridConfig

ROOT = Path(__file__).resolve().parents[1]
LLAMA_BINARIES = ("llama-bench", "llama-batched-bench", "llama-cli", "llama-completion")
TOKENIZER_CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "model_max_length": 1 << 20, "add_bos_token": False}


class EngineUnavailable(RuntimeError):
    """An engine that cannot run here (missing binary, missing module): its column is skipped."""


# ---- the models ---------------------------------------------------------------------------
def model_config(name: str, max_seq_len: int) -> HybridConfig:
    """`name` is a hybridlm preset or ``medium`` (about 41M parameters, 4 groups of ``M-M-*-``)."""
    from hybridlm.config import PRESETS, preset
    if name == "medium":  # tiny's layout x 4 groups, 4 Mamba groups, 4 KV heads
        return preset("tiny", d_model=512, pattern="M-M-*-" * 4, n_heads=8, n_kv_heads=4, head_dim=64,
                      ffn_dim=1536, ssm_state=64, mamba_head_dim=64, n_groups=4, max_seq_len=max_seq_len)
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}: use 'medium' or a preset from {sorted(PRESETS)}")
    return preset(name, max_seq_len=max(max_seq_len, PRESETS[name].get("max_seq_len", 0)))


def _digest(cfg: HybridConfig, seed: int) -> str:
    return hashlib.sha256(json.dumps([cfg.to_dict(), seed], sort_keys=True).encode()).hexdigest()[:10]


def prepare_checkpoint(name: str, cfg: HybridConfig, seed: int, root: Path) -> dict[str, Path]:
    """The hybridlm and HF directories of `cfg` with random weights of `seed` (made once, cached)."""
    import torch
    from hybridlm import HybridLM, save_model
    from hybridlm.interop.convert import convert
    from hybridlm.training.tokenizer import DEFAULT_TOKENIZER_PATH
    base = root / f"{name}-{_digest(cfg, seed)}"
    paths = {"dir": base, "hybridlm": base / "hybridlm", "hf": base / "hf", "gguf": base / "model-f32.gguf"}
    if (base / "READY").is_file():
        return paths
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    shutil.rmtree(base, ignore_errors=True)
    save_model(model, paths["hybridlm"])
    shutil.copyfile(DEFAULT_TOKENIZER_PATH, paths["hybridlm"] / "tokenizer.json")
    (paths["hybridlm"] / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    convert(paths["hybridlm"], paths["hf"], to="hf")  # what `hybridlm convert SRC DST --to hf` does
    (base / "READY").write_text("ok\n")
    return paths


# ---- llama.cpp: finding it, converting to GGUF --------------------------------------------
def find_llama(bin_dir: str | None) -> tuple[dict[str, Path], str]:
    """The llama.cpp binaries found (name -> path) and a line saying where they were looked for."""
    bin_dir = bin_dir or os.environ.get("LLAMA_CPP_BIN")
    found: dict[str, Path] = {}
    for name in LLAMA_BINARIES:
        path = Path(bin_dir) / name if bin_dir else (Path(p) if (p := shutil.which(name)) else None)
        if path is not None and path.is_file() and os.access(path, os.X_OK):
            found[name] = path
    where = f"--llama-bin-dir {bin_dir}" if bin_dir else "PATH (no --llama-bin-dir, no LLAMA_CPP_BIN)"
    return found, where


def find_llama_tree(tree: str | None, bins: dict[str, Path]) -> Path | None:
    """The llama.cpp source tree holding convert_hf_to_gguf.py: `tree`, or two levels above the binaries."""
    candidates = [Path(tree)] if tree else []
    candidates += [p.resolve().parents[2] for p in bins.values() if len(p.resolve().parents) > 2]
    return next((c for c in candidates if (c / "convert_hf_to_gguf.py").is_file()), None)


def convert_to_gguf(tree: Path, hf_dir: Path, out: Path, timeout: float = 1800) -> str | None:
    """Run llama.cpp's converter (F32) in its own process; None on success, else the reason."""
    if out.is_file():
        return None
    log = out.with_suffix(".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "gguf", str(tree), str(hf_dir), str(out)]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        return f"convert_hf_to_gguf.py failed (exit {proc.returncode}, log {log}): " + " | ".join(tail)
    return None


def _dense_nemotron_h(hparams: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """Undo what transformers 5's `AutoConfig(...).to_dict()` does to a dense Nemotron-H config for this converter.

    That dict carries the MoE defaults (``num_experts_per_tok``, ``n_routed_experts``, ...), from
    which the converter infers the ``nemotron_h_moe`` architecture or writes an expert count
    that llama.cpp then refuses for a dense model, and has no ``hybrid_override_pattern``, only a
    ``layers_block_type`` list in which it counts ``"moe"`` but not ``"mlp"`` layers as MLPs (so
    every MLP layer would get feed_forward_length 0). Back to the file's own pattern string,
    without the MoE keys the file itself does not hold, when the pattern has no ``E`` layer.
    """
    pattern = raw.get("hybrid_override_pattern")
    if hparams.get("model_type") != "nemotron_h" or not isinstance(pattern, str) or "E" in pattern:
        return hparams
    moe = {k for k in hparams if "expert" in k or k.startswith("moe_")} | {"n_group", "topk_group"}
    return {**{k: v for k, v in hparams.items() if k not in moe or k in raw}, "hybrid_override_pattern": pattern}


def _gguf_main(tree: str, hf_dir: str, out: str) -> None:
    """Inside the converter process: llama.cpp's converter with two fixes for our dense export (see above)."""
    sys.path[:0] = [tree, str(Path(tree) / "gguf-py")]
    from conversion import base  # llama.cpp's converter package

    load_hparams = base.ModelBase.load_hparams
    raw = json.loads((Path(hf_dir) / "config.json").read_text())

    def dense_load_hparams(dir_model: Path, is_mistral_format: bool = False) -> dict[str, Any]:
        return _dense_nemotron_h(load_hparams(dir_model, is_mistral_format), raw)

    base.ModelBase.load_hparams = staticmethod(dense_load_hparams)
    original = base.TextModel.get_vocab_base_pre

    def vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:  # "BPE pre-tokenizer was not recognized": ours is GPT-2's regex
            print("bench_peers: unknown BPE pre-tokenizer hash -> 'gpt-2' (byte-level BPE, GPT-2 regex)")
            return "gpt-2"

    base.TextModel.get_vocab_base_pre = vocab_base_pre
    import convert_hf_to_gguf
    sys.argv = ["convert_hf_to_gguf.py", hf_dir, "--outtype", "f32", "--outfile", out]
    convert_hf_to_gguf.main()


def check_gguf_weights(tree: Path, gguf: Path, hybridlm_dir: Path) -> str:
    """One line: the GGUF's embedding and output matrices vs the hybridlm checkpoint, and its element count."""
    import numpy as np
    from safetensors.numpy import load_file
    if str(tree / "gguf-py") not in sys.path:
        sys.path.append(str(tree / "gguf-py"))
    from gguf import GGUFReader
    ours = load_file(str(hybridlm_dir / "model.safetensors"))
    theirs = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    pairs = {"token_embd.weight": "backbone.embeddings.weight", "output.weight": "lm_head.weight"}
    diffs = []
    for g, h in pairs.items():
        if g in theirs and h in ours:
            a = np.asarray(theirs[g].data, dtype=np.float32).reshape(ours[h].shape)
            diffs.append(f"{g} vs {h}: max |diff| {float(np.abs(a - ours[h]).max()):.1e}")
    n_g, n_h = sum(int(t.n_elements) for t in theirs.values()), sum(v.size for v in ours.values())
    types = sorted({t.tensor_type.name for t in theirs.values()})
    return f"{'; '.join(diffs)}; elements {n_g:,} (GGUF, {'/'.join(types)}) vs {n_h:,} (hybridlm)"


def greedy_check(tree: Path, bins: dict[str, Path], gguf: Path, hybridlm_dir: Path,
                 prompt: str = "In the beginning God created", n: int = 16) -> str:
    """One line: llama.cpp vs hybridlm on `prompt` (token ids, logits, `n` greedy tokens), or why it was skipped.

    llama.cpp runs through the ctypes binding of the llama-cpp-python source tree that vendors
    `tree` (its Python files on sys.path, our build's libllama.so), in its own process.
    """
    import tempfile
    import numpy as np
    import torch
    from hybridlm import generate, load
    from hybridlm.training.tokenizer import Tokenizer
    binding = tree.resolve().parents[1]
    lib_dir = next(iter(bins.values())).resolve().parent
    if not (binding / "llama_cpp" / "llama_cpp.py").is_file() or not (lib_dir / "libllama.so").is_file():
        return f"skipped (no llama_cpp binding in {binding} or no libllama.so in {lib_dir})"
    model, tok = load(hybridlm_dir), Tokenizer.from_file(hybridlm_dir / "tokenizer.json")
    ids = tok.encode(prompt)
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        out = Path(tmp) / "llama.npz"
        env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib_dir), "PYTHONPATH": str(binding), "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "greedy", str(gguf), prompt, str(n),
                               str(out)], capture_output=True, text=True, env=env, timeout=300)
        if proc.returncode != 0 or not out.is_file():
            return "skipped (llama_cpp binding failed: " + " | ".join(proc.stderr.strip().splitlines()[-2:]) + ")"
        theirs = np.load(out)
        ours = model(torch.tensor([ids]))[0].numpy()
        greedy = generate(model, [ids], max_new_tokens=n, temperature=0)[0]
    same_ids = theirs["ids"].tolist() == ids
    diff = float(np.abs(ours - theirs["logits"]).max()) if same_ids else float("nan")
    agree = next((i for i, (a, b) in enumerate(zip(greedy, theirs["greedy"].tolist())) if a != b), n)
    return (f"prompt {prompt!r}: token ids {'equal' if same_ids else 'DIFFER'} ({len(ids)}), prompt logits max "
            f"|diff| {diff:.1e} (max |logit| {float(np.abs(ours).max()):.2f}; llama.cpp keeps K/V in f16), "
            f"greedy tokens equal for {agree}/{n}")


def _greedy_main(gguf: str, prompt: str, n: str, out: str) -> None:
    """Inside the check process: token ids, prompt logits and `n` greedy tokens from llama.cpp."""
    import types
    import numpy as np
    if importlib.util.find_spec("diskcache") is None:  # llama_cpp imports it for a disk cache, unused here
        sys.modules["diskcache"] = types.SimpleNamespace(Cache=object)
    import llama_cpp
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_threads=1, logits_all=True, verbose=False)
    ids = llm.tokenize(prompt.encode(), add_bos=False, special=False)
    llm.eval(ids)
    logits, greedy = np.array(llm.scores[:len(ids)]), []
    for _ in range(int(n)):
        greedy.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([greedy[-1]])
    np.savez(out, ids=np.array(ids), logits=logits, greedy=np.array(greedy))


# ---- llama.cpp: benchmarks ----------------------------------------------------------------
def _run_json_lines(cmd: list[str], env: dict[str, str], timeout: float) -> list[dict[str, Any]]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{Path(cmd[0]).name} exit {proc.returncode}: " + " | ".join(tail))
    text = proc.stdout.strip()
    if text.startswith("["):  # llama-bench -o json: one array
        return json.loads(text)
    return [json.loads(line) for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("{")]


def _bench_median_ts(record: dict[str, Any], tokens: int) -> float:
    """tokens/s of a llama-bench record from the median of its repetitions (samples_ns)."""
    samples = record.get("samples_ns") or [record["avg_ns"]]
    return tokens / (statistics.median(samples) / 1e9)


def llama_bench_cell(bins: dict[str, Path], gguf: Path, threads: int, context: int, batch: int,
                     steps: int, reps: int, kv_type: str, timeout: float) -> dict[str, Any]:
    """llama.cpp prefill and decode tok/s for one cell, from llama-bench or llama-batched-bench."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    common = ["-m", str(gguf), "-t", str(threads), "-ctk", kv_type, "-ctv", kv_type]
    if batch == 1:
        if "llama-bench" not in bins:
            raise EngineUnavailable("no llama-bench binary")
        bench = [str(bins["llama-bench"]), *common, "-o", "json", "-r", str(reps)]
        pp = _run_json_lines(bench + ["-p", str(context), "-n", "0"], env, timeout)[0]
        tg = _run_json_lines(bench + ["-p", "0", "-n", str(steps), "-d", str(context)], env, timeout)[0]
        return {"prefill_tok_s": _bench_median_ts(pp, context), "decode_tok_s": _bench_median_ts(tg, steps),
                "tool": "llama-bench", "prefill_runs": pp.get("samples_ts"), "decode_runs": tg.get("samples_ts"),
                "n_batch": pp.get("n_batch"), "n_ubatch": pp.get("n_ubatch"), "flash_attn": pp.get("flash_attn"),
                "type_k": pp.get("type_k"), "build_commit": pp.get("build_commit")}
    if "llama-batched-bench" not in bins:
        raise EngineUnavailable("llama-bench runs one sequence; batch > 1 needs the llama-batched-bench target "
                                "(cmake --build build --target llama-batched-bench), not built here")
    n_ctx = batch * (context + steps) + 16
    cmd = [str(bins["llama-batched-bench"]), *common, "-c", str(n_ctx), "-npp", str(context), "-ntg", str(steps),
           "-npl", str(batch), "--output-format", "jsonl"]
    runs = [_run_json_lines(cmd, env, timeout)[-1] for _ in range(reps)]
    return {"prefill_tok_s": statistics.median(r["speed_pp"] for r in runs),
            "decode_tok_s": statistics.median(r["speed_tg"] for r in runs), "tool": "llama-batched-bench",
            "n_batch": runs[0].get("n_batch"), "n_ubatch": runs[0].get("n_ubatch")}


# ---- the PyTorch engines (run inside `bench_peers.py --worker`) ---------------------------
class HybridRunner:
    """hybridlm's fixed-shape `Decoder`, eager or compiled."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int, compile: bool) -> None:
        from hybridlm.serve.decoder import Decoder
        self.dec = Decoder(model, batch=batch, max_len=max_len, compile=compile)
        self.kind = f"Decoder(compile={compile})"

    @property
    def compile_seconds(self) -> float:
        return self.dec.compile_seconds

    def prefill(self, ids: Tensor) -> Tensor:
        return self.dec.prefill(ids)

    def step(self, tokens: Tensor) -> Tensor:
        return self.dec.step(tokens)


class TransformersRunner:
    """transformers' `NemotronHForCausalLM` on its pure-PyTorch path, decoding on its own cache."""

    def __init__(self, hf_dir: Path, device: str) -> None:
        import torch
        from transformers import NemotronHForCausalLM
        self.model = NemotronHForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                          attn_implementation="sdpa").to(device).eval()
        self.past, self.kind, self.compile_seconds = None, "NemotronHForCausalLM (sdpa, torch path)", 0.0

    def prefill(self, ids: Tensor) -> Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
        self.past = out.past_key_values
        return out.logits[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        out = self.model(input_ids=tokens[:, None], past_key_values=self.past, use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "gguf":
    _gguf_main(*sys.argv[2:])
elif __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "greedy":
    _greedy_main(*sys.argv[2:])
