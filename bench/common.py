"""Shared plumbing for benchmarks: time a callable, write ours-vs-baseline JSON with the ratio."""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from crossdiff.io import write_json


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", required=True, help="results/bench/{name}.json")
    p.add_argument("--quick", action="store_true", help="smaller sizes (smoke test)")
    return p


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Best wall time of `repeat` runs, in seconds (min is the least noisy estimator here)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def machine() -> dict:
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
    }


def write_result(out: str, name: str, ours: dict, baseline: dict, ratio: float, goal: str, **extra) -> dict:
    """`ratio` > 1 means ours is better (faster) than the baseline measured in the same run."""
    result = {"name": name, "ours": ours, "baseline": baseline, "ratio": ratio, "goal": goal,
              "machine": machine(), **extra}
    write_json(out, result)
    print(f"[bench {name}] ratio {ratio:.2f}x  ({goal})")
    return result
