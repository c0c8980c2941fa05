"""`make demo`: the main job end to end on the bundled corpus, on CPU.

1. tokenizes the bundled King James Bible into train/val shards (bundled BPE tokenizer),
2. trains the `tiny` hybrid (Mamba-2 + attention + MLP) with progress, checkpoints and
   validation,
3. generates text from the trained model,
4. writes `report.html` with the loss curves and the samples.

    python -m hybridlm.demo [--steps 600] [--out runs/demo]
"""

from __future__ import annotations

import argparse
import sys
import time

from .training.dataset import TokenDataset, unigram_entropy
from .training.loop import train
from .training.report import sample_run, write_report
from .training.train_config import TrainConfig

PROMPTS = ["In the beginning", "And Jesus said unto them,", "The LORD is my shepherd;"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (about 10 minutes on 2 CPU cores)")
    p.add_argument("--out", default="runs/demo", help="run directory")
    p.add_argument("--resume", action="store_true", help="continue an interrupted demo run")
    a = p.parse_args(argv)
    t0 = time.time()
    tc = TrainConfig(model="tiny", data=None, out=a.out, steps=a.steps, batch_size=16, seq_len=128,
                     lr=3e-3, min_lr=3e-4, warmup_steps=min(50, a.steps // 10), eval_every=max(a.steps // 6, 1),
                     eval_batches=10, save_every=max(a.steps // 3, 1), keep_last=2, val_fraction=0.02,
                     resume=a.resume)
    summary = train(tc)
    val = TokenDataset(f"{a.out}/data", split="val")
    entropy = unigram_entropy(TokenDataset(f"{a.out}/data", split="train"))
    samples = sample_run(a.out, PROMPTS)
    report = write_report(a.out, samples, extra={
        "model": "tiny hybrid", "parameters": summary["num_params"],
        "unigram_entropy": entropy, "val_tokens": val.num_tokens, "wall_clock_s": round(time.time() - t0)})
    print(f"\nvalidation loss {summary['val_loss']:.3f} nats/token "
          f"(unigram entropy of the corpus: {entropy:.3f})")
    for prompt, text in samples:
        print(f"--- {prompt}{text}")
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
