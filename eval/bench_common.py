"""What the serving/eval benchmarks (eval/bench.py) and the per-precision model benchmark
(eval/bench_model.py) share: the machine description and writing a results file."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def write_results(results: dict, out: str | Path) -> None:
    """`results` as indented JSON at `out` (its folder created if needed)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))
