"""Proof that chat tuning changed something worth finding: losses and behaviour success, base vs chat."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch
import torch.nn.functional as F

from ..generation import greedy_responses
from . import corpus
from .head_loss import linear_cross_entropy

Row = tuple[list[int], list[bool]]  # token ids and which positions are targets


def collate(rows: Sequence[Row], pad_id: int, multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, labels) with -100 where there is no target; the length is the
    longest row's, rounded up to a `multiple`."""
    T = -(-max(len(ids) for ids, _ in rows) // multiple) * multiple
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (x, m) in enumerate(rows):
        x_t = torch.tensor(x, dtype=torch.long)
        ids[i, : len(x)] = x_t
        att[i, : len(x)] = 1
        labels[i, : len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), x_t, -100)
    return ids, att, labels


def target_loss(model, ids, att, labels, decision_weight: float = 1.0):
    """Mean next-token cross-entropy at target positions, with the LM head applied only there; the first target
    of every run of targets (an assistant turn's first token) weighs `decision_weight`, every other 1. The
    head runs a chunk of positions at a time (`head_loss`): a 262k-row head's logits are never whole."""
    hidden = model.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state[:, :-1]  # after final norm
    target = labels[:, 1:]
    keep = target != -100
    first = keep & ~F.pad(keep[:, :-1], (1, 0), value=False)  # a target whose predecessor is not one
    w = 1.0 + (decision_weight - 1.0) * first[keep].float()
    head = model.get_output_embeddings()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)  # Gemma 2 style soft-cap
    if getattr(head, "bias", None) is not None or head.weight.requires_grad:         # not the frozen plain head
        with torch.autocast(hidden.device.type, enabled=False):  # float32: the row count changes every batch, and
            logits = head(hidden[keep].float())                   # bf16 kernels are kept per shape (toy.build)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        return (F.cross_entropy(logits, target[keep], reduction="none") * w).sum() / w.sum()
    return linear_cross_entropy(hidden[keep], head.weight, target[keep], w / w.sum(), cap)


@torch.no_grad()
def mean_loss(model, rows: Sequence[Row], pad_id: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over all target positions of `rows` (tokens, not sequences, weigh equally)."""
    model.eval()
    device = next(model.parameters()).device
    rows = sorted(rows, key=lambda r: len(r[0]))  # length-sorted batches: little padding, same sum
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        ids, att, labels = (t.to(device) for t in collate(rows[i : i + batch_size], pad_id))
        n = int((labels[:, 1:] != -100).sum())
        total += target_loss(model, ids, att, labels).item() * n
        count += n
    if count == 0:
        raise ValueError("no target tokens to evaluate the loss on")
    return total / count


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
                    stop_ids: list[int], batch_size: int = 64) -> tuple[dict, pl.DataFrame]:
    """Per-behaviour success rate of greedy decoding for each model, plus all generations.

    `success` = the behaviour's characteristic response (corpus.check); `answer` = the response also
    contains the fact a correct answer needs (false-fact corrections, factual helpful answers,
    summaries, rewrites), reported over the prompts that have one.
    """
    gens = []
    for name, model in models.items():
        responses = greedy_responses(model, tokenizer, prompts["prompt"].to_list(), max_new_tokens, stop_ids,
                                     batch_size, desc=f"generate {name}")
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
