"""Seed replicates: names, the params slice a replicate reads, and the summary's numbers and claim counts
against brute force."""

from __future__ import annotations

import random
import statistics

import polars as pl
import pytest

from crossdiff import config, io, seeds


def test_replicate_names_round_trip_and_primary_runs_keep_their_name():
    names = seeds.replicates(["l1", "batch_topk-2"], seed=3, n_seeds=3)
    assert names == ["l1-seed4", "l1-seed5", "batch_topk-2-seed4", "batch_topk-2-seed5"]
    assert [seeds.parse(n) for n in names] == [("l1", 4), ("l1", 5), ("batch_topk-2", 4), ("batch_topk-2", 5)]
    assert seeds.parse("l1") == ("l1", None) and seeds.replicates(["l1"], 0, 1) == []
    with pytest.raises(ValueError, match="seeds"):
        seeds.replicates(["l1"], 0, 0)


def test_a_replicate_reads_its_variants_params_and_a_variant_may_not_look_like_one():
    cfg = config.load()
    keys = ["crosscoders.{variant}", "seed", "device"]
    assert config.select(cfg, keys, variant="l1-seed1") == config.select(cfg, keys, variant="l1")
    cfg["crosscoders"]["l1-seed7"] = cfg["crosscoders"]["l1"]
    with pytest.raises(config.ParamsError, match="crosscoders"):
        config.validate(cfg)


def _kl(best, worst):
    rows = [{"source": "all", "mask": m, "condition": c, "mean": v}
            for m in ("full", "first") for c, v in (("none", 5.0), ("all", 0.1), ("nu_best", best), ("nu_worst", worst),
                                                    ("delta_norm_best", worst), ("delta_norm_worst", best))]
    rows.append({"source": "heldout", "mask": "full", "condition": "nu_best", "mean": 99.0})  # not the headline source
    return pl.DataFrame(rows)


def _ci(lo, hi):
    """causal metrics.json's best − worst CIs: (lo, hi) for ν on the "all" source, something else elsewhere."""
    d = {"best_minus_worst": lo - 1, "ci_low": lo, "ci_high": hi}
    return {"best_minus_worst": {
        "all": {m: {"nu": d, "delta_norm": None} for m in ("full", "first")},
        "heldout": {m: {"nu": {"best_minus_worst": 0, "ci_low": 50.0, "ci_high": 60.0}} for m in ("full", "first")}}}


def test_headline_reads_the_all_source_and_every_class():
    h = seeds.headline({"val": {"fve": 0.9, "l0": 12.0}}, {"n_dead": 3, "classes": {"chat_only": 7, "shared": 40},
                       "median_nu": {"chat_only": {"nu_eps": 0.1, "nu_r": 0.6}}}, _kl(2.0, 4.0), _ci(-2.5, -1.5))
    assert h["val_fve"] == 0.9 and h["n_chat_only"] == 7 and h["median_nu_eps_chat_only"] == 0.1
    assert h["kl_full_nu_best"] == 2.0 and h["kl_first_nu_worst"] == 4.0 and h["dead"] == 3
    assert (h["diff_full_nu_ci_low"], h["diff_first_nu_ci_high"]) == (-2.5, -1.5)
    assert "diff_full_delta_norm_ci_low" not in h   # no halves to rank: no CI


def test_headline_without_causal_metrics_has_no_cis():
    h = seeds.headline({"val": {}}, {}, _kl(2.0, 4.0), None)
    assert h["kl_full_nu_best"] == 2.0 and not any(k.startswith("diff_") for k in h)


@pytest.mark.parametrize("ci, expected", [((-2.0, -0.5), (True, True, False)),   # CI below 0: significant
                                          ((-0.5, 0.3), (True, False, False)),    # straddles 0: sign only
                                          ((0.2, 0.9), (True, False, True))])     # above 0: reversed
def test_a_claim_is_significant_only_when_its_ci_excludes_zero(ci, expected):
    h = {"kl_full_nu_best": 1.0, "kl_full_nu_worst": 2.0, "diff_full_nu_ci_low": ci[0], "diff_full_nu_ci_high": ci[1]}
    assert seeds.verdict(h, "nu", "full") == expected
    out = seeds.summarise({"l1": [(0, h), (1, {**h, "diff_full_nu_ci_high": 0.1, "diff_full_nu_ci_low": -0.1})]})
    c = out["l1"]["claims"]["nu_best_beats_worst_full"]
    assert (c["holds"], c["significant"], c["reversed"], c["of"]) == (2, int(expected[1]), int(expected[2]), 2)


def test_summary_matches_brute_force_means_and_claim_counts(tmp_path):
    rng = random.Random(0)
    names = ["l1", "l1-seed1", "l1-seed2", "btk", "btk-seed1"]
    pairs = {}
    for name in names:
        best, worst = rng.uniform(1, 4), rng.uniform(1, 4)
        pairs[name] = (best, worst)
        for sub, obj in (("cc", {"val": {"fve": rng.random(), "l0": 10.0}}),
                         ("an", {"n_dead": 0, "classes": {"chat_only": rng.randint(0, 50)}})):
            io.write_json(tmp_path / sub / name / "metrics.json", obj)
        (tmp_path / "ca" / name).mkdir(parents=True)
        _kl(best, worst).write_parquet(tmp_path / "ca" / name / "kl.parquet")
        io.write_json(tmp_path / "ca" / name / "metrics.json", _ci(best - worst - 0.5, best - worst + 0.5))
    summary = seeds.run_summary(names, tmp_path / "cc", tmp_path / "an", tmp_path / "ca", 0, tmp_path / "out")
    assert summary == io.read_json(tmp_path / "out" / "metrics.json")
    assert summary["l1"]["seeds"] == [0, 1, 2] and summary["btk"]["seeds"] == [0, 1]
    l1 = [pairs[n] for n in names[:3]]
    assert summary["l1"]["numbers"]["kl_full_nu_best"]["mean"] == pytest.approx(statistics.fmean(b for b, _ in l1))
    assert summary["l1"]["numbers"]["kl_full_nu_best"]["sd"] == pytest.approx(statistics.stdev(b for b, _ in l1))
    nu = summary["l1"]["claims"]["nu_best_beats_worst_full"]
    assert (nu["holds"], nu["of"]) == (sum(b < w for b, w in l1), 3)
    assert nu["significant"] == sum(b - w + 0.5 < 0 for b, w in l1) and nu["reversed"] == sum(b - w - 0.5 > 0 for b, w in l1)
    dn = summary["l1"]["claims"]["delta_norm_best_beats_worst_first"]  # the fixture swaps best/worst for Δnorm
    assert dn["holds"] == sum(w < b for b, w in l1)
    runs = pl.read_parquet(tmp_path / "out" / "runs.parquet")
    assert runs.height == 5 and runs["seed"].to_list() == [0, 1, 2, 0, 1]


def test_a_run_without_ranked_halves_is_not_counted_for_that_claim():
    full = {"kl_full_nu_best": 1.0, "kl_full_nu_worst": 2.0}
    out = seeds.summarise({"l1": [(0, full), (1, {"n_chat_only": 0.0})]})
    assert out["l1"]["claims"]["nu_best_beats_worst_full"] == {
        "statement": seeds.CLAIMS["nu_best_beats_worst_full"][0], "holds": 1, "of": 1, "significant": 0, "reversed": 0}
    assert out["l1"]["numbers"]["kl_full_nu_best"]["n"] == 1
