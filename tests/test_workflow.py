"""The Snakemake workflow is lint-clean, prints its DAG, and dvc.yaml is generated from it."""

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from crossdiff import dvcsync

ROOT = Path(__file__).resolve().parents[1]


def snakemake(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=cwd, capture_output=True, text=True)


def test_lint_is_clean():
    r = snakemake("--lint")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Lints for" not in r.stdout + r.stderr


def test_dry_run_prints_dag_with_every_stage():
    r = snakemake("-n", "--forceall")
    assert r.returncode == 0, r.stderr
    for rule in ["build_toy_pair", "build_corpus", "cache_activations", "train_crosscoder",
                 "analyse_latents", "causal_kl", "explain_and_score", "render_report", "validate_synthetic"]:
        assert rule in r.stdout, rule


def test_committed_dvc_yaml_is_current():
    r = subprocess.run([sys.executable, "workflow_scripts/sync_dvc.py", "--check"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_dvc_stages_mirror_snakemake_jobs():
    doc = dvcsync.build(ROOT)
    stages = doc["stages"]
    assert {"train_crosscoder-l1", "train_crosscoder-batchtopk"} <= set(stages)
    train = stages["train_crosscoder-batchtopk"]
    assert train["params"] == ["crosscoders.batchtopk", "seed", "device"]
    assert "--allowed-rules train_crosscoder" in train["cmd"]
    assert "src/crossdiff/train.py" in train["deps"]
    assert any(d.endswith("train.h5") for d in train["deps"])
    assert any(m.endswith("batchtopk/metrics.json") for m in doc["metrics"])


def test_check_fails_on_stale_dvc_yaml(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", ".git", "results", ".snakemake", "__pycache__"))
    assert dvcsync.sync(repo, check=True)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["crosscoders"]["topk2"] = dict(params["crosscoders"]["batchtopk"])  # a new variant = new stages
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    assert not dvcsync.sync(repo, check=True)
    dvcsync.sync(repo)
    assert "train_crosscoder-topk2" in (repo / "dvc.yaml").read_text()
    assert dvcsync.sync(repo, check=True)
