"""Latent table, Δnorm classes, activation statistics, summary metrics and the analysis CLIs."""

import json

import h5py
import numpy as np
import polars as pl
import pytest
import torch

from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.latents import (
    COLUMNS,
    activation_stats,
    analyse,
    classify,
    compare,
    delta_norm,
    summarise,
    top_by_delta_norm,
)
from crossdiff.scaling import latent_scaling

BANDS = {"base_only": [0.0, 0.1], "shared": [0.4, 0.6], "chat_only": [0.9, 1.0]}
PARAMS = {"classes": BANDS, "scaling_tokens": 700, "batch_size": 128, "dead_freq": 1e-6,
          "nu_thresholds": [0.2, 0.5, 1.0]}
D_MODEL, DICT, DEAD = 8, 24, 23


def test_classes_at_band_boundaries():
    dn = np.array([0.0, 0.05, 0.1, 0.2, 0.4, 0.5, 0.6, 0.6000001, 0.9, 0.9000001, 1.0, np.nan])
    assert classify(dn, BANDS).tolist() == [
        "base_only", "base_only", "other", "other", "shared", "shared", "shared", "other",
        "other", "chat_only", "chat_only", "other"]
    with pytest.raises(ValueError, match="ordered"):
        classify(dn, {"base_only": [0, 0.5], "shared": [0.4, 0.6], "chat_only": [0.9, 1]})


def test_delta_norm_eq4():
    b, c = np.array([1.0, 0.0, 2.0, 0.0, 0.3]), np.array([1.0, 3.0, 0.0, 0.0, 0.6])
    dn = delta_norm(b, c)
    np.testing.assert_allclose(dn[:3], [0.5, 1.0, 0.0])
    assert np.isnan(dn[3])
    assert dn[4] == pytest.approx(0.5 * ((0.6 - 0.3) / 0.6 + 1))


def make_crosscoder(seed=0) -> CrossCoder:
    """Latents 0-5 chat-only (tiny base decoder), 6-9 base-only, 10-22 shared, 23 can never fire."""
    torch.manual_seed(seed)
    cc = CrossCoder(CrossCoderConfig(D_MODEL, DICT, "l1"))
    with torch.no_grad():
        cc.W_enc.normal_(0, 0.5)
        cc.b_enc.fill_(-0.8)
        cc.W_dec.normal_()
        cc.W_dec[1, 10:] = cc.W_dec[0, 10:] + 0.1 * torch.randn(DICT - 10, D_MODEL)
        cc.W_dec[1, 10:] *= (cc.W_dec[0, 10:].norm(dim=-1) / cc.W_dec[1, 10:].norm(dim=-1))[:, None]
        cc.W_dec[0, :6] *= 0.01
        cc.W_dec[1, 6:10] *= 0.01
        cc.W_enc[:, :, DEAD] = 0
        cc.b_enc[DEAD] = -1
        cc.b_dec.normal_(0, 0.1)
        cc.scale.copy_(torch.tensor([0.5, 0.8]))
    return cc


def write_cache(path, n, seed):
    rng = np.random.default_rng(seed)
    acts = rng.normal(0, 2, (n, 2, D_MODEL)).astype(np.float16)
    template = rng.random(n) < 0.3
    with h5py.File(path, "w") as f:
        f["base"], f["chat"] = acts[:, 0], acts[:, 1]
        f["template"] = template
        for k in ("tokens", "seq", "pos"):
            f[k] = np.arange(n, dtype=np.int32)
        f["source"] = np.zeros(n, np.uint8)
        f.attrs.update(d_model=D_MODEL, layer=0, norm_base=1.0, norm_chat=1.0)
    return torch.from_numpy(acts.astype(np.float32)), torch.from_numpy(template)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    cc = make_crosscoder()
    cc.save(tmp / "l1")
    train, _ = write_cache(tmp / "train.h5", 1000, 1)
    val, tmpl = write_cache(tmp / "val.h5", 600, 2)
    table = analyse(tmp / "l1", tmp / "train.h5", tmp / "val.h5", PARAMS, progress=False)
    return dict(tmp=tmp, cc=cc, train=train, val=val, tmpl=tmpl, table=table)


def test_activation_stats_brute_force(run):
    cc, val, tmpl = run["cc"], run["val"], run["tmpl"]
    batches = [{"acts": a, "template": t} for a, t in zip(val.split(100), tmpl.split(100))]
    s = activation_stats(cc, batches, progress=False)
    with torch.no_grad():
        f = cc.encode(val)
    assert s.n_tokens == 600
    np.testing.assert_array_equal(s.fired, (f > 0).sum(0).numpy())
    np.testing.assert_array_equal(s.on_template, (f[tmpl] > 0).sum(0).numpy())
    np.testing.assert_allclose(s.max_act, f.amax(0).numpy())


def test_latent_table(run):
    t, cc = run["table"], run["cc"]
    assert t.columns == list(COLUMNS)
    assert t["latent"].to_list() == list(range(DICT))
    assert t["klass"].to_list()[:6] == ["chat_only"] * 6
    assert t["klass"].to_list()[6:10] == ["base_only"] * 4
    assert set(t["klass"].to_list()[10:]) == {"shared"}
    with torch.no_grad():
        f = cc.encode(run["val"])
        ref = latent_scaling(cc, run["train"][:700].split(50), progress=False).betas(cc.W_dec)  # scaling_tokens rows
    fired = (f > 0).sum(0).numpy()
    np.testing.assert_allclose(t["freq"].to_numpy(), fired / 600)
    np.testing.assert_array_equal(t["dead"].to_numpy(), fired == 0)
    assert t["dead"][DEAD] and t["dead"].sum() == 1, "fixture should have exactly one dead latent"
    ft = ((f[run["tmpl"]] > 0).sum(0).numpy() / np.maximum(fired, 1))
    np.testing.assert_allclose(t["f_template"].to_numpy()[:DEAD], ft[:DEAD])
    for c in ("beta_err_base", "beta_err_chat", "beta_rec_base", "beta_rec_chat", "nu_eps", "nu_r"):
        np.testing.assert_allclose(t[c].to_numpy()[:DEAD], ref[c][:DEAD], rtol=1e-5, err_msg=c)
    # dead latent: nulls (not NaN) wherever there is no data
    row = t.row(DEAD, named=True)
    assert all(row[c] is None for c in ("beta_err_base", "nu_eps", "nu_r", "f_template", "rank_nu"))
    assert t["nu_eps"].null_count() == 1 and not t["nu_eps"].is_nan().any()
    W = cc.W_dec.detach()
    np.testing.assert_allclose(t["cos_sim"].to_numpy(), torch.cosine_similarity(W[0], W[1], dim=-1).numpy(), rtol=1e-5)
    # rank_nu: rank(|ν^ε|) + rank(|ν^r|) among chat-only latents, ascending
    chat = t.filter(pl.col("klass") == "chat_only")
    re = np.argsort(np.argsort(np.abs(chat["nu_eps"].to_numpy()))) + 1
    rr = np.argsort(np.argsort(np.abs(chat["nu_r"].to_numpy()))) + 1
    np.testing.assert_array_equal(chat["rank_nu"].to_numpy(), re + rr)
    assert t.filter(pl.col("klass") != "chat_only")["rank_nu"].null_count() == DICT - 6


def test_summary_metrics_brute_force(run):
    t = run["table"]
    m = summarise(t, PARAMS)
    assert m["classes"] == {"base_only": 4, "shared": 13, "chat_only": 6, "other": 0} and m["n_dead"] == 1
    chat = t.filter(pl.col("klass") == "chat_only")
    shared_r = t.filter((pl.col("klass") == "shared") & ~pl.col("dead"))["nu_r"].to_numpy()
    lo, hi = np.quantile(shared_r, [0.025, 0.975])
    r = chat["nu_r"].to_numpy()
    assert m["nu_r_overlap_with_shared"]["central_95"]["chat_only_share"] == pytest.approx(((r >= lo) & (r <= hi)).mean())
    e = chat["nu_eps"].to_numpy()
    assert [c["n"] for c in m["robust_chat_only"]] == [int(((e < p) & (r < p)).sum()) for p in PARAMS["nu_thresholds"]]
    ft = chat["f_template"].to_numpy()
    assert m["template"]["over_half"] == pytest.approx((ft > 0.5).mean())
    assert m["template"]["over_third"] == pytest.approx((ft > 1 / 3).mean())
    from scipy.stats import spearmanr
    assert m["spearman_nu_freq_chat_only"]["nu_eps"]["rho"] == pytest.approx(spearmanr(e, chat["freq"].to_numpy())[0])


def test_compare_top_n(run):
    t = run["table"]
    other = t.with_columns(klass=pl.when(pl.col("latent") < 2).then(pl.lit("chat_only")).otherwise(pl.lit("shared")))
    metrics, curves = compare({"a": t, "b": other}, PARAMS)
    assert metrics["top_n"] == 6 and metrics["top_n_from"] == "a"
    top = top_by_delta_norm(other, 6)
    assert top.height == 6 and top["delta_norm"].min() >= t.filter(~pl.col("dead")).sort("delta_norm")["delta_norm"][-6]
    assert metrics["variants"]["b"]["chat_only"] == 2
    assert len(curves["counts"]["a"]) == len(curves["grid"])
    assert curves["counts"]["a"] == sorted(curves["counts"]["a"])        # monotone in π


def test_cli_outputs(run, tmp_path):
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "workflow_scripts"

    def script(name):
        spec = importlib.util.spec_from_file_location(name, root / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    tmp = run["tmp"]
    params = json.dumps({"analysis": PARAMS})
    for v in ("l1", "copy"):
        script("analyse_latents").main(["--params", params, "--crosscoder", str(tmp / "l1"), "--train", str(tmp / "train.h5"),
                                        "--val", str(tmp / "val.h5"), "--out", str(tmp_path / v), "--device", "cpu"])
    out = tmp_path / "l1"
    assert pl.read_parquet(out / "latents.parquet").equals(run["table"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["classes"]["chat_only"] == 6
    assert metrics["space"]["normalisation"] == "per_model" and metrics["space"]["meaning"]  # Δnorm/ν's space
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "cos_sim.png", "delta_norm.png", "freq.png", "nu_hist.png", "nu_scatter.png"]
    script("compare_variants").main(["--params", params, "--variants", "l1", "copy", "--analysis", str(tmp_path),
                                     "--out", str(tmp_path / "comparison")])
    assert (tmp_path / "comparison" / "figures" / "robust_counts.png").stat().st_size > 0
    cmp = json.loads((tmp_path / "comparison" / "metrics.json").read_text())
    assert cmp["robust_top_n"]["l1"] == cmp["robust_top_n"]["copy"]


def test_figures_survive_empty_classes(tmp_path, run):
    from crossdiff.report.figures import analysis_figures
    t = run["table"].with_columns(klass=pl.lit("shared"))               # no chat-only latents at all
    paths = analysis_figures(tmp_path, t, PARAMS)
    assert all(p.stat().st_size > 0 for p in paths)
