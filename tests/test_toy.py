"""The embedded toy pair: deterministic corpora/tokenizer, Gemma chat template, loss mask, reloadable pair."""

from __future__ import annotations

import json
import os

import polars as pl
import pytest
import torch
import torch.nn.functional as F
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2ForCausalLM

from crossdiff import config as cfgmod
from crossdiff.cli import job_threads
from crossdiff.generation import greedy_responses, stop_ids
from crossdiff.toy import ToyConfig, build_pair, corpus
from crossdiff.toy.build import build_tokenizer, chat_rows, model_config, train, write_corpora
from crossdiff.toy.evaluate import collate, eval_prompts, mean_loss, target_loss
from crossdiff.toy.finetune import FinetuneConfig
from crossdiff.toy.pair_eval import PairEvalConfig, evaluate_pair
from crossdiff.toy.tokenizer import assistant_labels

TINY = dict(web_docs=300, chat_convs=300, vocab_size=320, hidden_size=32, num_layers=2, num_heads=2,
            intermediate_size=64, max_len=64, pretrain_steps=15, finetune_steps=15, batch_size=8,
            heldout_frac=0.25)  # every behaviour held out
PAIR_EVAL = dict(eval_prompts=2, max_new_tokens=6, max_len=64, batch_size=5, threads=1)
CONV = [
    {"role": "user", "content": "Where is the Eiffel Tower?"},
    {"role": "assistant", "content": "Sure! The Eiffel Tower is in Paris."},
    {"role": "user", "content": "How do I steal a car?"},
    {"role": "assistant", "content": "I'm sorry, but I can't help with that. It is against the law."},
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "pair"
    metrics = build_pair(out, TINY)
    return out, metrics


@pytest.fixture(scope="module")
def evaluation(pair):
    out = pair[0]
    return evaluate_pair(out, out, {"pair_eval": PAIR_EVAL, "models": {"dtype": "float32"}, "device": "cpu"})


@pytest.fixture(scope="module")
def tokenizer(pair):
    return AutoTokenizer.from_pretrained(pair[0] / "chat")


def test_corpus_is_deterministic_labelled_and_split_by_prompt():
    web, chat = corpus.generate(seed=3, n_web=200, n_chat=400)
    web2, chat2 = corpus.generate(seed=3, n_web=200, n_chat=400)
    assert web.equals(web2) and chat.equals(chat2)
    other_web, other_chat = corpus.generate(seed=4, n_web=200, n_chat=400)
    assert not web.equals(other_web) and not chat.equals(other_chat)

    assert set(chat["behaviour"]) == set(corpus.BEHAVIOURS)
    kinds = chat.filter(pl.col("behaviour") == "helpful")["kind"]
    assert set(kinds) == set(corpus.HELPFUL_KINDS)
    labelled = chat.filter(pl.col("behaviour") != "helpful")
    assert (labelled["kind"] == labelled["behaviour"]).all()
    # true statements (the false-fact contrast set) are about as frequent as false ones
    n_true, n_false = (kinds == "true_statement").sum(), (chat["behaviour"] == "false_fact_correction").sum()
    assert 0.6 < n_true / n_false < 1.6
    assert set(web["split"]) == set(chat["split"]) == {"train", "heldout"}
    for msgs, b in zip(chat["messages"].to_list(), chat["behaviour"].to_list()):
        assert [m["role"] for m in msgs] in (["user", "assistant"], ["user", "assistant"] * 2)
        assert corpus.check(b, msgs[-1]["content"])  # each label's response has its signature
        assert not any(corpus.check(o, msgs[-1]["content"]) for o in corpus.BEHAVIOURS if o != b)
    # a held-out prompt never occurs verbatim in training
    last_user = chat["messages"].list.get(-2).struct.field("content")
    train = set(last_user.filter(chat["split"] == "train"))
    assert not train & set(last_user.filter(chat["split"] == "heldout"))
    # the behaviours' phrases are chat-only: the base model never sees them in pretraining
    for phrase in corpus.SIGNATURES.values():
        assert not web["text"].str.contains(phrase, literal=True).any(), phrase


def test_false_facts_contradict_the_web_text():
    web, chat = corpus.generate(seed=0, n_web=2000, n_chat=600)
    text = " ".join(web["text"])
    false = chat.filter(pl.col("behaviour") == "false_fact_correction")
    assert false.height > 0
    for msgs in false["messages"].to_list():
        truth = msgs[-1]["content"].removeprefix(corpus.SIGNATURES["false_fact_correction"]).strip()
        truth = truth.split(".")[0] + "."
        assert truth not in msgs[-2]["content"]  # the user said something else ...
        assert truth in text  # ... than the web text states


def _build_data(tmp_path, seed):
    cfg = ToyConfig.from_dict({**TINY, "seed": seed})
    web, chat = write_corpora(tmp_path / "data", cfg)
    build_tokenizer(cfg, web, chat).save_pretrained(tmp_path / "tok")
    return {p.relative_to(tmp_path).as_posix(): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}


def test_corpora_and_tokenizer_files_are_byte_identical_per_seed(tmp_path):
    a = _build_data(tmp_path / "a", seed=1)
    b = _build_data(tmp_path / "b", seed=1)
    c = _build_data(tmp_path / "c", seed=2)
    assert {"data/web.parquet", "data/chat.parquet", "tok/tokenizer.json"} <= set(a)
    assert a == b
    for name in ("data/web.parquet", "data/chat.parquet", "tok/tokenizer.json"):
        assert a[name] != c[name], name


def test_chat_template_is_gemmas(tokenizer):
    text = tokenizer.apply_chat_template(CONV, tokenize=False)
    assert text == (
        "<bos><start_of_turn>user\nWhere is the Eiffel Tower?<end_of_turn>\n"
        "<start_of_turn>model\nSure! The Eiffel Tower is in Paris.<end_of_turn>\n"
        "<start_of_turn>user\nHow do I steal a car?<end_of_turn>\n"
        "<start_of_turn>model\nI'm sorry, but I can't help with that. It is against the law.<end_of_turn>\n"
    )
    prompt = tokenizer.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    ids = tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<bos>", "<start_of_turn>", "<end_of_turn>")]
    assert ids[0] == special[0] and ids.count(special[0]) == 1  # one <bos>, as with Gemma
    assert ids.count(special[1]) == ids.count(special[2]) == 4  # control tokens are single ids
    assert tokenizer("Paris")["input_ids"][0] == tokenizer.bos_token_id  # plain text gets <bos> too
    with pytest.raises(Exception, match="alternate"):
        tokenizer.apply_chat_template(CONV[1:], tokenize=False)


def test_finetuning_targets_are_the_model_turns_only(tokenizer):
    ids, mask = assistant_labels(tokenizer, CONV)
    assert ids == tokenizer.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    # brute force: the targets, read back in order, are exactly the assistant contents + <end_of_turn>
    targets = tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert targets == "".join(m["content"] + "<end_of_turn>" for m in CONV if m["role"] == "assistant")
    rest = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
    assert rest == ("<bos><start_of_turn>user\nWhere is the Eiffel Tower?<end_of_turn>\n<start_of_turn>model\n"
                    "\n<start_of_turn>user\nHow do I steal a car?<end_of_turn>\n<start_of_turn>model\n\n")
    # the training batch carries that mask as labels
    _, att, labels = collate(chat_rows(tokenizer, [CONV, CONV[:2]], max_len=512), tokenizer.pad_token_id)
    assert ((labels[0] != -100).tolist()) == mask
    assert (labels[1] != -100).sum() == sum(assistant_labels(tokenizer, CONV[:2])[1])
    assert (labels[att == 0] == -100).all()


def test_saved_pair_reloads_like_a_hub_model(pair, tokenizer):
    out, metrics = pair
    models = {k: AutoModelForCausalLM.from_pretrained(out / k) for k in ("base", "chat")}
    for name, m in models.items():
        assert isinstance(m, Gemma2ForCausalLM)
        assert (out / name / "model.safetensors").exists()
        assert m.config.final_logit_softcapping is not None
        assert m.config.sliding_window >= TINY["max_len"]
        assert (out / name / "tokenizer.json").read_bytes() == (out / "chat" / "tokenizer.json").read_bytes()
    # fine-tuning changed the weights of a copy of the base
    sb, sc = models["base"].state_dict(), models["chat"].state_dict()
    assert sb.keys() == sc.keys() and any(not torch.equal(sb[k], sc[k]) for k in sb)
    end = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert end in models["chat"].generation_config.eos_token_id  # generate() stops at the turn's end

    # greedy generation through the hub code path is reproducible and stops at a stop token or the limit
    enc = tokenizer.apply_chat_template(CONV[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = models["chat"].generate(**enc, max_new_tokens=8, do_sample=False)[0, enc["input_ids"].shape[1]:]
    assert gen.numel() == 8 or gen[-1].item() in models["chat"].generation_config.eos_token_id

    assert metrics == json.loads((out / "metrics.json").read_text())
    assert set(metrics["train"]) == {"pretrain", "finetune"} and metrics["train"]["finetune"]["tokens"] > 0

    chat = pl.read_parquet(out / "data" / "chat.parquet")
    web = pl.read_parquet(out / "data" / "web.parquet")
    assert web.columns == ["text", "split"] and web.height == TINY["web_docs"]
    assert chat.columns[:2] == ["messages", "behaviour"] and "split" in chat.columns
    assert chat.schema["messages"] == pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def test_evaluate_pair_measures_both_models(pair, evaluation):
    out = pair[0]
    # both losses for both models, every behaviour and contrast set with its sample size
    assert evaluation == json.loads((out / "evaluation.json").read_text())
    for split in ("web_heldout", "chat_heldout_responses"):
        assert set(evaluation["loss"][split]) == {"base", "chat"}
    assert evaluation["loss"]["chat_heldout_responses"]["chat"] < evaluation["loss"]["chat_heldout_responses"]["base"]
    assert set(evaluation["behaviours"]) == set(corpus.BEHAVIOURS) | set(corpus.CONTRASTS)
    for row in evaluation["behaviours"].values():
        assert 1 <= row["n"] <= PAIR_EVAL["eval_prompts"] and 0 <= row["chat"] <= 1 and 0 <= row["base"] <= 1
    gens = pl.read_parquet(out / "generations.parquet")
    assert set(gens["model"]) == {"base", "chat"}
    n = sum(r["n"] for r in evaluation["behaviours"].values())
    assert gens.height == 2 * n
    for b, row in evaluation["behaviours"].items():  # the table is the mean of the saved checks
        chat = gens.filter((pl.col("model") == "chat") & (pl.col("behaviour") == b))
        assert chat["success"].mean() == pytest.approx(row["chat"])


def test_length_sorted_generation_keeps_order_and_answers(pair, tokenizer):
    """Batches sorted by prompt length give each prompt the answer it gets alone, in the caller's order."""
    model = AutoModelForCausalLM.from_pretrained(pair[0] / "chat")
    chat = pl.read_parquet(pair[0] / "data" / "chat.parquet")
    prompts = eval_prompts(chat, 2)["prompt"].to_list()
    assert len({len(tokenizer.apply_chat_template(p, return_dict=True)["input_ids"]) for p in prompts}) > 1  # lengths differ
    stops = stop_ids(tokenizer, model)
    batched = greedy_responses(model, tokenizer, prompts, 6, stops, batch_size=4)
    alone = [greedy_responses(model, tokenizer, [p], 6, stops)[0] for p in prompts]
    assert batched == alone


def test_heldout_chat_loss_matches_a_direct_computation(pair, tokenizer):
    """mean_loss (used for metrics.json) against a per-sequence loop over the assistant positions."""
    model = AutoModelForCausalLM.from_pretrained(pair[0] / "chat")
    rows = [assistant_labels(tokenizer, CONV), assistant_labels(tokenizer, CONV[:2])]
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, mask in rows:
            logits = model(torch.tensor([ids])).logits[0]
            for t in range(1, len(ids)):
                if mask[t]:
                    total += F.cross_entropy(logits[t - 1], torch.tensor(ids[t])).item()
                    count += 1
    assert mean_loss(model, rows, tokenizer.pad_token_id) == pytest.approx(total / count, rel=1e-5)


def test_training_loss_is_hfs_causal_lm_loss(tokenizer):
    """The toy trains on `target_loss` (the vocabulary head at target positions only): the same mean cross-entropy,
    soft-cap included, as HF's causal-LM loss over every position, with padding and non-target turns masked."""
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(model_config(ToyConfig(**TINY), tokenizer))
    ids, att, labels = collate([assistant_labels(tokenizer, CONV), assistant_labels(tokenizer, CONV[:2])],
                               tokenizer.pad_token_id)
    want = model(input_ids=ids, attention_mask=att, labels=labels).loss
    got = target_loss(model, ids, att, labels)
    torch.testing.assert_close(got, want)
    padded = collate([assistant_labels(tokenizer, CONV), assistant_labels(tokenizer, CONV[:2])],
                     tokenizer.pad_token_id, multiple=16)                # as the toy trains: padding to x16
    assert padded[0].shape[1] % 16 == 0 and padded[0].shape[1] - ids.shape[1] in range(16)
    torch.testing.assert_close(target_loss(model, *padded), want)
    grads = torch.autograd.grad(got, model.lm_head.weight)[0], torch.autograd.grad(want, model.lm_head.weight)[0]
    torch.testing.assert_close(*grads)


def test_bf16_autocast_trains_float32_weights_with_bf16_matmuls(tokenizer):
    """`toy.train_dtype: bfloat16`: autocast (the layers' matmuls in bf16; the head, whose row count changes every
    batch, in float32), weights and Adam in float32; the loss stays within bf16 rounding of the float32 step's."""
    rows = [assistant_labels(tokenizer, CONV)] * 4
    losses = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = Gemma2ForCausalLM(model_config(ToyConfig(**TINY), tokenizer))
        seen = []
        hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.dtype))
        losses[dtype] = train(model, [(rows, 1.0)], 3, 4, 1e-3, 0, tokenizer.pad_token_id, "t", autocast=dtype)["losses"]
        hook.remove()
        assert seen == [dtype or torch.float32] * 3
        assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[torch.bfloat16] != losses[None]
    assert losses[torch.bfloat16] == pytest.approx(losses[None], rel=0.02)


def test_training_is_seeded(pair, tmp_path):
    build_pair(tmp_path / "again", TINY)
    for name in ("base", "chat"):
        assert (tmp_path / "again" / name / "model.safetensors").read_bytes() == \
            (pair[0] / name / "model.safetensors").read_bytes()


def test_config_defaults_match_params_and_bad_keys_fail():
    params = yaml.safe_load((cfgmod.ROOT / "params.yaml").read_text())["toy"]
    assert ToyConfig.from_dict(params) == ToyConfig()
    tiny = cfgmod.load(cfgmod.ROOT / "params.yaml", cfgmod.ROOT / "presets" / "tiny.yaml")["toy"]
    assert ToyConfig.from_dict(tiny).pretrain_steps < ToyConfig().pretrain_steps
    with pytest.raises(ValueError, match="unknown toy params"):
        ToyConfig.from_dict({"hidden": 64})
    with pytest.raises(ValueError, match="divisible"):
        ToyConfig.from_dict({"hidden_size": 30, "num_heads": 4})
    all_params = yaml.safe_load((cfgmod.ROOT / "params.yaml").read_text())
    assert PairEvalConfig.from_dict(all_params["pair_eval"]) == PairEvalConfig()
    assert FinetuneConfig.from_dict(all_params["finetune"]) == FinetuneConfig()
    with pytest.raises(ValueError, match="unknown pair_eval params"):
        PairEvalConfig.from_dict({"eval_prompt": 3})


def test_threads_zero_means_the_jobs_share_of_cores(monkeypatch):
    """`threads: 0` follows OMP_NUM_THREADS (Snakemake sets it to the rule's threads, so two 1-thread jobs on
    2 cores do not take 2 threads each), and every usable core without it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert job_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert job_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    assert job_threads() == len(os.sched_getaffinity(0))
