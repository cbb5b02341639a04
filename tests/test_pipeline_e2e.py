"""End to end on the tiny preset: `snakemake` and `dvc repro` build the same results, and the DVC
daily loop (repro, status, push/pull, experiments) is exact. These run the real pipeline."""

from __future__ import annotations

import json
import re
import shutil

import polars as pl
import pytest
import yaml
from safetensors.numpy import load_file

from _pipeline import BIN, digests, run, tiny_repo
from crossdiff import stage_times

pytestmark = pytest.mark.slow

L = "L1"  # tiny preset layer
VARIANTS = ["l1", "batchtopk"]
PRODUCTS = [
    "results/models/toy/metrics.json",
    "results/corpus/toy/train.parquet",
    "results/activations/toy/L1/train.h5",
    "results/activations/toy/L1/val.h5",
    *[f"results/crosscoders/toy/{L}/{v}/model.safetensors" for v in VARIANTS],
    *[f"results/crosscoders/toy/{L}/{v}/metrics.json" for v in VARIANTS],
    *[f"results/analysis/toy/{L}/{v}/latents.parquet" for v in VARIANTS],
    *[f"results/causal/toy/{L}/{v}/kl.parquet" for v in VARIANTS + [f"{v}-seed1" for v in VARIANTS]],
    f"results/analysis/toy/{L}/seeds/metrics.json",
    *[f"results/autointerp/toy/{L}/{v}/scores.parquet" for v in VARIANTS],
    "results/validate/metrics.json",
    "results/report/toy/index.html",
]


@pytest.fixture(scope="module")
def smk_repo(tmp_path_factory):
    repo = tiny_repo(tmp_path_factory.mktemp("smk"))
    run("snakemake", "--cores", "2", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    repo = tiny_repo(tmp_path_factory.mktemp("dvc"))
    run("dvc", "repro", cwd=repo)
    # the daily loop: the baseline's dvc.lock is committed, so experiments diff against HEAD
    run("git", "add", "-A", cwd=repo)
    run("git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "baseline run", cwd=repo)
    return repo


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def test_snakemake_builds_every_product(smk_repo):
    missing = [p for p in PRODUCTS if not (smk_repo / p).exists()]
    assert not missing
    assert "Nothing to be done" in run("snakemake", "-n", cwd=smk_repo).stdout


def test_every_job_records_its_time_and_memory(smk_repo):
    table = stage_times.read(smk_repo / "results/benchmarks/toy")
    assert {"build_toy_pair", "train_crosscoder-l1", "causal_kl-batchtopk", "render_report"} <= set(table["job"])
    assert (table["seconds"] > 0).all() and (table["peak_rss_gib"] > 0).all()
    assert 'id="stage-table"' in (smk_repo / "results/report/toy/index.html").read_text()


def test_demo_commit_step_leaves_dvc_clean(smk_repo):
    """`make demo` ends with `make dvc-commit`: after it, DVC knows the Snakemake run (no stage to rebuild)."""
    assert not (smk_repo / "dvc.lock").exists()
    run("make", "-s", "dvc-commit", f"BIN={BIN}", cwd=smk_repo)
    status = json.loads(run("dvc", "status", "--json", cwd=smk_repo).stdout)
    assert status == {}, status
    assert "Nothing to be done" in run("snakemake", "-n", cwd=smk_repo).stdout  # Snakemake's view is unchanged


def test_dvc_repro_and_snakemake_produce_the_same_results(smk_repo, dvc_repo):
    for rel in ["results/corpus/toy/train.parquet", *[f"results/analysis/toy/{L}/{v}/latents.parquet" for v in VARIANTS]]:
        assert pl.read_parquet(smk_repo / rel).equals(pl.read_parquet(dvc_repo / rel)), rel
    for v in VARIANTS:
        a = load_file(smk_repo / f"results/crosscoders/toy/{L}/{v}/model.safetensors")
        b = load_file(dvc_repo / f"results/crosscoders/toy/{L}/{v}/model.safetensors")
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), v


def test_second_repro_does_nothing_and_snakemake_agrees(dvc_repo):
    r = run("dvc", "repro", cwd=dvc_repo)
    assert not ran_stages(r.stdout), r.stdout
    assert "Nothing to be done" in run("snakemake", "-n", cwd=dvc_repo).stdout


def test_push_wipe_pull_restores_identical_files(dvc_repo):
    before = digests(dvc_repo, PRODUCTS)
    run("dvc", "push", cwd=dvc_repo)
    shutil.rmtree(dvc_repo / "results")
    shutil.rmtree(dvc_repo / ".dvc" / "cache")
    run("dvc", "pull", cwd=dvc_repo)
    run("snakemake", "--touch", "--cores", "1", cwd=dvc_repo)
    assert "Nothing to be done" in run("snakemake", "-n", cwd=dvc_repo).stdout
    assert digests(dvc_repo, PRODUCTS) == before


def test_exp_run_reuses_activations_and_changes_metrics(dvc_repo):
    r = run("dvc", "exp", "run", "--temp", "-S", "crosscoders.batchtopk.k=4", "-n", "k4", cwd=dvc_repo)
    stages = ran_stages(r.stdout)
    assert "train_crosscoder-batchtopk" in stages
    assert not {s for s in stages if s.startswith(("cache_activations", "build_", "train_crosscoder-l1"))}, stages
    diff = json.loads(run("dvc", "exp", "diff", "HEAD", "k4", "--json", cwd=dvc_repo).stdout)
    changed = diff["metrics"][f"results/crosscoders/toy/{L}/batchtopk/metrics.json"]
    assert any(v.get("diff") not in (0, None) for v in _leaves(changed)), changed


def test_param_change_reruns_exactly_the_affected_stages(dvc_repo):
    params = yaml.safe_load((dvc_repo / "params.yaml").read_text())
    params["crosscoders"]["batchtopk"]["lr"] *= 2
    (dvc_repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    affected = {"train_crosscoder-batchtopk", "analyse_latents-batchtopk", "compare_variants",
                "causal_kl-batchtopk", "collect_examples-batchtopk", "explain_and_score-batchtopk",
                # its seed replicate, and the across-seeds summary
                "train_crosscoder-batchtopk-seed1", "analyse_latents-batchtopk-seed1", "causal_kl-batchtopk-seed1",
                "summarise_seeds",
                "render_report", "validate_behaviours",
                "validate_synthetic",  # trains both kinds on synthetic data with the `crosscoders` configs
                # behaviours.json (one file for both variants) picks the latents autointerp explains; l1's part is
                # unchanged, so its rerun answers every LLM request from the on-disk cache
                "collect_examples-l1", "explain_and_score-l1"}
    status = json.loads(run("dvc", "status", "--json", cwd=dvc_repo).stdout)
    assert "train_crosscoder-batchtopk" in status and set(status) <= affected, status
    stages = ran_stages(run("dvc", "repro", cwd=dvc_repo).stdout)
    assert "train_crosscoder-batchtopk" in stages and stages <= affected, stages


def _leaves(node):
    if isinstance(node, dict) and "diff" in node:
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from _leaves(v)
