"""Causal KL (paper A.8): masks, the ranking pools and latent sets, chunked KL, patched forwards against hooked HF
forwards, bootstrap, CLIs."""

import itertools
import json

import numpy as np
import polars as pl
import pytest
import torch
import yaml

from crossdiff import causal, testing
from crossdiff.config import ROOT
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.data import template_mask
from crossdiff.eval_set import EVAL_SCHEMA, _row, corpus_sources, first_user_turn
from crossdiff.models import load_pair
from helpers import script

LAYER = 1


def brute_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Σ_v p (log p − log q) in float64, straight from the definition."""
    p, q = p_logits.double().softmax(-1), q_logits.double().softmax(-1)
    return (p * (p.log() - q.log())).sum(-1)


def make_crosscoder(d: int, D: int = 40, kind: str = "l1", seed: int = 0) -> CrossCoder:
    """Random weights with distinct base/chat decoders and a non-trivial normalisation, so raw units matter."""
    g = torch.Generator().manual_seed(seed)
    cc = CrossCoder(CrossCoderConfig(d_model=d, dict_size=D, kind=kind, k=4 if kind == "batchtopk" else None),
                    scale=torch.tensor([0.7, 1.6]))
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn(2, d, D, generator=g) / d**0.5)
        cc.b_enc.copy_(0.05 * torch.randn(D, generator=g))
        cc.W_dec.copy_(torch.randn(2, D, d, generator=g) / d**0.5)
        cc.b_dec.copy_(torch.randn(2, d, generator=g))
        if kind == "batchtopk":
            cc.threshold.fill_(0.3)
    return cc


def latent_frame(D: int, chat_only: dict[int, tuple[float, int | None]], dead: set[int] = frozenset(),
                 nu: dict[int, tuple[float | None, float | None]] | None = None) -> pl.DataFrame:
    """latent -> (delta_norm, rank_nu) for the chat-only ones, latent -> (ν^ε, ν^r) in `nu` (null elsewhere);
    every other latent is shared."""
    nu = nu or {}
    return pl.DataFrame({
        "latent": list(range(D)),
        "klass": ["chat_only" if j in chat_only else "shared" for j in range(D)],
        "delta_norm": [chat_only[j][0] if j in chat_only else 0.5 for j in range(D)],
        "rank_nu": [chat_only[j][1] if j in chat_only else None for j in range(D)],
        "nu_eps": [nu.get(j, (None, None))[0] for j in range(D)],
        "nu_r": [nu.get(j, (None, None))[1] for j in range(D)],
        "dead": [j in dead for j in range(D)],
    }, schema_overrides={"rank_nu": pl.Int64, "nu_eps": pl.Float64, "nu_r": pl.Float64})


@pytest.fixture(scope="module")
def pair(tiny_pair):
    base_dir, chat_dir = tiny_pair("gemma2")
    return load_pair(str(base_dir), str(chat_dir), layer=LAYER)


@pytest.fixture(scope="module")
def eval_set(pair):
    """Rendered conversations (one multi-turn, one whose every token is marked template) as the eval set."""
    tok = pair.tokenizer
    rows = [_row(tok, c, "heldout", f"b{i}", c[0]["content"]) for i, c in enumerate(testing.CHATS)]
    rows.append({**rows[0], "template": [True] * len(rows[0]["input_ids"]), "source": "generated"})
    df = pl.DataFrame(rows, schema={k: v for k, v in EVAL_SCHEMA.items() if k != "seq"})
    return df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("seq"))


# ---- masks and sets ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first", [(2, 10), (1, 3)])
def test_masks_select_response_tokens_on_a_rendered_conversation(tiny_tokenizer, first):
    messages = testing.CHATS[1]  # two assistant turns
    ids, _, assistant = template_mask(tiny_tokenizer, messages)
    full, first_m = causal.response_masks(assistant, first)
    runs = [[i for i, _ in grp] for a, grp in itertools.groupby(enumerate(assistant), key=lambda x: x[1]) if a]
    assert len(runs) == 2
    # full: the prediction positions are exactly one before each response token; targets decode to the replies
    assert np.flatnonzero(full).tolist() == [i - 1 for run in runs for i in run]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert [tiny_tokenizer.decode([ids[i] for i in run]).strip() for run in runs] == replies
    # first: tokens lo..hi (1-based) of each response
    lo, hi = first
    assert np.flatnonzero(first_m).tolist() == [i - 1 for run in runs for i in run[lo - 1 : hi]]
    assert not (first_m & ~full).any()
    with pytest.raises(ValueError, match="first_tokens"):
        causal.response_masks(assistant, (0, 3))


def test_legacy_latent_sets_are_the_ranked_halves():
    # chat-only: latent -> (Δnorm, rank_nu); 9 is dead, 8 has no ν, 3 and 4 tie on Δnorm
    chat = {1: (0.95, 6), 3: (0.99, 2), 4: (0.99, 10), 5: (0.91, 4), 6: (0.97, 8), 8: (0.93, None), 9: (1.0, 3)}
    sets = causal.latent_sets(latent_frame(12, chat, dead={9}), pool="legacy")
    live = {j: v for j, v in chat.items() if j != 9}
    by_dn = sorted(live, key=lambda j: (-live[j][0], j))                               # [3, 4, 6, 1, 8, 5]
    by_nu = sorted((j for j in live if live[j][1] is not None), key=lambda j: live[j][1])  # [3, 5, 1, 6, 4]
    assert sets["delta_norm_best"].tolist() == by_dn[:3] == [3, 4, 6]
    assert sets["delta_norm_worst"].tolist() == by_dn[3:] == [1, 8, 5]
    assert sets["nu_best"].tolist() == by_nu[:2] == [3, 5]        # odd count: the middle latent is in neither half
    assert sets["nu_worst"].tolist() == by_nu[3:] == [6, 4]
    few = causal.latent_sets(latent_frame(12, {2: (0.95, 2), 7: (0.92, None)}), pool="legacy")
    assert few["delta_norm_best"].tolist() == [2] and few["delta_norm_worst"].tolist() == [7]
    assert few["nu_best"] is None and few["nu_worst"] is None
    with pytest.raises(ValueError, match="rank_nu"):
        causal.latent_sets(latent_frame(4, {}).drop("rank_nu"), pool="legacy")


def test_legacy_top_n_pool_halves_the_highest_delta_norm_latents_and_reranks_nu():
    # no chat-only class at all (as a BatchTopK crosscoder on a small pair may have): the pool is the top 4 by Δnorm
    df = pl.DataFrame({"latent": range(8), "klass": ["shared"] * 6 + ["other"] * 2,
                       "delta_norm": [0.5, 0.85, 0.6, 0.8, 0.7, 0.88, 0.75, 0.1],
                       "nu_eps": [0.1, 0.4, 0.0, -0.1, 0.2, 0.3, 0.5, 0.0], "nu_r": [0.1, 0.1, 0.0, 0.2, -0.4, 0.3, 0.0, 0.0],
                       "rank_nu": [None] * 8, "dead": [False] * 7 + [True]}, schema_overrides={"rank_nu": pl.Int64})
    assert causal.latent_sets(df, pool="legacy")["delta_norm_best"] is None
    sets = causal.latent_sets(df, top_n=4, pool="legacy")            # pool by Δnorm: 5, 1, 3, 6
    assert sets["delta_norm_best"].tolist() == [5, 1] and sets["delta_norm_worst"].tolist() == [3, 6]
    # |ν^ε| ranks in the pool: 3 (0.1) 1, 5 (0.3) 2, 1 (0.4) 3, 6 (0.5) 4; |ν^r|: 6 (0) 1, 1 (0.1) 2, 3 (0.2) 3, 5 (0.3) 4
    # sums: 3 -> 4, 1 -> 5, 6 -> 5, 5 -> 6: 3 is most chat-specific, 5 least; 1 and 6 tie in the middle
    nu_order = sets["nu_best"].tolist() + sets["nu_worst"].tolist()
    assert nu_order[0] == 3 and nu_order[-1] == 5 and set(nu_order) == {1, 3, 5, 6}


def authors_table() -> pl.DataFrame:
    """A hand-made latent table around the authors' pool's edges: ν^ε, ν^r at -0.1 and 2 (kept), just outside
    (dropped), NaN and null (dropped), a dead and a shared latent with in-range ν (dropped)."""
    rows = [  # latent, klass, Δnorm, ν^ε, ν^r, dead
        (0, "chat_only", 0.95, 0.0, 0.0, False),
        (1, "chat_only", 0.99, -0.1, 0.5, False),       # lower bound kept
        (2, "chat_only", 0.91, 2.0, 2.0, False),        # upper bound kept
        (3, "chat_only", 1.00, -0.1001, 0.3, False),    # just below
        (4, "chat_only", 0.97, 0.5, 2.0001, False),     # just above
        (5, "chat_only", 0.96, float("nan"), 0.1, False),
        (6, "chat_only", 0.98, None, 0.1, False),
        (7, "chat_only", 0.94, 0.1, 0.1, True),         # dead
        (8, "shared", 0.50, 0.2, 0.2, False),           # not chat-only
        (9, "chat_only", 0.92, -0.05, -0.05, False),
        (10, "chat_only", 0.93, 1.5, 0.1, False),
    ]
    df = pl.DataFrame(rows, schema={"latent": pl.Int64, "klass": pl.String, "delta_norm": pl.Float64,
                                    "nu_eps": pl.Float64, "nu_r": pl.Float64, "dead": pl.Boolean}, orient="row")
    from crossdiff.latents import add_rank_nu

    ranked = add_rank_nu(df.fill_nan(None), pool=(pl.col("klass") == "chat_only") & ~pl.col("dead"))  # as analyse does
    return df.with_columns(ranked["rank_nu"])


def test_authors_pool_filters_nu_and_ranks_signed_nu_over_one_pool():
    df = authors_table()
    pools = causal.ranked_pools(df)                                   # default: the authors' pool
    kept = {0, 1, 2, 9, 10}
    assert set(pools["delta_norm"]["latent"]) == set(pools["nu"]["latent"]) == kept   # one pool for both rankings
    # brute force: Δnorm descending; ν by rank(ν^ε) + rank(ν^r) of the signed values within the pool
    nu = {j: (e, r) for j, _, _, e, r, _ in df.select("latent", "klass", "delta_norm", "nu_eps", "nu_r", "dead").rows()
          if j in kept}
    dn = dict(zip(df["latent"], df["delta_norm"]))
    rank = lambda k: {j: 1 + sorted(nu, key=lambda i: (nu[i][k], i)).index(j) for j in nu}
    re_, rr = rank(0), rank(1)
    assert pools["delta_norm"]["latent"].to_list() == sorted(kept, key=lambda j: -dn[j]) == [1, 0, 10, 9, 2]
    assert pools["nu"]["latent"].to_list() == sorted(kept, key=lambda j: (re_[j] + rr[j], j)) == [9, 0, 1, 10, 2]
    sets = causal.latent_sets(df)
    assert sets["delta_norm_best"].tolist() == [1, 0] and sets["delta_norm_worst"].tolist() == [9, 2]
    assert sets["nu_best"].tolist() == [9, 0] and sets["nu_worst"].tolist() == [10, 2]
    legacy = causal.ranked_pools(df, pool="legacy")
    assert set(legacy["delta_norm"]["latent"]) == {0, 1, 2, 3, 4, 5, 6, 9, 10}       # every live chat-only latent
    assert set(legacy["nu"]["latent"]) == {0, 1, 2, 3, 4, 9, 10}                      # ... with both ν, any value
    assert causal.pool_sizes(df) == {"candidates": 9, "authors": {"delta_norm": 5, "nu": 5},
                                     "legacy": {"delta_norm": 9, "nu": 7}}
    # a wider range keeps the just-outside latents; NaN, null, dead and shared stay out
    assert set(causal.ranked_pools(df, nu_range=(-0.2, 2.1))["nu"]["latent"]) == kept | {3, 4}
    # top_n: the pool is the top_n live latents by Δnorm (3, 1, 6, 4, 5), filtered the same way
    assert causal.ranked_pools(df, top_n=5)["delta_norm"]["latent"].to_list() == [1]
    with pytest.raises(ValueError, match="causal.pool"):
        causal.latent_sets(df, pool="mine")
    with pytest.raises(ValueError, match="causal.nu_range"):
        causal.latent_sets(df, nu_range=(2, -0.1))
    with pytest.raises(ValueError, match="nu_eps"):
        causal.latent_sets(df.drop("nu_eps"))


def test_pool_defaults_equal_params_yaml():
    cp = yaml.safe_load((ROOT / "params.yaml").read_text())["causal"]
    assert cp["pool"] == causal.POOLS[0] and tuple(cp["nu_range"]) == causal.NU_RANGE


# ---- KL and patching -----------------------------------------------------------------------------------------

def test_chunked_kl_matches_the_definition():
    g = torch.Generator().manual_seed(0)
    p, q = 3 * torch.randn(23, 57, generator=g), 3 * torch.randn(23, 57, generator=g)
    ref = brute_kl(p, q)
    for chunk in (1, 5, 23, 100):
        torch.testing.assert_close(causal.kl_divergence(p, q, chunk).double(), ref, rtol=1e-5, atol=1e-6)
    assert causal.kl_divergence(p, p, 4).abs().max() == 0  # KL of a distribution against itself
    assert (causal.kl_divergence(p, q) > 0).all()
    with pytest.raises(ValueError, match="shapes"):
        causal.kl_divergence(p, q[:, :3])


def test_latent_patch_is_the_decoder_difference_sum():
    cc = make_crosscoder(8, 12)
    f = torch.rand(5, 12)
    S = torch.tensor([1, 4, 7])
    raw = cc.decoder_raw()
    diff = raw[1] - raw[0]
    loop = sum(f[:, j, None] * (raw[1, j] - raw[0, j]) for j in S.tolist())  # Σ_{j∈S} f_j (d_j^chat − d_j^base)
    torch.testing.assert_close(causal.latent_patch(f, diff, S), loop)
    keep = torch.zeros(12)
    keep[S] = 1
    via_decode = cc.decode(f * keep) - cc.decode(torch.zeros_like(f))  # biases cancel; decode is in raw units
    torch.testing.assert_close(causal.latent_patch(f, diff, S), via_decode[:, 1] - via_decode[:, 0], rtol=1e-5, atol=1e-5)


def _hooked_logits(chat, ids, layer, new_hidden):
    """The chat model's own forward with decoder layer `layer`'s output replaced (an independent path)."""
    def hook(module, args, out):
        return (new_hidden,) + tuple(out[1:]) if isinstance(out, tuple) else new_hidden
    handle = chat.model.layers[layer].register_forward_hook(hook)
    try:
        return chat(input_ids=ids).logits[0]
    finally:
        handle.remove()


@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_conditions_match_hooked_forwards(pair, eval_set, kind):
    d = pair.chat.config.hidden_size
    cc = make_crosscoder(d, kind=kind)
    sets = causal.latent_sets(latent_frame(40, {j: (0.9 + j / 1000, 40 - j) for j in range(0, 40, 3)}), pool="legacy")
    tokens = causal.evaluate(pair.base, pair.chat, cc, eval_set, LAYER, sets, batch_size=2,
                             bos_id=pair.tokenizer.bos_token_id, pad_id=pair.tokenizer.pad_token_id, chunk=3)
    bos = pair.tokenizer.bos_token_id
    with torch.inference_mode():
        for row in eval_set.iter_rows(named=True):
            ids = torch.tensor([row["input_ids"]])
            full, _ = causal.response_masks(row["assistant"])
            h_b = pair.base(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
            h_c = pair.chat(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0]
            p_chat = pair.chat(input_ids=ids).logits[0][full]
            f = cc.encode(torch.stack([h_b, h_c], 1))
            rec = cc.decode(f) - cc.decode(torch.zeros_like(f))
            tmpl = torch.tensor(row["template"])
            expected = {
                "none": h_b,
                "template": torch.where(tmpl[:, None], h_c, h_b),
                "all": torch.where((ids[0] == bos)[:, None], h_b, h_b + rec[:, 1] - rec[:, 0]),
            }
            ours = tokens.seq == row["seq"]
            assert ours.sum() == full.sum()
            for c, h in expected.items():
                ref = brute_kl(p_chat, _hooked_logits(pair.chat, ids, LAYER, h[None])[full])
                np.testing.assert_allclose(tokens.kl[c][ours], ref.numpy(), rtol=2e-4, atol=2e-6, err_msg=c)
            if all(row["template"]):  # template = every position: h' = h_chat, so the patched model is the chat model
                assert np.abs(tokens.kl["template"][ours]).max() < 1e-6
            else:
                assert tokens.kl["none"][ours].mean() > 1e-4  # the two models do differ
    # the latent halves are real, distinct subsets: each changes the output, and differently
    for r in causal.RANKINGS:
        assert not np.allclose(tokens.kl[f"{r}_best"], tokens.kl[f"{r}_worst"])


# ---- statistics ----------------------------------------------------------------------------------------------

def test_conversation_bootstrap_resamples_whole_conversations():
    rng = np.random.default_rng(1)
    groups = np.repeat([10, 11, 12, 13, 14], [3, 1, 4, 2, 5])
    values = rng.random((2, len(groups)))
    mean, boot = causal.conversation_bootstrap(values, groups, n_boot=30, seed=7)
    np.testing.assert_allclose(mean, values.mean(1))
    # brute force: draw the same multinomial weights, concatenate each conversation's tokens w_s times
    w = np.random.default_rng(7).multinomial(5, np.full(5, 0.2), size=30)
    convs = [np.flatnonzero(groups == s) for s in np.unique(groups)]
    for b in range(30):
        take = np.concatenate([np.tile(c, k) for c, k in zip(convs, w[b])])
        np.testing.assert_allclose(boot[:, b], values[:, take].mean(1))
    # tokens identical across conversations: every replicate equals the mean
    _, flat = causal.conversation_bootstrap(np.ones((1, len(groups))), groups, 20, 0)
    np.testing.assert_allclose(flat, 1.0)


def test_summarise_rows_pairing_and_missing_sets():
    seq = np.repeat(np.arange(6), 4)
    first = np.tile([False, True, True, False], 6)
    kl = {c: np.full(len(seq), float(k)) for k, c in enumerate(causal.CONDITIONS)}
    kl["delta_norm_best"], kl["delta_norm_worst"] = np.linspace(0, 1, len(seq)), np.linspace(0, 1, len(seq)) + 0.5
    kl["nu_best"][:] = kl["nu_worst"][:] = np.nan
    sets = {"delta_norm_best": np.array([1, 2]), "delta_norm_worst": np.array([3, 4]), "nu_best": None, "nu_worst": None}
    sources = {s: "generated" if s < 3 else "heldout" for s in range(6)}
    table, metrics = causal.summarise(causal.TokenKL(seq, first, kl), sources, sets, "v", n_boot=50, n_latents_all=9)
    assert table.height == len(causal.SOURCES) * len(causal.MASKS) * len(causal.CONDITIONS)
    row = table.filter((pl.col("source") == "all") & (pl.col("mask") == "first") & (pl.col("condition") == "template")
                       ).row(0, named=True)
    assert row["n_tokens"] == 12 and row["n_convs"] == 6 and row["mean"] == 2.0 and row["ci_low"] == row["ci_high"] == 2.0
    assert table.filter(pl.col("condition") == "all")["n_latents"].unique().to_list() == [9]
    nu = table.filter(pl.col("condition") == "nu_best")
    assert nu["n_latents"].null_count() == nu["mean"].null_count() == nu["ci_low"].null_count() == nu.height
    d = metrics["best_minus_worst"]["all"]["full"]["delta_norm"]
    assert d["best_minus_worst"] == pytest.approx(-0.5) and d["ci_low"] == pytest.approx(-0.5)
    assert d["best_lower"] is True and d["significant"] is True
    assert metrics["best_minus_worst"]["all"]["full"]["nu"]["best_lower"] is None
    assert any("nu_best" in n for n in metrics["notes"])
    assert metrics["bootstrap"]["unit"] == "conversation"


def test_corpus_sources_take_first_user_turns(tiny_tokenizer):
    from crossdiff.data import encode_chat

    convs = [testing.CHATS[i % 3] for i in range(5)]
    corpus = pl.DataFrame([encode_chat(tiny_tokenizer, c, 512, behaviour=f"b{i}") for i, c in enumerate(convs)])
    prompts, rest = corpus_sources(corpus, tiny_tokenizer, n_prompts=2, n_convs=10, seed=0)
    users = {c[0]["content"] for c in testing.CHATS}
    assert len(prompts) == 2 and {p[0][0]["content"] for p in prompts} <= users
    assert all(len(p) == 1 and p[0]["role"] == "user" for p, _ in prompts)
    assert rest.height == 3  # every chat row not used for a prompt, rendered as it was
    ids, template, assistant = template_mask(tiny_tokenizer, testing.CHATS[1])
    assert tiny_tokenizer.decode(first_user_turn(ids, template, assistant)).strip() == testing.CHATS[1][0]["content"]


# ---- CLIs ----------------------------------------------------------------------------------------------------

def test_scripts_end_to_end(tmp_path, tiny_pair, toy_data):
    base_dir, chat_dir = tiny_pair("gemma2")
    cp = {"eval_prompts": 2, "heldout_convs": 3, "max_new_tokens": 6, "first_tokens": [2, 10], "batch_size": 2,
          "bootstrap": 40, "seed": 0}
    models = {"base": "toy", "chat": "toy", "dtype": "float32"}
    out = tmp_path / "eval_set.parquet"
    script("generate_eval_set").main(["--params", json.dumps({"models": models, "causal": cp}), "--chat", str(chat_dir),
                                      "--toy-data", str(toy_data), "--out", str(out), "--device", "cpu"])
    es = pl.read_parquet(out)
    assert es.filter(pl.col("source") == "heldout").height == 3
    assert es.filter(pl.col("source") == "generated").height <= 2
    assert set(es.filter(pl.col("source") == "generated")["prompt"]) <= {c[0]["content"] for c in testing.CHATS}
    for r in es.iter_rows(named=True):
        assert len(r["input_ids"]) == len(r["template"]) == len(r["assistant"]) and any(r["assistant"])
    cc = make_crosscoder(32, 40, kind="batchtopk")
    cc.save(tmp_path / "cc")
    # 5 chat-only latents; the authors' pool keeps 2, 5 (ν^ε = -0.1) and 20 (ν^r = 2); 7 is out of range, 11 has no ν
    latent_frame(40, {2: (0.93, 2), 5: (0.99, 1), 7: (0.91, 4), 11: (0.95, None), 20: (0.97, 3)},
                 nu={2: (0.1, 0.2), 5: (-0.1, 0.0), 7: (2.5, 0.1), 20: (0.5, 2.0)}).write_parquet(tmp_path / "latents.parquet")
    script("causal_kl").main([
        "--params", json.dumps({"models": models, "layer": LAYER, "causal": cp}), "--base", str(base_dir),
        "--chat", str(chat_dir), "--eval-set", str(out), "--crosscoder", str(tmp_path / "cc"),
        "--latents", str(tmp_path / "latents.parquet"), "--variant", "btk", "--out", str(tmp_path / "btk"),
        "--device", "cpu"])
    kl = pl.read_parquet(tmp_path / "btk" / "kl.parquet")
    metrics = json.loads((tmp_path / "btk" / "metrics.json").read_text())
    assert kl.height == kl["source"].n_unique() * len(causal.MASKS) * len(causal.CONDITIONS)
    assert (kl["variant"] == "btk").all() and (tmp_path / "btk" / "figures" / "kl_all.png").stat().st_size > 0
    assert set(metrics["kl"]["all"]["first"]) == set(causal.CONDITIONS)
    none = kl.filter((pl.col("condition") == "none") & (pl.col("source") == "all") & (pl.col("mask") == "full")
                     ).row(0, named=True)
    assert none["mean"] > 0 and none["ci_low"] <= none["mean"] <= none["ci_high"]
    for c in ("delta_norm_best", "delta_norm_worst", "nu_best", "nu_worst"):  # pool of 3: halves of 1
        assert kl.filter(pl.col("condition") == c)["n_latents"].unique().to_list() == [1]
    assert metrics["pool"]["used"] == "authors" and metrics["pool"]["nu_range"] == [-0.1, 2.0]
    assert metrics["pool"]["sizes"] == {"candidates": 5, "authors": {"delta_norm": 3, "nu": 3},
                                        "legacy": {"delta_norm": 5, "nu": 4}}
    assert not metrics["notes"]
