"""Ground-truth validation (issue 11): generator kinds, cache format, matching/AUROC against brute force,
and an end-to-end check that the normal trainer + analysis recover planted chat-only features."""

from __future__ import annotations

import itertools
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest

from crossdiff import synthetic as syn
from crossdiff.toy import behaviours

SPEC = dict(d_model=16, n_tokens=6000, n_features={"shared": 6, "chat_only": 5, "base_only": 4, "shrinkage": 5,
                                                   "decoupled": 6},
            feature_rate=0.05, shrinkage_ratio=0.25, decoupled_share=0.4, noise=0.0, seed=3)


def spec(**kw) -> syn.SyntheticSpec:
    return syn.SyntheticSpec.from_params({**SPEC, **kw})


def binomial_ok(hits: int, n: int, p: float, z: float = 5.0) -> bool:
    return abs(hits - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1


def test_kinds_behave_as_specified():
    s = spec()
    gt = syn.make_features(s)
    np.testing.assert_allclose(np.linalg.norm(gt.directions, axis=1), 1, atol=1e-5)
    a_base, a_chat = np.concatenate([c[1] for c in syn.iter_split(gt, "train", s.n_tokens)]), \
        np.concatenate([c[2] for c in syn.iter_split(gt, "train", s.n_tokens)])
    names = gt.kind_names()
    col = {k: names == k for k in syn.KINDS}
    chat_active = a_chat > 0
    assert binomial_ok(chat_active[:, ~col["base_only"]].sum(), chat_active[:, ~col["base_only"]].size, s.feature_rate)
    assert ((a_chat[chat_active] >= syn.MAG_LOW) & (a_chat[chat_active] <= syn.MAG_HIGH)).all()
    np.testing.assert_array_equal(a_base[:, col["shared"]], a_chat[:, col["shared"]])
    assert (a_base[:, col["chat_only"]] == 0).all() and chat_active[:, col["chat_only"]].any(0).all()
    assert (a_chat[:, col["base_only"]] == 0).all() and (a_base[:, col["base_only"]] > 0).any(0).all()
    np.testing.assert_allclose(a_base[:, col["shrinkage"]], s.shrinkage_ratio * a_chat[:, col["shrinkage"]], rtol=1e-6)
    db, dc = a_base[:, col["decoupled"]], a_chat[:, col["decoupled"]]
    assert not ((db > 0) & (dc == 0)).any()                       # base fires only where chat fires
    np.testing.assert_array_equal(db[db > 0], dc[db > 0])          # ... with the same activation
    assert binomial_ok(int((db > 0).sum()), int((dc > 0).sum()), s.decoupled_share)
    assert 0 < (db > 0).sum() < (dc > 0).sum()


def test_activations_are_sums_of_features_plus_noise_and_deterministic():
    s = spec(noise=0.05)
    gt = syn.make_features(s)
    chunks = list(syn.iter_split(gt, "val", 5000))
    assert [c[0] for c in chunks] == [0, syn.CHUNK]
    for _, a_base, a_chat, h in chunks:
        resid = h - np.stack([a_base @ gt.directions, a_chat @ gt.directions], 1)
        assert abs(resid.std() - 0.05) < 0.005 and abs(resid.mean()) < 0.005
    again = list(syn.iter_split(syn.make_features(s), "val", 5000))
    np.testing.assert_array_equal(chunks[1][3], again[1][3])
    other = next(syn.iter_split(gt, "train", 5000))[3]
    assert not np.allclose(chunks[0][3], other)                    # splits are independent draws
    with pytest.raises(ValueError, match="unknown kinds"):
        syn.SyntheticSpec.from_params({**SPEC, "n_features": {"chat_only": 1, "chatonly": 2}})


def test_cache_is_in_the_public_format(tmp_path):
    s = spec(noise=0.01)
    gt = syn.make_features(s)
    path = syn.write_synthetic_cache(tmp_path / "val.h5", gt, "val", 5000)
    h = np.concatenate([c[3] for c in syn.iter_split(gt, "val", 5000)])
    with h5py.File(path) as f:
        assert f["base"].dtype == np.float16 and f["base"].shape == (5000, 16) and f["base"].chunks[0] <= syn.CHUNK
        np.testing.assert_array_equal(f["base"][:], h[:, 0].astype(np.float16))
        np.testing.assert_array_equal(f["chat"][:], h[:, 1].astype(np.float16))
        for name, dtype in (("tokens", np.int32), ("seq", np.int32), ("pos", np.int32), ("template", bool),
                            ("source", np.uint8)):
            assert f[name].dtype == dtype and f[name].shape == (5000,)
        assert (f["pos"][:] >= 1).all()
        for key in ("base_model", "chat_model", "layer", "d_model", "tokenizer", "created_by"):
            assert key in f.attrs
        np.testing.assert_allclose(f.attrs["norm_chat"], np.linalg.norm(h[:, 1], axis=1).mean(), rtol=1e-3)
    assert not list(tmp_path.glob("*.tmp"))


def test_match_latents_against_brute_force():
    rng = np.random.default_rng(0)
    dirs = rng.standard_normal((7, 5))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    db, dc = rng.standard_normal((12, 5)), rng.standard_normal((12, 5))
    dc[3] = 0                                                      # a base-only latent
    db[4] = dc[4] = 0                                              # a latent with no decoder at all
    idx, cos = syn.match_latents(db, dc, dirs)
    for j in range(12):
        v = db[j] + dc[j]
        if not v.any():
            assert idx[j] == -1 and cos[j] == 0
            continue
        sims = [v @ d / np.linalg.norm(v) for d in dirs]
        assert idx[j] == int(np.argmax(sims)) and np.isclose(cos[j], max(sims))


def brute_auroc(pos, neg):
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    return sum(pairs) / len(pairs)


def test_auroc_against_brute_force_with_ties_and_nans():
    rng = np.random.default_rng(1)
    for _ in range(20):
        pos = rng.integers(0, 5, rng.integers(1, 15)).astype(float)   # many ties
        neg = rng.integers(0, 5, rng.integers(1, 15)).astype(float)
        assert np.isclose(syn.auroc(pos, neg), brute_auroc(pos, neg))
    assert syn.auroc([1.0, np.nan, 3.0], [2.0, np.nan]) == brute_auroc([1, 3], [2])
    assert np.isnan(syn.auroc([], [1.0]))
    scores = rng.standard_normal((30, 4))
    labels = rng.random(30) < 0.4
    np.testing.assert_allclose(behaviours.auroc_columns(scores, labels),
                               [brute_auroc(scores[labels, j], scores[~labels, j]) for j in range(4)])
    null = [syn.auroc(rng.random(16), rng.random(16)) for _ in range(2000)]
    assert abs(np.std(null) / syn.auroc_null_sd(16, 16) - 1) < 0.1


def test_variant_metrics_against_brute_force():
    s = spec()
    gt = syn.make_features(s)
    rng = np.random.default_rng(2)
    D = 40
    feature = rng.integers(0, gt.n, D)
    cos = rng.uniform(0.5, 1.0, D)
    klass = rng.choice(["chat_only", "shared", "base_only", "other"], D, p=[0.5, 0.3, 0.1, 0.1])
    dead = rng.random(D) < 0.1
    table = pl.DataFrame({"latent": np.arange(D)[::-1].copy(), "klass": klass[::-1], "dead": dead[::-1],
                          "delta_norm": rng.random(D), "nu_eps": rng.random(D), "nu_r": rng.random(D),
                          "norm_base": rng.random(D), "norm_chat": rng.random(D) + 0.5})
    truth = {"feature": feature, "cos": cos, "base_share": rng.random(D)}
    m = syn.variant_metrics(table, truth, gt, match_cos=0.8)
    t = table.sort("latent")
    names = gt.kind_names()
    in_set = [j for j in range(D) if klass[j] == "chat_only" and not dead[j]]
    kind_of = {j: names[feature[j]] if cos[j] >= 0.8 else "unmatched" for j in range(D)}
    true_chat = [i for i in range(gt.n) if names[i] == "chat_only"]
    found = {feature[j] for j in in_set if kind_of[j] == "chat_only"}
    assert m["chat_only_set"]["n"] == len(in_set)
    assert np.isclose(m["chat_only_set"]["recall"], len(found & set(true_chat)) / len(true_chat))
    assert np.isclose(m["chat_only_set"]["precision"], sum(kind_of[j] == "chat_only" for j in in_set) / len(in_set))
    artefact = {j for j in in_set if kind_of[j] == "decoupled" and truth["base_share"][j] > s.decoupled_share / 2}
    assert m["chat_only_set"]["spurious_bait"] == sum(kind_of[j] == "shrinkage" for j in in_set) + len(artefact)
    assert m["chat_only_set"]["composition"]["decoupling_artefact"] == len(artefact)
    pos = [t["nu_eps"][j] for j in in_set if kind_of[j] == "shrinkage"]
    neg = [t["nu_eps"][j] for j in in_set if kind_of[j] == "chat_only"]
    if pos and neg:
        assert np.isclose(m["auroc_nu_eps_shrinkage_vs_chat_only"]["auroc"], brute_auroc(pos, neg))
    with pytest.raises(ValueError, match="latents 0..D-1"):
        syn.variant_metrics(table.head(5), truth, gt, match_cos=0.8)
    pos = [t["nu_r"][j] for j in artefact]
    neg = [t["nu_r"][j] for j in in_set if kind_of[j] == "chat_only"]
    if pos and neg:
        assert np.isclose(m["auroc_nu_r_decoupling_artefact_vs_chat_only"]["auroc"], brute_auroc(pos, neg))


def test_behaviour_aurocs_against_brute_force():
    rng = np.random.default_rng(4)
    n, D = 50, 12
    acts = np.maximum(rng.standard_normal((n, D)), 0)
    behaviour = rng.choice(np.array(["joke", "refusal", None], dtype=object), n)
    klass = np.array(["chat_only"] * 6 + ["shared"] * 6)
    nu = rng.random((2, D))
    dead = np.zeros(D, bool)
    dead[0] = True
    table = pl.DataFrame({"latent": np.arange(D), "klass": klass, "dead": dead, "nu_eps": nu[0], "nu_r": nu[1]})
    out = behaviours.behaviour_aurocs(acts, behaviour, table, nu_thresholds=[0.5, 1.0])
    assert set(out) == {"joke", "refusal"}
    for label, res in out.items():
        y = behaviour == label
        au = [brute_auroc(acts[y, j], acts[~y, j]) for j in range(D)]
        assert np.isclose(res["all_latents"]["auroc"], max(au[1:]))
        assert np.isclose(res["chat_only"]["auroc"], max(au[1:6]))
        robust = [j for j in range(1, 6) if nu[0, j] < 0.5 and nu[1, j] < 0.5]
        r = res["robust_chat_only"][0]
        assert r["n_latents"] == len(robust)
        if robust:
            assert np.isclose(r["auroc"], max(au[j] for j in robust)) and r["latent"] in robust


# -- end to end: the normal trainer and analysis on a small planted configuration -----------------------------

@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """The tiny preset's `validate` run (both crosscoders, normal trainer and analysis), as the pipeline runs it."""
    import torch

    from crossdiff import config as cfg

    params = cfg.load(cfg.ROOT / "params.yaml", cfg.ROOT / "presets" / "tiny.yaml")
    params = {k: params[k] for k in ("validate", "crosscoders", "analysis")}
    out = tmp_path_factory.mktemp("validate")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)          # tiny matmuls: extra threads only contend on a shared machine
    try:
        metrics = syn.run_validation(params, out, out / "work", device="cpu", progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, metrics["variants"]


def test_batchtopk_recovers_the_true_chat_only_features(small_run):
    out, m = small_run
    assert m["batchtopk"]["chat_only_set"]["recall"] >= 0.8, m["batchtopk"]["chat_only_set"]
    assert set(m) == {"l1", "batchtopk"} and (out / "metrics.json").exists()
    assert {p.name for p in (out / "figures").iterdir()} == {"nu_scatter.png", "delta_norm_by_kind.png"}


# Thresholds for the ν tests. Theory (§2.4, A.6): a Δnorm chat-only latent of a shrinkage feature has
# ν^ε ≈ ρ (= 0.1 here) whether or not its base decoder shrank, and a Latent-Decoupling artefact has ν^r ≈ the
# share of its activation where the feature is in base (≈ s = 0.5), while a true chat-only latent has both ≈ 0.
# So the bait should separate almost perfectly; we assert the weakest claim that could still fail: separation
# beyond chance, AUROC > 0.5 + 3 SD of the AUROC of uninformative scores for these group sizes (Mann–Whitney
# null, ~0.85 for 12 vs 12), with enough latents on both sides for that SD to mean something.
MIN_GROUP = 6


def beyond_chance(a: dict) -> bool:
    return a["n_pos"] >= MIN_GROUP and a["n_neg"] >= MIN_GROUP and a["auroc"] > 0.5 + 3 * a["null_sd"]


@pytest.mark.parametrize("variant", ["batchtopk", "l1"])
def test_shrinkage_bait_is_flagged_by_nu_eps(small_run, variant):
    a = small_run[1][variant]["auroc_nu_eps_shrinkage_vs_chat_only"]
    assert beyond_chance(a), a


def test_latent_decoupling_in_l1_is_flagged_by_nu_r(small_run):
    """A.4: L1 is indifferent between the ideal split and a decoupled chat-only latent; the ones it learns
    decoupled (ground truth: they fire where the feature is present in base) must stand out by ν^r."""
    a = small_run[1]["l1"]["auroc_nu_r_decoupling_artefact_vs_chat_only"]
    assert beyond_chance(a), a


def test_latent_scaling_matches_theory_on_shrinkage_bait(small_run):
    """ν^ε of a shrinkage feature's latent is κρ (κ = E‖h^c‖/E‖h^b‖ from the normalisation, see
    synthetic.expected), for BatchTopK which learns the features cleanly; 25% slack for matched-not-identical
    decoders and θ-thresholded activations."""
    out, m = small_run
    from crossdiff.io import read_json

    want = read_json(out / "metrics.json")["expected"]["nu"]["shrinkage"]["nu_eps"]
    got = m["batchtopk"]["medians"]["shrinkage"]["nu_eps"]
    assert abs(got - want) <= 0.25 * want, (got, want)


def test_validate_behaviours_script_against_brute_force(tmp_path):
    """The behaviours CLI on a small cache: per-conversation max activations and best AUROCs by brute force."""
    import json
    import sys

    import torch

    from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
    from crossdiff.io import read_json, write_parquet
    from crossdiff.latents import analyse

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow_scripts"))
    import validate_behaviours

    s = spec(noise=0.01)
    gt = syn.make_features(s)
    cache = syn.write_synthetic_cache(tmp_path / "val.h5", gt, "val", 1000)          # seq = row // 128: 8 sequences
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(16, 24, "l1"))
    cc.save(tmp_path / "cc" / "l1")
    table = analyse(tmp_path / "cc" / "l1", cache, cache, {"classes": {"base_only": [0, 0.1], "shared": [0.4, 0.6],
                    "chat_only": [0.9, 1.0]}, "scaling_tokens": 1000, "batch_size": 300}, progress=False)
    write_parquet(tmp_path / "an" / "l1" / "latents.parquet", table)
    labels = ["joke", "refusal", None, "joke", "refusal", "joke", None, "refusal", "joke"]   # seq 8 is not cached
    write_parquet(tmp_path / "corpus.parquet", pl.DataFrame(
        {"seq": np.arange(10), "source": np.array([1] * 9 + [0], np.uint8), "behaviour": labels + ["web"]}))
    out = tmp_path / "behaviours.json"
    params = json.dumps({"analysis": {"batch_size": 300, "nu_thresholds": [0.5, 1.0]}})
    validate_behaviours.main(["--params", params, "--variants", "l1", "--crosscoders", str(tmp_path / "cc"),
                              "--analysis", str(tmp_path / "an"), "--val", str(cache), "--corpus",
                              str(tmp_path / "corpus.parquet"), "--out", str(out), "--device", "cpu"])
    res = read_json(out)
    assert res["n_chat_conversations"] == 8
    with h5py.File(cache) as f:
        h = torch.from_numpy(np.stack([f["base"][:], f["chat"][:]], 1).astype(np.float32))
        seq = f["seq"][:]
    with torch.no_grad():
        f_all = cc.encode(h).numpy()
    mx = np.stack([f_all[seq == i].max(0) for i in range(8)])
    dead = table.sort("latent")["dead"].to_numpy()
    for label in ("joke", "refusal"):
        y = np.array([lab == label for lab in labels[:8]])
        au = [brute_auroc(mx[y, j], mx[~y, j]) for j in range(24) if not dead[j]]
        assert np.isclose(res["variants"]["l1"][label]["all_latents"]["auroc"], max(au))
        assert res["variants"]["l1"][label]["n_conversations"] == y.sum()


# -- validate.train overrides, and the health verdict in results/validate/metrics.json --------------------------

def test_validate_train_overrides_keep_an_entrys_auto():
    vp = {"epochs": 3, "train": {"mu": 0.041, "lr": 0.001, "k": 4, "batch_size": 512}}
    l1 = syn.variant_params({"type": "l1", "mu": "auto", "target_l0": 6, "lr": "auto", "batch_size": 1024}, vp)
    assert l1 == {"type": "l1", "mu": "auto", "target_l0": 6, "lr": "auto", "batch_size": 512, "epochs": 3}
    fixed = syn.variant_params({"type": "l1", "mu": 0.15, "lr": 0.01}, vp)
    assert fixed["mu"] == 0.041 and fixed["lr"] == 0.001 and "k" not in fixed
    assert syn.variant_params({"type": "batchtopk", "k": 20}, vp)["k"] == 4


def test_health_verdict_reaches_validate_metrics(tmp_path):
    """A run made to fail (min_fve 0.99 after a few steps) is `fail` with its reason in metrics.json on disk."""
    from crossdiff.io import read_json

    entry = {"type": "batchtopk", "expansion": 2, "k": 2, "k_aux": 8, "batch_size": 256, "min_steps": 0,
             "val_every": 5, "checkpoint_every": 1000, "health": {"min_fve": 0.99}}
    params = {"validate": {**SPEC, "noise": 0.01, "n_tokens": 1500, "epochs": 1, "match_cos": 0.9, "train": {"k": 3}},
              "crosscoders": {"tk": entry},
              "analysis": {"classes": {"base_only": [0.0, 0.1], "shared": [0.4, 0.6], "chat_only": [0.9, 1.0]},
                           "scaling_tokens": 1000, "batch_size": 512, "dead_freq": 1e-6, "nu_thresholds": [0.5]}}
    syn.run_validation(params, tmp_path / "out", tmp_path / "work", device="cpu", progress=False)
    m = read_json(tmp_path / "out" / "metrics.json")
    training = m["variants"]["tk"]["training"]
    assert m["health"] == {"tk": "fail"} and training["health"] == "fail"
    assert any(r.startswith("fve:") and "min_fve 0.99" in r for r in training["health_reasons"])
    assert training["k"] == 3 and training["target_l0"] == 3
