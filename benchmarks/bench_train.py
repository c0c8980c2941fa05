"""Training throughput: the hybrid vs a same-size pure-attention model (fwd + bwd + AdamW step).

The transformer twin replaces every Mamba-2 layer (``M``) by attention (``*``) and widens
``ffn_dim`` until the parameter counts match (within 2%). One timed step is exactly a
training step of :func:`hybridlm.training.loop.train`: forward + loss, backward, global
gradient-norm clipping and the AdamW step (decay groups of :mod:`hybridlm.training.optim`), on
random tokens. Warm-up steps come first; the two models then take turns step by step
(so a busy machine slows both alike) and the reported time is each one's median step.

On CUDA (bf16 autocast, as in training) the table also has MFU for a ~125M-parameter
hybrid and its twin: ``6 * N * tokens/s / peak`` with N the parameters that do matmul
work (all but the input embedding table) and ``--peak-tflops`` the dense bf16 peak
(989 for an H100 SXM). The 6N rule ignores attention-score and SSD-scan FLOPs, so it
slightly understates MFU at long sequence lengths.

    python benchmarks/bench_train.py                      # tiny, CPU
    python benchmarks/bench_train.py --device cuda        # tiny + 125M with MFU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from _common import write_json  # noqa: E402  (also puts src/ on sys.path)

from hybridlm.config import HybridConfig, preset  # noqa: E402
from hybridlm.model import HybridLM  # noqa: E402
from hybridlm.model.info import param_matched_twin  # noqa: E402
from hybridlm.training.optim import build_optimizer, clip_grad_norm  # noqa: E402

# ~125M parameters (24 layers: 8 Mamba-2, 4 attention, 12 MLP), GPT-2-small width.
HYBRID_125M = dict(vocab_size=32768, d_model=768, pattern="M-M-*-M-M-*-M-M-*-M-M-*-", n_heads=12, n_kv_heads=4,
                   head_dim=64, ffn_dim=2048, ssm_state=128, mamba_head_dim=64, n_groups=1, chunk_size=128,
                   max_seq_len=4096)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default=None, help="comma list of tiny,125m (default: tiny on CPU, both on CUDA)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 4 CPU, 16 CUDA)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 256 CPU, 2048 CUDA)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 3 CPU, 20 CUDA)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 CPU, 3 CUDA)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator dense bf16 peak, for MFU")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--json", default=None, help="also write the results here")
    a = ap.parse_args(argv)
    cuda = a.device == "cuda"
    a.sizes = (a.sizes or ("tiny,125m" if cuda else "tiny")).split(",")
    a.batch_size = a.batch_size or (16 if cuda else 4)
    a.seq_len = a.seq_len or (2048 if cuda else 256)
    a.steps = a.steps or (20 if cuda else 3)
    a.warmup = a.warmup if a.warmup is not None else (3 if cuda else 1)
    return a


def flop_params(model: HybridLM) -> int:
    """Parameters that take part in matmuls: all but the input embedding table (unless tied)."""
    n = model.num_params()
    return n if model.cfg.tie_embeddings else n - model.backbone.embeddings.weight.numel()


class Trainer:
    """One model + AdamW + a fixed random batch; `step()` times one training step."""

    def __init__(self, cfg: HybridConfig, a: argparse.Namespace) -> None:
        self.device = torch.device(a.device)
        torch.manual_seed(0)
        self.model = HybridLM(cfg).to(self.device).train()
        self.opt = build_optimizer(self.model, lr=1e-4, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, cfg.vocab_size, (a.batch_size, a.seq_len + 1), generator=gen).to(self.device)
        self.inputs, self.targets = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        self.times: list[float] = []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def step(self, record: bool = True) -> None:
        self._sync()
        t0 = time.perf_counter()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = self.model.loss(self.inputs, self.targets)
        loss.backward()
        clip_grad_norm(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self._sync()
        if record:
            self.times.append(time.perf_counter() - t0)

    def row(self, a: argparse.Namespace) -> dict:
        sec = statistics.median(self.times)
        tps = a.batch_size * a.seq_len / sec
        n_flop = flop_params(self.model)
        row = {"pattern": self.model.cfg.pattern, "ffn_dim": self.model.cfg.ffn_dim,
               "params": self.model.num_params(), "flop_params": n_flop, "step_s": sec, "tokens_per_s": tps}
        if self.device.type == "cuda":
            row["mfu"] = 6 * n_flop * tps / (a.peak_tflops * 1e12)
        return row


def compare(hybrid: HybridConfig, a: argparse.Namespace) -> list[dict]:
    """Time the hybrid and its matched twin with interleaved steps (both see the same machine load)."""
    trainers = {"hybrid": Trainer(hybrid, a), "attention": Trainer(param_matched_twin(hybrid), a)}
    for _ in range(a.warmup):
        for t in trainers.values():
            t.step(record=False)
    for _ in range(a.steps):
        for t in trainers.values():
            t.step()
    rows = [{"model": kind, **t.row(a)} for kind, t in trainers.items()]
    del trainers
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    if a.threads:
        torch.set_num_threads(a.threads)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads"
    print(f"training throughput on {a.device} ({where}), torch {torch.__version__}; batch {a.batch_size} x "
          f"{a.seq_len} tokens, median of {a.steps} steps after {a.warmup} warm-up"
          + (", bf16 autocast" if a.device == "cuda" else ", float32"))
    sizes = {"tiny": preset("tiny"), "125m": HybridConfig(**HYBRID_125M)}
    rows = []
    for size in a.sizes:
        hybrid = sizes[size].replace(max_seq_len=max(sizes[size].max_seq_len, a.seq_len))
        rows += [{"size": size, **row} for row in compare(hybrid, a)]
    mfu = a.device == "cuda"
    head = f"{'size':<6} {'model':<10} {'pattern':<26} {'params':>10} {'ffn':>5} {'step ms':>9} {'tokens/s':>11} " \
           f"{'vs attn':>8}" + (f" {'MFU':>6}" if mfu else "")
    print(head)
    print("-" * len(head))
    for row in rows:
        twin = next(r for r in rows if r["size"] == row["size"] and r["model"] == "attention")
        line = (f"{row['size']:<6} {row['model']:<10} {row['pattern'][:26]:<26} {row['params'] / 1e6:>9.2f}M "
                f"{row['ffn_dim']:>5} {row['step_s'] * 1e3:>9.1f} {row['tokens_per_s']:>11,.0f} "
                f"{row['tokens_per_s'] / twin['tokens_per_s']:>7.2f}x")
        if mfu:
            line += f" {row['mfu']:>6.1%}"
        print(line)
    write_json(Path(a.json) if a.json else None, {"args": vars(a), "rows": rows})
    return rows


if __name__ == "__main__":
    main()
