"""The evaluate_pair stage: a built pair's held-out losses and planted-behaviour table, base vs chat.

A stage of its own, after the pair is built (toy) or fine-tuned (a packaged base), so asking for more prompts
re-runs minutes of generation and never re-trains a model (nor invalidates the activations, crosscoders and
evaluations cached from it). Reads `{models}/base`, `{models}/chat`, `{models}/data`; writes
`evaluation.json` (losses, behaviour table, time) and `generations.parquet` (every greedy response).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import io
from ..cli import job_threads, resolve_device
from ..config import Runtime
from ..generation import stop_ids
from ..models import DTYPES
from . import evaluate
from .build import chat_rows, checked_dataclass, web_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairEvalConfig:
    """The `pair_eval:` section of params.yaml (defaults = params.yaml)."""

    eval_prompts: int = 48  # held-out prompts per behaviour and contrast set
    max_new_tokens: int = 40  # greedy decoding length for the behaviour checks
    max_len: int = 128  # held-out rows for the losses are cut to this many tokens
    loss_rows: int = 0  # held-out rows per loss (0 = all of them)
    batch_size: int = 64  # prompts per generation batch
    threads: int = 0  # torch threads; 0 = all available cores

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PairEvalConfig:
        return checked_dataclass(cls, d, "pair_eval")


def evaluate_pair(models_dir: str | os.PathLike, out_dir: str | os.PathLike, params: Mapping[str, Any],
                  device: str | None = None) -> dict:
    """`params` = the {pair_eval, models, device} slice. Returns (and writes) `{out}/evaluation.json`."""
    cfg = PairEvalConfig.from_dict(params.get("pair_eval", {}))
    rt = Runtime.from_params(params, device)
    torch.set_num_threads(cfg.threads or job_threads())
    models_dir, out = Path(models_dir), Path(out_dir)
    t0 = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(models_dir / "chat")
    web = pl.read_parquet(models_dir / "data" / "web.parquet")
    chat = pl.read_parquet(models_dir / "data" / "chat.parquet")
    held = {"web_heldout": web_rows(tokenizer, web.filter(pl.col("split") == "heldout")["text"].to_list(), cfg.max_len),
            "chat_heldout_responses": chat_rows(
                tokenizer, chat.filter(pl.col("split") == "heldout")["messages"].to_list(), cfg.max_len)}
    if cfg.loss_rows:
        held = {k: rows[: cfg.loss_rows] for k, rows in held.items()}

    target = resolve_device(rt.device)
    models = {name: AutoModelForCausalLM.from_pretrained(models_dir / name, dtype=DTYPES[rt.dtype])
              .to(target).requires_grad_(False).eval() for name in ("base", "chat")}
    losses = {split: {name: evaluate.mean_loss(m, rows, tokenizer.pad_token_id) for name, m in models.items()}
              for split, rows in held.items()}
    t_loss = time.perf_counter() - t0

    prompts = evaluate.eval_prompts(chat, cfg.eval_prompts)
    table, gens = evaluate.behaviour_table(models, tokenizer, prompts, cfg.max_new_tokens,
                                           stop_ids(tokenizer, models["chat"]), cfg.batch_size)
    total = time.perf_counter() - t0
    metrics = {"loss": losses, "behaviours": table, "time_s": {"loss": t_loss, "generate": total - t_loss, "total": total}}
    io.write_parquet(out / "generations.parquet", gens)
    io.write_json(out / "evaluation.json", metrics)
    chat_row = {b: row.get("chat") for b, row in table.items()}
    log.info("behaviour success of the chat model on %d prompts per set: %s", cfg.eval_prompts, chat_row)
    return metrics
