"""Helpers shared by the benchmark scripts: device sync, environment line, CPU contention."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout too


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def environment_line(device: str) -> str:
    name = (torch.cuda.get_device_name(device) if device.startswith("cuda")
            else platform.processor() or platform.machine())
    load = f" | load avg {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else ""
    return (f"torch {torch.__version__} | device {device} ({name}) | threads {torch.get_num_threads()} "
            f"| cpus {os.cpu_count()}{load}")


def cpu_pressure_us() -> int | None:
    """Linux PSI: total microseconds some runnable task waited for a CPU (None where unavailable)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


def report_contention(psi_start: int | None, wall: float) -> float | None:
    """Print and return the share of `wall` seconds a runnable task waited for a CPU since `psi_start`."""
    psi_end = cpu_pressure_us()
    if psi_start is None or psi_end is None:
        return None
    contention = (psi_end - psi_start) / 1e6 / wall
    print(f"CPU contention (Linux PSI cpu 'some', share of wall time a runnable task waited): {contention:.0%}"
          + ("  <- other processes competed for the CPUs: timings are noisy, rerun on an idle machine"
             if contention > 0.10 else ""))
    return contention


def write_json(path: Path | None, result: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def parse_common(ap: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add --device/--threads/--seed/--json, parse, refuse --device cuda without CUDA, apply --threads."""
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (None: keep torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda given but torch.cuda.is_available() is False")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def twin_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the hybrid-vs-twin flags (--preset, --pattern, --param-tol); `doc`: the script's docstring."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="hybrid preset (hybridlm.config.PRESETS)")
    ap.add_argument("--pattern", default=None, help="override the hybrid's layer pattern, e.g. M-M-M-M*-M-M-M-M*-")
    ap.add_argument("--param-tol", type=float, default=0.02, help="allowed relative parameter mismatch of the twin")
    return ap


def hybrid_and_twin(args: argparse.Namespace):
    """The `--preset` hybrid (optionally with `--pattern`) and its parameter-matched attention twin.

    Prints one line per model; returns (hybrid_cfg, twin_cfg, hybrid_params, twin_params).
    """
    from hybridlm.config import preset
    from hybridlm.model.info import param_matched_twin
    from hybridlm.model import count_params
    cfg = preset(args.preset, **({"pattern": args.pattern} if args.pattern else {}))
    twin = param_matched_twin(cfg, args.param_tol)
    n_h, n_t = count_params(cfg), count_params(twin)
    print(f"hybrid      {args.preset}: pattern {cfg.pattern}  ffn_dim {cfg.ffn_dim:5d}  {n_h:,} params")
    print(f"transformer twin: pattern {twin.pattern}  ffn_dim {twin.ffn_dim:5d}  {n_t:,} params "
          f"({(n_t - n_h) / n_h:+.2%})")
    return cfg, twin, n_h, n_t
