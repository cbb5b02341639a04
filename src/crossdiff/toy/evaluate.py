"""Proof that chat tuning changed something worth finding: losses and behaviour success, base vs chat."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import corpus

Row = tuple[list[int], list[bool]]  # token ids and which positions are targets


def collate(rows: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) with -100 where there is no target."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (x, m) in enumerate(rows):
        x_t = torch.tensor(x, dtype=torch.long)
        ids[i, : len(x)] = x_t
        att[i, : len(x)] = 1
        labels[i, : len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), x_t, -100)
    return ids, att, labels


@torch.no_grad()
def mean_loss(model, rows: Sequence[Row], pad_id: int, batch_size: int = 64) -> float:
    """Mean next-token cross-entropy over all target positions (tokens, not sequences, weigh equally)."""
    model.eval()
    rows = sorted(rows, key=lambda r: len(r[0]))  # length-sorted batches: little padding, same sum
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids, att, labels = collate(rows[i : i + batch_size], pad_id)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
        target = labels[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    if count == 0:
        raise ValueError("no target tokens to evaluate the loss on")
    return total / count


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[list[dict]], max_new_tokens: int, stop_ids: list[int],
             batch_size: int = 64, desc: str = "generate") -> list[str]:
    """Greedy responses to chat prompts (each a message list ending in a user turn)."""
    model.eval()
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        texts = [tokenizer.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts[i : i + batch_size]]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt")
        gen = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def _groups() -> dict[str, pl.Expr]:
    """Evaluated prompt sets: every behaviour, then every contrast set (e.g. true statements, which the chat
    model should accept where it corrects false ones: the proof that it checks facts, not prompt shapes)."""
    groups = {b: pl.col("behaviour") == b for b in corpus.BEHAVIOURS}
    for name, (b, kind) in corpus.CONTRASTS.items():
        groups[name] = (pl.col("behaviour") == b) & (pl.col("kind") == kind)
    return groups


def eval_prompts(chat: pl.DataFrame, per_behaviour: int) -> pl.DataFrame:
    """Up to `per_behaviour` distinct held-out prompts per behaviour and contrast set (corpus order, so
    deterministic)."""
    rows = []
    for b, selected in _groups().items():
        held = chat.filter((pl.col("split") == "heldout") & selected)
        seen = set()
        for msgs, answer in zip(held["messages"].to_list(), held["answer"].to_list()):
            prompt = msgs[:-1]
            key = tuple(m["content"] for m in prompt)
            if key in seen:
                continue
            seen.add(key)
            rows.append({"behaviour": b, "prompt": prompt, "answer": answer})
            if len(seen) == per_behaviour:
                break
    return pl.DataFrame(rows, schema={
        "behaviour": pl.String,
        "prompt": pl.List(pl.Struct({"role": pl.String, "content": pl.String})),
        "answer": pl.String,
    })


def behaviour_table(models: dict, tokenizer, prompts: pl.DataFrame, max_new_tokens: int,
                    stop_ids: list[int]) -> tuple[dict, pl.DataFrame]:
    """Per-behaviour success rate of greedy decoding for each model, plus all generations.

    `success` = the behaviour's characteristic response (corpus.check); `answer` = the response also
    contains the fact a correct answer needs (false-fact corrections, factual helpful answers,
    summaries, rewrites), reported over the prompts that have one.
    """
    gens = []
    for name, model in models.items():
        responses = generate(model, tokenizer, prompts["prompt"].to_list(), max_new_tokens, stop_ids, desc=f"generate {name}")
        gens.append(prompts.with_columns(
            model=pl.lit(name),
            response=pl.Series(responses, dtype=pl.String),
            success=pl.Series([corpus.check(b, r) for b, r in zip(prompts["behaviour"], responses)], dtype=pl.Boolean),
            answer_ok=pl.Series([bool(a) and a in r for a, r in zip(prompts["answer"], responses)], dtype=pl.Boolean),
        ))
    gens = pl.concat(gens)
    table = {}
    for b in _groups():
        sub = gens.filter(pl.col("behaviour") == b)
        entry: dict = {"n": sub.filter(pl.col("model") == next(iter(models))).height}
        for name in models:
            s = sub.filter(pl.col("model") == name)
            entry[name] = s["success"].mean() if s.height else None
            with_answer = s.filter(pl.col("answer") != "")
            if with_answer.height:
                entry[f"{name}_answer"] = with_answer["answer_ok"].mean()
                entry["n_answer"] = with_answer.height
        table[b] = entry
    return table, gens
