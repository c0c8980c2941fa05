"""``metrics.jsonl``: the run's log, one JSON object per line (written on rank 0).

    {"kind": "train", "step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm", "time"}
        every `log_every` steps: that step's loss (mean over the global batch), its lr,
        tokens trained on so far, throughput since the previous line, the global gradient
        norm before clipping, and training seconds so far (excluding evaluation and
        checkpointing, cumulative over resumes)
    {"kind": "val", "step", "val_loss", "tokens"}   at step 0, every `eval_every` steps, at the end
    {"kind": "skip", "step", "reason"}              a non-finite loss / gradient norm: no update
    {"kind": "monitor", "step", "rms/QKV", ..., "layer_rms/<module>", "attn_logit_max", ...}
        every `monitor_every` steps: linear-output RMS per layer type and per layer, and the
        largest attention logit, of that step's forward passes (`hybridlm.training.monitor`; rank 0's batch)
    {"kind": "diverged", "step", "reason", "loss", "min_loss"}   the run stopped as diverged

Steps count completed optimizer steps. On resume, lines after the checkpoint's step are
dropped, so the file reads like one run. Non-finite floats are written as null.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

from ..interop.files import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """metrics.jsonl writer (a no-op when not `enabled`, i.e. off rank 0); `keep_until` is the resumed step."""

    def __init__(self, path: Path, enabled: bool, keep_until: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        kept = []
        if keep_until is not None and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                with contextlib.suppress(json.JSONDecodeError, AttributeError, TypeError):
                    if json.loads(line).get("step", math.inf) <= keep_until:
                        kept.append(line + "\n")
        atomic_write_text(path, "".join(kept))
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
            self._file.write(json.dumps(clean, allow_nan=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of ``run_dir/metrics.jsonl`` (optionally only one `kind`); a torn last line is skipped."""
    records = []
    for line in (Path(run_dir) / METRICS_FILE).read_text(errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
                records.append(record)
    return records
