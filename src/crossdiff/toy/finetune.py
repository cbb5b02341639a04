"""A chat fine-tune of a real pretrained base on the embedded chat corpus, with the toy pair's planted behaviours.

This is how a real-base pair is made offline (DESIGN §5b): the base is real (e.g. Gemma 3 270M from its
package), the chat model is that base after supervised chat tuning on the generated conversations, so every
planted behaviour and label of the toy pair carries over and the method can be checked against them.

Cheap enough for 2 CPU cores: LoRA adapters on every projection of every layer (so layers <= L change, and
with them the activations the crosscoder reads), merged back before saving; the loss is on assistant tokens
only, and the vocabulary head (262k rows for Gemma 3, most of a forward pass) runs only at those positions.
The frozen base trains in bfloat16 where the CPU has bf16 units (1.2-1.3x faster a step at the Gemma
preset's shapes; the float32 adapters are then folded into the float32 weights), and each response's first
token, the one that decides which behaviour the answer shows ("Sure" / "Actually" / "I'm sorry" /
"As an AI"), weighs more in the loss.

Output layout = the toy pair's (`{out}/base`, `{out}/chat`, `{out}/data`, `{out}/metrics.json`), so every later
stage and the report read it the same way; `base` is a copy of the input folder.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import lora
from ..cli import job_threads, seed_everything
from .build import (
    _save,
    chat_rows,
    checked_dataclass,
    publish,
    resolve_train_dtype,
    staging_dir,
    train,
    web_rows,
    write_corpora,
)
from .evaluate import target_loss
from .tokenizer import END

log = logging.getLogger(__name__)

# relative draw weight per kind (a behaviour, or one of helpful's kinds); every other kind 1. Fact-checking and
# its contrast set (true statements, accepted) weigh the same, so the model learns to check, not to correct; they
# weigh most because checking means recalling 54 facts, where every other behaviour is one surface pattern
BALANCE = {"false_fact_correction": 4.0, "true_statement": 4.0}
# kinds drawn as one source, so every batch holds both: the first token's loss must then tell a false statement
# from a true one within a batch. Drawn apart, the Gemma 3 270M chat model corrected 0 of 16 held-out false
# statements ("Sure! That is correct." to all); pooled, 11 of 16, and it still accepted 15 of 16 true ones
POOLED = {"false_fact_correction": "fact_check", "true_statement": "fact_check"}


@dataclass(frozen=True)
class FinetuneConfig:
    """The `finetune:` section of params.yaml (defaults = params.yaml)."""

    seed: int = 0
    web_docs: int = 2000  # web documents of the generated corpus (the activation corpus's web half)
    chat_convs: int = 4000
    heldout_frac: float = 0.1
    multi_turn_frac: float = 0.2
    max_len: int = 128
    steps: int = 350
    batch_size: int = 16
    lr: float = 1e-3
    web_frac: float = 0.1  # share of batches that are web text (limits forgetting)
    rank: int = 16
    alpha: float = 32.0
    threads: int = 0  # torch threads; 0 = all available cores
    train_dtype: str = "auto"  # the frozen base's dtype while training: auto | bfloat16 | float32
    decision_weight: float = 8.0  # loss weight of each assistant turn's first token (1 = plain token mean)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneConfig:
        return checked_dataclass(cls, d, "finetune")


def finetune_pair(base_dir: str | os.PathLike, out_dir: str | os.PathLike,
                  params: Mapping[str, Any] | FinetuneConfig | None = None) -> dict:
    """Write `{out}/base` (the base), `{out}/chat` (its chat fine-tune), `{out}/data`, `{out}/metrics.json`."""
    cfg = params if isinstance(params, FinetuneConfig) else FinetuneConfig.from_dict(params or {})
    out = Path(out_dir)
    tmp = staging_dir(out)
    torch.set_num_threads(cfg.threads or job_threads())
    seed_everything(cfg.seed)
    timings, t0 = {}, time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"{base_dir}: the tokenizer has no chat template to fine-tune on")
    web, chat = write_corpora(tmp / "data", cfg)
    split = {s: (web.filter(pl.col("split") == s), chat.filter(pl.col("split") == s)) for s in ("train", "heldout")}
    train_chat = split["train"][1]
    by_kind = {k: chat_rows(tokenizer, train_chat.filter(pl.col("kind") == k)["messages"].to_list(), cfg.max_len)
               for k in sorted(set(train_chat["kind"].to_list()))}
    chat_train = [r for rows in by_kind.values() for r in rows]
    web_train = web_rows(tokenizer, split["train"][0]["text"].to_list(), cfg.max_len)
    pad = tokenizer.pad_token_id
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END)]

    dtype = resolve_train_dtype(cfg.train_dtype, "finetune")
    student = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    adapters = lora.add_adapters(student, cfg.rank, cfg.alpha)
    log.info("chat fine-tune: %d adapter parameters on a %s base, %d chat / %d web training rows",
             sum(p.numel() for p in adapters), dtype, len(chat_train), len(web_train))
    t = time.perf_counter()
    # kinds drawn evenly (fact-checking and its contrast BALANCE times as often): a few hundred steps must teach every
    # planted behaviour, not only the corpus's most frequent one; web text limits forgetting
    pools, weights = {}, {}
    for k, rows in by_kind.items():
        if rows:
            pool = POOLED.get(k, k)
            pools[pool] = pools.get(pool, []) + rows
            weights[pool] = weights.get(pool, 0.0) + BALANCE.get(k, 1.0)
    total = sum(weights.values())
    sources = [(rows, (1 - cfg.web_frac) * weights[p] / total) for p, rows in pools.items()] + [(web_train, cfg.web_frac)]
    ft = train(student, sources, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed + 1, pad, "fine-tune chat (LoRA)",
               loss_fn=functools.partial(target_loss, decision_weight=cfg.decision_weight))
    timings["finetune"] = time.perf_counter() - t
    chat_model = lora.merge_into(student, AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32))
    chat_model.requires_grad_(False)
    del student

    shutil.copytree(base_dir, tmp / "base")
    _save(chat_model, tokenizer, tmp / "chat", stop_ids)

    timings["total"] = time.perf_counter() - t0

    metrics = {
        "train": {"finetune": {"final_loss": sum(ft["losses"][-20:]) / len(ft["losses"][-20:]),
                               "tokens": ft["tokens"], "tokens_per_s": ft["tokens"] / timings["finetune"]}},
        "adapter_params": sum(p.numel() for p in adapters),
        "train_dtype": str(dtype).removeprefix("torch."),
        "n_params": sum(p.numel() for p in chat_model.parameters()),
        "rows": {"chat_train": len(chat_train), "chat_heldout": split["heldout"][1].height},
        "time_s": timings,
    }
    publish(tmp, out, metrics)
    log.info("real-base pair written to %s in %.0f s", out, timings["total"])
    return metrics
