"""Token corpora for activation caching: web text + chat conversations, with a chat-template mask.

One row per sequence (`results/corpus/{pair}/{split}.parquet`): `seq`, `input_ids` (BOS first), `template`
(chat-template/control tokens), `assistant` (content of assistant turns), `source` (0 web, 1 chat),
`behaviour` (the toy pair's label, else null), `text` (the rendered text, before truncation).

The template mask is derived from the chat template itself: the conversation is rendered once with its
real contents and once with placeholder contents; what the placeholder rendering has around the
placeholders is the template's own text, and every token with no character inside a message's content is
a template token (paper §3: `<start_of_turn>`, `user`, `model`, `<end_of_turn>`, newlines for Gemma 2).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
from jinja2 import TemplateError
from tqdm import tqdm

log = logging.getLogger(__name__)

WEB, CHAT = 0, 1
SCHEMA = {"seq": pl.Int64, "input_ids": pl.List(pl.Int32), "template": pl.List(pl.Boolean),
          "assistant": pl.List(pl.Boolean), "source": pl.UInt8, "behaviour": pl.String, "text": pl.String}
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no template trims or escapes them


def _content_spans(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int, str]]]:
    """The rendered conversation and the character span (start, end, role) of each message's content."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    masked = [{"role": m["role"], "content": _PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    skeleton = tokenizer.apply_chat_template(masked, tokenize=False)
    pieces, rest = [], skeleton  # template text before message 0, between messages, after the last one
    for i in range(len(messages)):
        before, sep, rest = rest.partition(_PLACEHOLDER.format(i))
        if not sep:
            raise ValueError("the chat template drops or rewrites message contents; cannot derive the template mask")
        pieces.append(before)
    pieces.append(rest)
    if not text.startswith(pieces[0]):
        raise ValueError("the chat template renders differently with placeholder contents")
    spans, pos = [], len(pieces[0])
    for m, after in zip(messages, pieces[1:]):
        for content in dict.fromkeys([m["content"], m["content"].strip()]):  # templates may trim contents
            if text.startswith(content + after, pos) and (after or pos + len(content) == len(text)):
                spans.append((pos, pos + len(content), m["role"]))
                pos += len(content) + len(after)
                break
        else:
            raise ValueError(f"cannot locate the content of a {m['role']!r} message in the rendered conversation")
    return text, spans


def template_mask(tokenizer, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool], list[bool]]:
    """Token ids of the rendered conversation, which are template tokens (no character of message content),
    and which belong to assistant-turn content (the closing end-of-turn marker is template)."""
    text, spans = _content_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, template, assistant = list(enc["input_ids"]), [], []
    for a, b in enc["offset_mapping"]:
        inside = [role for s, e, role in spans if a < e and b > s]
        template.append(not inside)
        assistant.append("assistant" in inside)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):  # every sequence starts with BOS, as web text does
        ids, template, assistant = [bos] + ids, [True] + template, [False] + assistant
    return ids, template, assistant


def encode_web(tokenizer, texts: Sequence[str], max_len: int) -> list[dict[str, Any]]:
    """`<bos> text`, truncated to max_len tokens; only the BOS is a control token."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for text, ids in zip(texts, tokenizer(list(texts), add_special_tokens=False)["input_ids"]):
        ids = (bos + list(ids))[:max_len]
        rows.append(dict(input_ids=ids, template=[i < len(bos) for i in range(len(ids))], assistant=[False] * len(ids),
                         source=WEB, behaviour=None, text=text))
    return rows


def encode_chat(tokenizer, messages: Sequence[Mapping[str, str]], max_len: int, behaviour: str | None = None) -> dict[str, Any]:
    ids, template, assistant = template_mask(tokenizer, messages)
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
    return dict(input_ids=ids[:max_len], template=template[:max_len], assistant=assistant[:max_len],
                source=CHAT, behaviour=behaviour, text=text)


# ---- sources ---------------------------------------------------------------------------------------------

def _read_local(path: Path) -> pl.DataFrame:
    if path.suffix in (".jsonl", ".ndjson"):
        return pl.read_ndjson(path)
    if path.suffix == ".json":
        return pl.read_json(path)
    if path.suffix == ".parquet":
        return pl.read_parquet(path)
    raise ValueError(f"{path}: corpus files must be .jsonl, .json or .parquet")


def _shuffled(df: pl.DataFrame, seed: int) -> Iterator[Mapping[str, Any]]:
    order = list(range(len(df)))
    random.Random(seed).shuffle(order)
    yield from df[order].iter_rows(named=True)


def _records(spec: str, split: str, seed: int) -> Iterator[Mapping[str, Any]]:
    """Rows of a local file (shuffled with `seed`) or an HF dataset id (`id` or `id:config`, streamed with a
    seeded shuffle buffer, so a 15T-token FineWeb is never downloaded whole)."""
    path = Path(spec)
    if path.exists():
        yield from _shuffled(_read_local(path), seed)
        return
    import datasets  # only needed for hub corpora

    name, _, config = spec.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split, streaming=True)
    yield from ds.shuffle(seed=seed, buffer_size=10_000)


def _docs(records: Iterable[Mapping[str, Any]], kind: str) -> Iterator[tuple[Any, str | None]]:
    """(text, None) for web rows; (messages, behaviour) for chat rows (`messages` or LMSYS's `conversation`)."""
    for r in records:
        if kind == "web":
            if "text" not in r:
                raise ValueError(f"web corpus rows need a `text` column, got {sorted(r)}")
            yield r["text"], None
        else:
            messages = r.get("messages", r.get("conversation"))
            if messages is None:
                raise ValueError(f"chat corpus rows need a `messages` column, got {sorted(r)}")
            yield [{"role": m["role"], "content": m["content"]} for m in messages], r.get("behaviour")


@dataclass
class CorpusConfig:
    """The `corpus:` section of params.yaml."""

    web: str
    chat: str
    chat_fraction: float
    max_len: int
    train_tokens: int
    val_tokens: int
    web_split: str = "train"
    chat_split: str = "train"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CorpusConfig:
        return cls(**d)


def _take(tokenizer, docs: Iterator, kind: str, tokens: int, max_len: int, desc: str) -> list[dict]:
    """Encode documents until `tokens` cacheable tokens (BOS excluded) are collected."""
    rows, have, skipped = [], 0, 0
    bar = tqdm(total=tokens, desc=desc, unit="tok", unit_scale=True, disable=tokens == 0)
    while have < tokens:
        try:
            doc, behaviour = next(docs)
        except StopIteration:
            log.warning("%s: source exhausted at %d of %d tokens", desc, have, tokens)
            break
        if kind == "web":
            row = encode_web(tokenizer, [doc], max_len)[0]
        else:
            try:
                row = encode_chat(tokenizer, doc, max_len, behaviour)
            except (TemplateError, ValueError) as e:  # e.g. system turns or non-alternating roles in LMSYS
                skipped += 1
                log.debug("skipping conversation: %s", e)
                continue
        n = len(row["input_ids"]) - 1
        if n <= 0:
            continue
        rows.append(row)
        have += n
        bar.update(n)
    bar.close()
    if skipped:
        log.warning("%s: skipped %d conversations the chat template rejects", desc, skipped)
    return rows


def build_corpus(tokenizer, cfg: CorpusConfig, toy_data: str | Path | None = None, seed: int = 0) -> dict[str, pl.DataFrame]:
    """{"train", "val"} corpora mixing web and chat sequences by tokens (`chat_fraction` of each budget).

    The toy corpora carry their own split (train / heldout); for other sources the validation sequences are
    taken first from one shuffled stream and the training sequences after them, so the two never overlap.
    """
    budgets = {"val": cfg.val_tokens, "train": cfg.train_tokens}
    streams = {}
    for kind, spec, split in (("web", cfg.web, cfg.web_split), ("chat", cfg.chat, cfg.chat_split)):
        if spec == "toy":
            if toy_data is None:
                raise ValueError(f"corpus.{kind} = toy needs the embedded pair's data directory")
            df = pl.read_parquet(Path(toy_data) / f"{kind}.parquet")
            streams[kind] = {s: _docs(_shuffled(df.filter(pl.col("split") == raw), seed), kind)
                             for s, raw in (("train", "train"), ("val", "heldout"))}
        else:
            shared = _docs(_records(spec, split, seed), kind)
            streams[kind] = {"val": shared, "train": shared}
    out = {}
    for split, budget in budgets.items():
        n_chat = round(cfg.chat_fraction * budget)
        rows = (_take(tokenizer, streams["web"][split], "web", budget - n_chat, cfg.max_len, f"{split} web")
                + _take(tokenizer, streams["chat"][split], "chat", n_chat, cfg.max_len, f"{split} chat"))
        random.Random(f"{seed}-{split}").shuffle(rows)  # interleave sources so any prefix is a fair mix
        df = pl.DataFrame(rows, schema={k: v for k, v in SCHEMA.items() if k != "seq"})
        out[split] = df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("seq")).select(list(SCHEMA))
        n_chat = df.filter(pl.col("source") == CHAT)["input_ids"].list.len().sum()
        log.info("%s corpus: %d sequences, %d tokens (%.0f%% chat)", split, len(df), sum(map(len, df["input_ids"])),
                 100 * n_chat / max(1, df["input_ids"].list.len().sum()))
    return out

