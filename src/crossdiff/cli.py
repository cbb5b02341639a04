"""Shared plumbing for the thin workflow scripts: params slice, device, logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys

import numpy as np
import torch


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", required=True, help="JSON slice of params.yaml this stage reads")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    args = p.parse_args(argv)
    params = json.loads(args.params)
    setup_logging()
    return args, params


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


def device_name(args, params: dict) -> str:
    """A script's `--device` when given, else params `device` (the rule's slice decides; see config.Runtime)."""
    return getattr(args, "device", None) or params.get("device", "auto")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def job_threads() -> int:
    """The job's cores: OMP_NUM_THREADS when set (Snakemake sets it to the rule's `threads`, and two jobs may
    share the machine), else every core this process may use."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
