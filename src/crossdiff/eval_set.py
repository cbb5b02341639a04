"""Evaluation conversations for the causal KL stage (paper A.8): held-out prompts answered greedily by the chat
model itself (the paper generates its responses with the chat model), plus held-out chat conversations with
their own responses. One row per conversation, rendered and masked (EVAL_SCHEMA), generated once per pair.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl
from transformers import AutoModelForCausalLM, AutoTokenizer

from crossdiff import io
from crossdiff.cli import resolve_device, seed_everything
from crossdiff.config import Runtime
from crossdiff.data import template_mask
from crossdiff.generation import greedy_responses, stop_ids
from crossdiff.models import DTYPES

log = logging.getLogger(__name__)

EVAL_SCHEMA = {"seq": pl.Int64, "source": pl.String, "behaviour": pl.String, "prompt": pl.String,
               "input_ids": pl.List(pl.Int32), "template": pl.List(pl.Boolean), "assistant": pl.List(pl.Boolean),
               "text": pl.String}


def _row(tokenizer, messages, source: str, behaviour, prompt: str) -> dict:
    ids, template, assistant = template_mask(tokenizer, messages)
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
    return dict(source=source, behaviour=behaviour, prompt=prompt, input_ids=ids, template=template,
                assistant=assistant, text=text)


def toy_sources(chat: pl.DataFrame, n_prompts: int, n_convs: int, seed: int) -> tuple[list, list]:
    """From the embedded pair's chat corpus: `n_prompts` distinct single-turn held-out user prompts (with their
    behaviour label) to be answered by the chat model, and `n_convs` other held-out conversations as written."""
    held = chat.filter(pl.col("split") == "heldout")
    if held.is_empty():
        raise ValueError("the chat corpus has no held-out conversations (split == 'heldout')")
    rows = list(held.select("messages", "behaviour").iter_rows())
    random.Random(seed).shuffle(rows)
    prompts, seen, rest = [], set(), []
    for messages, behaviour in rows:
        user = messages[0]["content"]
        if len(prompts) < n_prompts and len(messages) == 2 and user not in seen:
            seen.add(user)
            prompts.append(([{"role": "user", "content": user}], behaviour))
        else:
            rest.append((messages, behaviour))
    return prompts, rest[:n_convs]


def first_user_turn(input_ids: Sequence[int], template: Sequence[bool], assistant: Sequence[bool]) -> list[int]:
    """Token ids of the first user message of a rendered conversation: the first run of non-template,
    non-assistant tokens."""
    run = []
    for i, t, a in zip(input_ids, template, assistant):
        if not t and not a:
            run.append(i)
        elif run:
            break
    return run


def corpus_sources(corpus: pl.DataFrame, tokenizer, n_prompts: int, n_convs: int, seed: int) -> tuple[list, pl.DataFrame]:
    """For a real pair: prompts = first user turns of the validation corpus' chat rows, held-out conversations =
    other chat rows (already rendered and masked by the corpus stage)."""
    chat = corpus.filter((pl.col("source") == 1) & pl.col("assistant").list.any())
    if chat.is_empty():
        raise ValueError("the validation corpus has no chat sequence with an assistant turn")
    chat = chat.sample(fraction=1.0, shuffle=True, seed=seed)
    prompts, seen, used = [], set(), []
    for k, r in enumerate(chat.iter_rows(named=True)):
        if len(prompts) == n_prompts:
            break
        user = tokenizer.decode(first_user_turn(r["input_ids"], r["template"], r["assistant"])).strip()
        if user and user not in seen:
            seen.add(user)
            used.append(k)
            prompts.append(([{"role": "user", "content": user}], r["behaviour"]))
    rest = chat.with_row_index("_k").filter(~pl.col("_k").is_in(used)).drop("_k").head(n_convs)
    return prompts, rest


def build_eval_set(model, tokenizer, prompts: Sequence[tuple[list, str | None]], heldout, max_new_tokens: int,
                   batch_size: int = 16) -> pl.DataFrame:
    """The evaluation conversations: `prompts` answered greedily by the chat `model` (source "generated") and
    `heldout` conversations with their own responses (source "heldout"): a list of (messages, behaviour) or
    an already-rendered corpus frame. Responses the model ends immediately are dropped (nothing to score)."""
    responses = [r.strip() for r in greedy_responses(model, tokenizer, [p for p, _ in prompts], max_new_tokens,
                                                      stop_ids(tokenizer, model), batch_size)]
    rows = []
    for (prompt, behaviour), response in zip(prompts, responses):
        if response:
            rows.append(_row(tokenizer, prompt + [{"role": "assistant", "content": response}], "generated",
                             behaviour, prompt[-1]["content"]))
    if len(rows) < len(prompts):
        log.warning("dropped %d of %d prompts the chat model answered with an empty response",
                    len(prompts) - len(rows), len(prompts))
    if isinstance(heldout, pl.DataFrame):
        rows += [dict(source="heldout", behaviour=r["behaviour"],
                      prompt=tokenizer.decode(first_user_turn(r["input_ids"], r["template"], r["assistant"])).strip(),
                      input_ids=r["input_ids"], template=r["template"], assistant=r["assistant"], text=r["text"])
                 for r in heldout.iter_rows(named=True)]
    else:
        rows += [_row(tokenizer, messages, "heldout", behaviour, messages[0]["content"]) for messages, behaviour in heldout]
    df = pl.DataFrame(rows, schema={k: v for k, v in EVAL_SCHEMA.items() if k != "seq"})
    return df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("seq")).select(list(EVAL_SCHEMA))


def run_eval_set(params: Mapping, chat: str, out: str | Path, toy_data: str | Path | None = None,
                 corpus: str | Path | None = None, device: str | None = None) -> pl.DataFrame:
    """The generate_eval_set stage: `params` = the {models, causal, device} slice; prompts and held-out
    conversations from the built pair's chat corpus (`toy_data`/chat.parquet, models.chat toy | finetune) or
    from the validation `corpus` (real pairs) -> `out` (eval_set.parquet)."""
    cp, rt = params["causal"], Runtime.from_params(params, device)
    built = params["models"]["chat"] in ("toy", "finetune")
    seed_everything(cp["seed"])
    tokenizer = AutoTokenizer.from_pretrained(chat)
    model = AutoModelForCausalLM.from_pretrained(chat, dtype=DTYPES[rt.dtype]).to(resolve_device(rt.device)).eval()
    if built:
        if not toy_data:
            raise ValueError("a built pair (models.chat: toy | finetune) needs toy_data (--toy-data)")
        chat_df = pl.read_parquet(Path(toy_data) / "chat.parquet")
        prompts, heldout = toy_sources(chat_df, cp["eval_prompts"], cp["heldout_convs"], cp["seed"])
    else:
        if not corpus:
            raise ValueError("a real pair needs corpus (--corpus, the validation corpus parquet)")
        prompts, heldout = corpus_sources(pl.read_parquet(corpus), tokenizer, cp["eval_prompts"],
                                          cp["heldout_convs"], cp["seed"])
    df = build_eval_set(model, tokenizer, prompts, heldout, cp["max_new_tokens"], cp["batch_size"])
    io.write_parquet(out, df)
    return df
