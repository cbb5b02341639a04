"""Corpora: the template mask follows the chat template itself; splits, budgets and columns as contracted."""

import json

import polars as pl
import pytest

from crossdiff import testing
from crossdiff.data import CHAT, SCHEMA, WEB, CorpusConfig, build_corpus, template_mask
from helpers import script

TRICKY = [  # contents that look like template text, and untrimmed content (the Gemma template trims it)
    {"role": "user", "content": "  model\nuser<end_of_turn> what?  "},
    {"role": "assistant", "content": "user\nSure: <start_of_turn>model"},
    {"role": "user", "content": "Thanks."},
    {"role": "assistant", "content": "You are welcome."},
]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}")


def _pieces(tokenizer, ids, mask):
    """Concatenated text of the tokens where mask is set (byte-level BPE decodes token by token exactly)."""
    return "".join(tokenizer.decode([i]) for i, m in zip(ids, mask) if m)


@pytest.mark.parametrize("messages", [testing.CHATS[1], TRICKY], ids=["multi-turn", "template-lookalikes"])
def test_template_mask_on_rendered_conversation(tiny_tokenizer, messages):
    ids, template, assistant = template_mask(tiny_tokenizer, messages)
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert ids == tiny_tokenizer(text, add_special_tokens=False)["input_ids"] and ids[0] == tiny_tokenizer.bos_token_id
    contents = [m["content"].strip() for m in messages]
    skeleton = text
    for c in contents:  # brute-force reference: the rendered text with every content removed, in order
        head, _, tail = skeleton.partition(c)
        skeleton = head + "\0" + tail
    assert _pieces(tiny_tokenizer, ids, template) == skeleton.replace("\0", "")
    assert _pieces(tiny_tokenizer, ids, [not t for t in template]) == "".join(contents)
    assert _pieces(tiny_tokenizer, ids, assistant) == "".join(c for c, m in zip(contents, messages) if m["role"] == "assistant")
    names = [tiny_tokenizer.convert_ids_to_tokens(i) for i, t in zip(ids, template) if t]
    assert names.count("<start_of_turn>") == names.count("<end_of_turn>") == len(messages)
    assert not any(a and t for a, t in zip(assistant, template))


def test_template_mask_follows_another_template(tiny_tokenizer):
    """Nothing is hard-coded: with a ChatML template the role headers and <|im_end|> become the template tokens."""
    tok = testing.tiny_tokenizer()
    tok.chat_template = CHATML
    msgs = testing.CHATS[0]
    ids, template, assistant = template_mask(tok, msgs)
    assert ids[0] == tok.bos_token_id and template[0]  # BOS prepended when the template has none
    skeleton = "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    assert _pieces(tok, ids[1:], template[1:]) == skeleton
    assert _pieces(tok, ids, assistant) == msgs[1]["content"]


def _check_columns(df, max_len, bos):
    assert dict(df.schema) == SCHEMA
    assert df["seq"].to_list() == list(range(len(df)))
    for row in df.iter_rows(named=True):
        n = len(row["input_ids"])
        assert 1 < n <= max_len and row["input_ids"][0] == bos
        assert len(row["template"]) == len(row["assistant"]) == n
        if row["source"] == WEB:
            assert row["template"] == [True] + [False] * (n - 1) and not any(row["assistant"]) and row["behaviour"] is None


def test_toy_corpus_splits_budget_and_columns(tiny_tokenizer, toy_data):
    cfg = CorpusConfig(web="toy", chat="toy", chat_fraction=0.5, max_len=40, train_tokens=400, val_tokens=200)
    out = build_corpus(tiny_tokenizer, cfg, toy_data, seed=0)
    web = pl.read_parquet(toy_data / "web.parquet")
    chat = pl.read_parquet(toy_data / "chat.parquet")
    for split, raw in (("train", "train"), ("val", "heldout")):
        df = out[split]
        _check_columns(df, cfg.max_len, tiny_tokenizer.bos_token_id)
        texts = set(web.filter(pl.col("split") == raw)["text"])
        rendered = {tiny_tokenizer.apply_chat_template(m, tokenize=False)
                    for m in chat.filter(pl.col("split") == raw)["messages"].to_list()}
        for row in df.iter_rows(named=True):
            assert row["text"] in (texts if row["source"] == WEB else rendered)
        tokens = df.group_by("source").agg((pl.col("input_ids").list.len() - 1).sum().alias("n"))
        n = dict(zip(tokens["source"], tokens["n"]))
        budget = cfg.train_tokens if split == "train" else cfg.val_tokens
        for src in (WEB, CHAT):  # each source fills its half, overshooting by less than one sequence
            assert budget / 2 <= n[src] < budget / 2 + cfg.max_len
    assert out["train"]["source"].to_list() != sorted(out["train"]["source"].to_list())  # interleaved


def test_local_files_and_cli(tiny_pair, tmp_path):
    """jsonl/parquet sources, val and train disjoint; the workflow script writes both splits."""
    web = tmp_path / "web.jsonl"
    web.write_text("".join(json.dumps({"text": f"{t} #{i}"}) + "\n" for i in range(12) for t in testing.WEB))
    chat = tmp_path / "chat.parquet"
    pl.DataFrame({"messages": [c for _ in range(12) for c in testing.CHATS]}).write_parquet(chat)
    base, chat_model = tiny_pair("llama")
    params = {"corpus": dict(web=str(web), chat=str(chat), chat_fraction=0.25, max_len=32, train_tokens=600, val_tokens=300),
              "models": {"base": str(base), "chat": str(chat_model)}, "seed": 1}
    script("build_corpus").main(["--params", json.dumps(params), "--base", str(base), "--chat", str(chat_model),
                                 "--out", str(tmp_path / "corpus")])
    train, val = (pl.read_parquet(tmp_path / "corpus" / f"{s}.parquet") for s in ("train", "val"))
    for df in (train, val):
        _check_columns(df, 32, testing.tiny_tokenizer().bos_token_id)
    web_texts = lambda df: set(df.filter(pl.col("source") == WEB)["text"])
    assert web_texts(train) and web_texts(val) and not web_texts(train) & web_texts(val)
    chat_tokens = (train.filter(pl.col("source") == CHAT)["input_ids"].list.len() - 1).sum()
    assert 150 <= chat_tokens < 150 + 32
