"""bench/gpu_paper.py, the GPU measurement of issue 19, run small on the CPU: it must run end to end before
anyone spends device time on it, and its two formulations must compute the same loss."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import gpu_paper  # noqa: E402  (after the sys.path insert that finds bench/)


def test_gpu_paper_quick_runs_and_formulations_agree(tmp_path):
    out = tmp_path / "gpu.json"
    gpu_paper.main(["--quick", "--no-profile", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["ours"]["recon_rel_diff_vs_dense"] < 1e-4
    assert set(r["ours"]["phases_s"]) == {"encoder", "select", "loss", "backward", "clip", "adam"}
    assert sum(r["ours"]["phases_s"].values()) == pytest.approx(r["ours"]["step_s"])
    assert r["ours_10pct_dead"]["dead_share"] == 0.1


def test_gpu_paper_refuses_the_paper_shape_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_paper.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        gpu_paper.main(["--out", str(tmp_path / "gpu.json")])
