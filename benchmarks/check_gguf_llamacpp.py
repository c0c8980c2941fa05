"""llama.cpp on hybridlm's own GGUF export (`hybridlm.interop.gguf.save_gguf`): same tokens, same logits?

Random tiny models (the bundled 4096-token tokenizer, all three layer kinds, 2 Mamba groups, GQA,
norm weights, D and biases moved off their init, logits up to about 10) in two `--variant`s:
``plain``, and ``tied-biases`` (tied output, no conv bias, attention and MLP biases) are written
with `save_gguf` in each `--dtype`, loaded by llama.cpp (through the ctypes binding of the
llama-cpp-python source tree that vendors it, our build's libllama.so, in a separate process),
and compared with hybridlm:

* tokenization: llama.cpp's ids for a set of strings (spaces, newlines, tabs, trailing spaces,
  digits, punctuation, contractions, non-ASCII) == our tokenizer's; ``<|endoftext|>`` is parsed
  as the special token with ``special=True``;
* logits: the prompt's logits from one llama.cpp batch (prefill), then `--decode` more tokens fed
  one at a time (its recurrent decode path), against hybridlm's full forward over the same ids:
  max |diff| over every position and vocabulary entry. llama.cpp keeps K/V in F32 here (type_k =
  type_v = 0). For f16/bf16 files the reference is our model with the file's rounding; what is
  left is ggml's own rounding of the activations for those matmuls (DTYPE_TOLERANCE).

    python benchmarks/check_gguf_llamacpp.py --llama-bin-dir /path/to/llama.cpp/build/bin
    python benchmarks/check_gguf_llamacpp.py --dtype f32 --variant plain --converter --json runs/gguf_check.json

With ``--converter``, the plain checkpoint also goes the long way: `convert` to a Hugging Face
directory, then llama.cpp's own ``convert_hf_to_gguf.py`` (run as bench_peers.py runs it,
`_peers.convert_to_gguf`): every tensor of that file must equal ours bit for bit, after the
converter's RoPE row permutation of Q and K (which Nemotron-H, without RoPE, does not need),
and the metadata keys that differ are listed.

Exit status 0 when every check passes, 1 when one fails, 2 when llama.cpp or its binding is not
found (nothing was compared). llama.cpp is looked for in --llama-bin-dir, $LLAMA_CPP_BIN, then PATH.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import write_json  # noqa: E402  (also puts src/ on sys.path)
import _peers  # noqa: E402

STRINGS = ["In the beginning God created the heaven and the earth.", "  two  spaces,\n\nnew lines\tand tabs  ",
           "It's 1611; we'll see 12345 numbers!", "naïve café — “quotes” 日本語 🙂", "end with spaces   ",
           "a<|endoftext|>b"]
PROMPT = "And God said, Let there be light: and there was light. 1234"
DTYPE_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1}


VARIANTS = {
    "plain": {},
    # no output tensor (llama.cpp reuses token_embd), a zero conv bias written for llama.cpp, every optional bias
    "tied-biases": dict(tie_embeddings=True, conv_bias=False, attention_bias=True, mlp_bias=True),
}


def check_model(variant: str = "plain", seed: int = 0):
    """The random tiny model of the check (see the module docstring), float32, eval mode.

    Norm weights, D and the biases are moved off their init, and the output scaled so the
    logits span several units (max |logit| about 10) rather than the init's 1."""
    import torch
    from hybridlm import HybridConfig, HybridLM
    cfg = HybridConfig(vocab_size=4096, d_model=64, pattern="M-*M-*-", n_heads=4, n_kv_heads=2, head_dim=16,
                       ffn_dim=128, ssm_state=16, mamba_head_dim=16, n_groups=2, chunk_size=16, max_seq_len=512,
                       **VARIANTS[variant])
    torch.manual_seed(seed)
    model = HybridLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", ".bias")):
                p.add_(0.2 * torch.randn_like(p))
        model.backbone.norm_f.weight.mul_(12.0)
    return model


def find_binding(bin_dir: str | None) -> tuple[Path, Path, Path] | str:
    """(llama-cpp-python source tree, directory of libllama.so, llama.cpp source tree), or why they were not found."""
    bins, where = _peers.find_llama(bin_dir)
    tree = _peers.find_llama_tree(None, bins)
    if not bins or tree is None:
        return f"no llama.cpp binaries found in {where}"
    lib_dir = next(iter(bins.values())).resolve().parent
    binding = tree.resolve().parents[1]
    if not (binding / "llama_cpp" / "llama_cpp.py").is_file() or not (lib_dir / "libllama.so").is_file():
        return f"no llama_cpp binding in {binding} or no libllama.so in {lib_dir}"
    return binding, lib_dir, tree


def run_llama(binding: Path, lib_dir: Path, gguf: Path, ids: list[int], decode: int, out: Path) -> None:
    """llama.cpp's tokens for STRINGS and logits for `ids` (+ `decode` single-token steps) into `out` (npz)."""
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(lib_dir), "PYTHONPATH": str(binding), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(gguf), json.dumps(ids), str(decode), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError("llama.cpp worker failed: " + " | ".join(proc.stderr.strip().splitlines()[-3:]))


def _worker(gguf: str, ids_json: str, decode: str, out: str) -> None:
    """Inside the llama.cpp process (the binding on sys.path)."""
    import types
    import numpy as np
    if importlib.util.find_spec("diskcache") is None:  # llama_cpp imports it for a disk cache, unused here
        sys.modules["diskcache"] = types.SimpleNamespace(Cache=object)
    import llama_cpp
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_batch=256, n_threads=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)  # GGML_TYPE_F32 K/V
    tokens = {s: llm.tokenize(s.encode(), add_bos=False, special=False) for s in STRINGS}
    special = {s: llm.tokenize(s.encode(), add_bos=False, special=True) for s in STRINGS}
    ids = json.loads(ids_json)
    prompt, rest = ids[:len(ids) - int(decode)], ids[len(ids) - int(decode):]
    llm.eval(prompt)
    for t in rest:  # one token per call: llama.cpp's decode path
        llm.eval([t])
    np.savez(out, logits=np.array(llm.scores[:len(ids)]), tokens=json.dumps(tokens), special=json.dumps(special))


def rounded_like(model, dtype: str):
    """A copy of `model` whose tensors stored as `dtype` in the GGUF file are rounded to it (f32: `model`)."""
    import copy
    import torch
    from hybridlm.interop.gguf import GGUF_DTYPES, gguf_name, keeps_f32
    if dtype == "f32":
        return model
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in ref.state_dict().items():
            theirs, transform = gguf_name(name, ref.cfg)
            if not keeps_f32(theirs, (p if transform is None else transform(p, ref.cfg)).dim()):
                p.copy_(p.to(GGUF_DTYPES[dtype]).float())
    return ref


def compare(model, tok, theirs: dict[str, Any], ids: list[int], dtype: str) -> dict[str, Any]:
    """Token and logit agreement of one llama.cpp run with hybridlm."""
    import numpy as np
    import torch
    with torch.inference_mode():
        ours = rounded_like(model, dtype)(torch.tensor([ids]))[0].float().numpy()
    tokens, special = json.loads(str(theirs["tokens"])), json.loads(str(theirs["special"]))
    same = {s: tokens[s] == tok.encode(s) for s in STRINGS if "<|" not in s}
    special_ok = special["a<|endoftext|>b"] == tok.encode("a<|endoftext|>b")
    diff = float(np.abs(ours - theirs["logits"]).max())
    ok = diff <= DTYPE_TOLERANCE[dtype] and all(same.values()) and special_ok
    return {"dtype": dtype, "max_abs_logit_diff": diff, "max_abs_logit": float(np.abs(ours).max()),
            "positions": len(ids), "tokens_equal": all(same.values()),
            "token_mismatches": [s for s, equal in same.items() if not equal], "special_token_parsed": special_ok,
            "pass": ok}


def check_variant(found: tuple[Path, Path, Path], variant: str, dtypes: list[str], decode: int,
                  tmp: Path) -> list[dict]:
    """Every dtype of one model variant through llama.cpp; prints one line per dtype."""
    import numpy as np
    import torch
    from hybridlm import generate
    from hybridlm.interop.gguf import save_gguf
    from hybridlm.training.tokenizer import default_tokenizer
    model, tok = check_model(variant), default_tokenizer()
    prompt = tok.encode(PROMPT)
    with torch.inference_mode():
        ids = prompt + generate(model, [prompt], max_new_tokens=decode, temperature=0)[0]
    results = []
    for dtype in dtypes:
        gguf = save_gguf(model, tok, tmp / f"{variant}-{dtype}.gguf", dtype)
        run_llama(found[0], found[1], gguf, ids, decode, tmp / f"{variant}-{dtype}.npz")
        r = {"variant": variant, **compare(model, tok, dict(np.load(tmp / f"{variant}-{dtype}.npz")), ids, dtype)}
        results.append(r)
        print(f"{variant} {dtype}: {len(prompt)} prompt + {decode} decoded tokens, logits max |diff| "
              f"{r['max_abs_logit_diff']:.2e} (max |logit| {r['max_abs_logit']:.2f}, tolerance "
              f"{DTYPE_TOLERANCE[dtype]:.0e}), tokenization "
              f"{'equal' if r['tokens_equal'] else 'DIFFERS: ' + repr(r['token_mismatches'])} on {len(STRINGS) - 1} "
              f"strings, special token {'parsed' if r['special_token_parsed'] else 'NOT parsed'}: "
              f"{'ok' if r['pass'] else 'FAIL'}")
    return results


def _rope_permute(w, n_head: int):
    """llama.cpp's converter's Q/K row order for RoPE (LlamaModel.permute), on a numpy (rows, cols) matrix."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def against_converter(tree: Path, tmp: Path) -> dict[str, Any]:
    """Our GGUF vs llama.cpp's convert_hf_to_gguf.py on our HF export of the same (plain, f32) model."""
    import numpy as np
    from gguf import GGUFReader  # llama.cpp's gguf package (the test extra)
    from hybridlm.interop.checkpoint import save_model
    from hybridlm.interop.convert import convert
    from hybridlm.training.tokenizer import DEFAULT_TOKENIZER_PATH
    model = check_model("plain")
    save_model(model, tmp / "ours")
    (tmp / "ours" / "tokenizer.json").write_bytes(DEFAULT_TOKENIZER_PATH.read_bytes())
    ours = convert(tmp / "ours", tmp / "ours.gguf", to="gguf")
    failed = _peers.convert_to_gguf(tree, convert(tmp / "ours", tmp / "hf", to="hf"), tmp / "theirs.gguf")
    if failed:
        raise RuntimeError(failed)
    a, b = GGUFReader(str(ours)), GGUFReader(str(tmp / "theirs.gguf"))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    heads = {"attn_q.weight": model.cfg.n_heads, "attn_k.weight": model.cfg.n_kv_heads}
    unequal = sorted(set(ta) ^ set(tb))
    for name in sorted(set(ta) & set(tb)):
        mine = np.asarray(ta[name].data)
        n_head = next((n for suffix, n in heads.items() if name.endswith(suffix)), None)
        mine = _rope_permute(mine, n_head) if n_head else mine
        if ta[name].tensor_type != tb[name].tensor_type or not np.array_equal(mine, np.asarray(tb[name].data)):
            unequal.append(name)
    fa, fb = ({k: f.contents() for k, f in r.fields.items()} for r in (a, b))
    keys = sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k) and not k.startswith("GGUF."))
    differ = {k: [fa.get(k), fb.get(k)] for k in keys}
    print(f"vs llama.cpp's convert_hf_to_gguf.py: {len(ta)} tensors, {len(unequal)} unequal {unequal}; "
          f"metadata that differs (ours, theirs): {differ}")
    return {"tensors": len(ta), "unequal_tensors": unequal, "metadata_differs": differ, "pass": not unequal}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llama-bin-dir", default=None, help="llama.cpp build/bin (default: $LLAMA_CPP_BIN, then PATH)")
    ap.add_argument("--dtype", nargs="+", default=["f32", "f16", "bf16"], choices=list(DTYPE_TOLERANCE))
    ap.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--decode", type=int, default=8, help="tokens fed one at a time after the prompt")
    ap.add_argument("--converter", action="store_true", help="also compare with llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    found = find_binding(a.llama_bin_dir)
    if isinstance(found, str):
        print(f"skipped: {found}")
        return 2
    import torch
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        results = [r for v in a.variant for r in check_variant(found, v, a.dtype, a.decode, Path(tmp))]
        converter = against_converter(found[2], Path(tmp)) if a.converter else None
    if a.json:
        write_json(Path(a.json), {"results": results, "converter": converter, "strings": STRINGS, "prompt": PROMPT})
    return 0 if all(r["pass"] for r in results) and (converter is None or converter["pass"]) else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(*sys.argv[2:6])
    else:
        sys.exit(main())
