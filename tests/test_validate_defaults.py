"""bench/validate_defaults.py (issue 17): the generated sets and the table the README quotes come out as stated."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import validate_defaults as vd  # noqa: E402


def test_sets_span_the_issue_grid_and_split_features_by_kind():
    d = [s[1] for s in vd.SETS]
    per_d = [s[2] for s in vd.SETS]
    assert min(d) == 64 and max(d) == 256 and min(per_d) == 4 and max(per_d) == 16
    assert len({s[3] for s in vd.SETS}) > 1 and len({s[4] for s in vd.SETS}) > 1
    spec = vd.spec_params(64, 6, 0.01, 0.01, 1000, 0)
    assert spec["n_features"] == {"shared": 256, "chat_only": 32, "base_only": 32, "shrinkage": 32, "decoupled": 32}
    assert spec["train"] == {}          # no per-set overrides: the crosscoders entries as they are


def test_script_runs_the_real_validation_with_the_entries_as_they_are(tmp_path):
    """A short run on one generated set: one row per variant, values in range, the entries' own k and steps."""
    out = tmp_path / "table.json"
    short = ["-S", "l1.min_steps=40", "-S", "batchtopk.min_steps=40", "-S", "l1.min_tokens_per_latent=0",
             "-S", "batchtopk.min_tokens_per_latent=0", "-S", "l1.expansion=2",
             "-S", "batchtopk.expansion=2", "-S", "batchtopk.k_aux=32"]
    r = subprocess.run([sys.executable, "bench/validate_defaults.py", "--out", str(out), "--n-tokens", "4096",
                        "--sets", "d64-x6-r01-n01", *short], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["variant"] for row in rows] == ["l1", "batchtopk"]
    for row in rows:
        assert 0 <= row["recall"] <= 1 and 0 <= row["dead"] <= 1 and 0 <= row["opposed"] <= 1 and row["steps"] == 40
        assert row["fve"] < 1 and row["health"] in ("pass", "fail") and isinstance(row["pass"], bool)
    assert rows[0]["target_fve"] == 0.9                            # params.yaml's entries, no per-set overrides
    assert rows[1]["k_requested"] == 20 and rows[1]["k"] == 8      # k = 20 capped at d / 8 (k_max_per_dim)
    assert "| d64-x6-r01-n01 | 3.84 | batchtopk |" in r.stdout and "chat-only recall" in r.stdout
