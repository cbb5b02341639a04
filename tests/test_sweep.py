"""The sparsity × expansion sweep: the Pareto front against brute force, the points' params, the table and its
report section, the DVC stages, and a tiny `snakemake sweep` on a planted cache."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from crossdiff import sweep
from crossdiff.io import read_json, write_json

ROOT = Path(__file__).resolve().parents[1]


def brute_front(l0, fve) -> np.ndarray:
    """Definition: finite, and no finite other point with L0 ≤, FVE ≥ and one of them strict."""
    n = len(l0)
    ok = [math.isfinite(l0[i]) and math.isfinite(fve[i]) for i in range(n)]
    return np.array([ok[i] and not any(ok[j] and l0[j] <= l0[i] and fve[j] >= fve[i]
                                       and (l0[j] < l0[i] or fve[j] > fve[i]) for j in range(n))
                     for i in range(n)])


@pytest.mark.parametrize("seed", range(40))
def test_pareto_front_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 14))
    l0 = rng.integers(1, 6, n).astype(float)            # few values: ties in L0, in FVE and whole duplicates
    fve = rng.integers(0, 5, n) / 4
    if seed % 4 == 0:
        l0[rng.integers(n)] = np.nan
        fve[rng.integers(n)] = np.inf
    np.testing.assert_array_equal(sweep.pareto_front(l0, fve), brute_front(l0, fve))


def test_pareto_front_simple_cases():
    assert sweep.pareto_front([1, 2, 3], [0.5, 0.7, 0.6]).tolist() == [True, True, False]
    assert sweep.pareto_front([2, 2], [0.7, 0.7]).tolist() == [True, True]       # equal points do not dominate
    assert sweep.pareto_front([], []).tolist() == []


def test_point_params_change_only_the_swept_keys():
    tk = {"type": "batchtopk", "expansion": 16, "dict_size": 999, "k": 20, "lr": 0.001, "health": {"min_fve": 0.5}}
    p = sweep.point_params(tk, 8, 4, max_steps=300)
    assert p == {"type": "batchtopk", "expansion": 4, "k": 8, "lr": 0.001, "health": {"min_fve": 0.5}, "max_steps": 300,
                 "k_max_per_dim": None}                                # the grid's k is not capped
    l1 = sweep.point_params({"type": "l1", "expansion": 16, "mu": 0.15, "lr": "auto"}, 30, 8)
    assert l1 == {"type": "l1", "expansion": 8, "mu": "auto", "target_l0": 30, "lr": "auto"}
    assert sweep.chosen(tk) == (20, 16) and sweep.chosen({"type": "l1", "expansion": 8, "mu": 0.1}) == (None, 8)
    capped = {**tk, "k_max_per_dim": 0.125}                              # the k the pipeline's training uses
    assert sweep.chosen(capped, 64) == (8, 16) and sweep.chosen(capped, 256) == (20, 16)
    assert sweep.grid({"sparsity": [4, 8, 4], "expansion": [2]}) == [(4, 2), (8, 2)]
    with pytest.raises(ValueError, match="sweep.variant"):
        sweep.point_params({"type": "relu", "expansion": 2}, 1, 1)


def _point(s: int, x: int, fve: float, l0: float, dead: float = 0.1) -> dict:
    return {"val": {"fve": fve, "l0": l0, "dead": dead}, "steps": 10, "dict_size": 16 * x, "health": "pass",
            "opposed_decoders": s / 100,
            "sweep": {"knob": "k", "sparsity": s, "expansion": x, "chat_only": 3, "time_s": 1.5}}


def _write_points(folder: Path, points: list[dict]) -> list[Path]:
    paths = []
    for m in points:
        p = folder / f"k{m['sweep']['sparsity']}-x{m['sweep']['expansion']}" / "metrics.json"
        write_json(p, m)
        paths.append(p)
    return paths


def test_aggregate_table_front_and_chosen(tmp_path):
    pts = [_point(4, 2, 0.80, 4.1), _point(4, 4, 0.85, 3.9), _point(8, 2, 0.84, 8.0), _point(8, 4, 0.90, 8.2)]
    entry = {"type": "batchtopk", "k": 8, "expansion": 4}
    m = sweep.aggregate(_write_points(tmp_path / "pts", pts), tmp_path / "out", entry, "batchtopk")
    df = pl.read_parquet(tmp_path / "out" / "table.parquet")
    assert df.height == 4 and df["chosen"].to_list() == [False, False, False, True]
    assert df.filter("on_front").select("sparsity", "expansion").rows() == [(4, 4), (8, 4)]
    assert m["front"] == ["k4-x4", "k8-x4"] and m["chosen_in_grid"] and m["points"]["k8-x2"]["l0"] == 8.0
    assert df["opposed"].to_list() == [0.04, 0.04, 0.08, 0.08] and m["points"]["k8-x2"]["opposed"] == 0.08
    assert pl.read_csv(tmp_path / "out" / "front.tsv", separator="\t").height == 4
    assert (tmp_path / "out" / "figures" / "front.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="same"):
        sweep.table([pts[0], pts[0]], (4, 2))


def test_report_shows_the_front_only_when_asked(tmp_path):
    from _report_fixtures import PARAMS, build_run
    from crossdiff.report.collect import collect
    from crossdiff.report.html import render_report

    build_run(tmp_path)
    pts = [_point(4, 2, 0.80, 4.1), _point(8, 2, 0.84, 8.0)]
    sweep.aggregate(_write_points(tmp_path / "pts", pts), tmp_path / "results/sweep/toy/L1/batchtopk",
                    {"type": "batchtopk", "k": 20, "expansion": 16}, "batchtopk")
    spec = {"variant": "batchtopk", "sparsity": [4, 8], "expansion": [2]}
    for include in (False, True):
        params = {**PARAMS, "sweep": spec, "report": {**PARAMS.get("report", {}), "include_sweep": include}}
        run = collect(tmp_path, "toy", 1, ["l1", "batchtopk"], params)
        text = render_report(run, tmp_path / f"report{include}", max_latents=3, examples_per_latent=2).read_text()
        assert ('id="sweep-table"' in text) == include
    assert text.count("<td>✓</td>") == 2 and "not in the grid" in text and "front.png" in text
    assert ">opposed</th>" in text and '<td class="num">8.0%</td>' in text          # k = 8: opposed 0.08


def test_dvc_sees_the_sweep_only_when_tracked():
    """sweep.track: false (default) keeps dvc.yaml the pipeline of `all`; true adds a stage per point, their
    metrics and a scatter plot of the front."""
    from crossdiff import dvcsync

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert not params["sweep"]["track"] and dvcsync.targets(ROOT) == ["all"]
    committed = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert not [s for s in committed["stages"] if s.startswith("sweep")]
    doc = dvcsync.build(ROOT, ["all", "sweep"])
    points = [s for s in doc["stages"] if s.startswith("sweep_point-")]
    assert len(points) == len(sweep.grid(params["sweep"])) and "sweep_aggregate" in doc["stages"]
    assert set(doc["stages"]) - set(committed["stages"]) == {*points, "sweep_aggregate"}
    assert doc["stages"][points[0]]["params"][:2] == ["sweep.variant", "sweep.max_steps"]
    fronts = [p for p in doc["plots"] if isinstance(p, dict) and next(iter(p)).endswith("/front.tsv")]
    assert len(fronts) == 1 and next(iter(fronts[0].values()))["x"] == "l0"
    assert sum(m.startswith("results/sweep/") for m in doc["metrics"]) == len(points) + 1


# -- a tiny `snakemake sweep` on a planted cache (the rule, its script and the trainer, end to end) -----------

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    from _pipeline import run, tiny_repo
    from crossdiff import synthetic as syn

    grid = {"variant": "batchtopk", "sparsity": [2, 4], "expansion": [2, 4], "max_steps": 25}
    repo = tiny_repo(tmp_path_factory.mktemp("sweep"), sweep=grid, device="cpu")
    gt = syn.make_features(syn.SyntheticSpec(d_model=16, n_tokens=3000, noise=0.01, feature_rate=0.05,
                                             shrinkage_ratio=0.1, decoupled_share=0.5,
                                             n_features={"shared": 12, "chat_only": 4, "base_only": 4,
                                                         "shrinkage": 4, "decoupled": 4}))
    acts = repo / "results/activations/toy/L1"                  # the tiny preset's layer
    for split, n in (("train", 3000), ("val", 1000)):
        syn.write_synthetic_cache(acts / f"{split}.h5", gt, split, n)
    dry = run(sys.executable, "-m", "snakemake", "-n", "--forceall", cwd=repo)
    r = run(sys.executable, "-m", "snakemake", "--cores", "1", "sweep", cwd=repo, timeout=900)
    return repo, grid, dry.stdout + dry.stderr, r.stdout + r.stderr


def test_sweep_trains_every_point_and_draws_the_front(tiny_sweep):
    repo, grid, _, log = tiny_sweep
    out = repo / "results/sweep/toy/L1/batchtopk"
    df = pl.read_parquet(out / "table.parquet")
    want = sorted(itertools.product(grid["sparsity"], grid["expansion"]))
    assert sorted(df.select("sparsity", "expansion").rows()) == want, log[-3000:]
    assert df["fve"].is_finite().all() and df["l0"].is_finite().all() and (df["l0"] > 0).all()
    assert (df["steps"] == grid["max_steps"]).all() and (df["dict_size"] == 16 * df["expansion"]).all()
    assert df["on_front"].any() and not df["chosen"].any()           # the preset's k=8, x8 is not in this grid
    assert (out / "figures" / "front.png").stat().st_size > 0
    point = read_json(out / "k4-x2" / "metrics.json")
    assert point["k"] == 4 and point["sweep"]["expansion"] == 2 and "health" in point
    assert not (repo / "results/crosscoders").exists()                # only the sweep ran, not `all`


def test_sweep_is_not_part_of_all(tiny_sweep):
    _, _, dry, _ = tiny_sweep
    assert "train_crosscoder" in dry and "sweep_point" not in dry and "sweep_aggregate" not in dry
