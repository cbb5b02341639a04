"""Scale-out profiles are real executor-plugin configs: Snakemake accepts them (dry-run, no cluster)."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args):
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout + r.stderr


def job_count(out: str, rule: str) -> int:
    m = re.search(rf"^{rule}\s+(\d+)$", out, re.M)
    return int(m.group(1)) if m else 0


def test_slurm_profile_shards_activation_caching(tmp_path):
    shards = tmp_path / "shards.yaml"
    shards.write_text("activations:\n  shards: 4\n")
    out = dry_run("--profile", "profiles/slurm", "--configfile", str(shards), "--forceall")
    assert job_count(out, "cache_activations") == 8  # 4 shards x {train, val}, independent GPU jobs
    assert job_count(out, "merge_activations") == 2


def test_kubernetes_profile_accepts_the_workflow(tmp_path):
    out = dry_run("--profile", "profiles/kubernetes", "--default-storage-provider", "fs",
                  "--default-storage-prefix", str(tmp_path / "shared"), "--forceall")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert job_count(out, "train_crosscoder") == len(params["crosscoders"]) * params["seeds"]  # every variant x seed
