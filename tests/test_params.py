"""Params: the shipped files validate; bad values stop Snakemake before compute, naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crossdiff import config as cfg

ROOT = Path(__file__).resolve().parents[1]


def test_default_params_and_presets_validate():
    cfg.load(ROOT / "params.yaml")
    for preset in sorted((ROOT / "presets").glob("*.yaml")):
        cfg.load(ROOT / "params.yaml", preset)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"crosscoders": {"batchtopk": {"k": -3}}}, "crosscoders.batchtopk.k"),
        ({"crosscoders": {"batchtopk": {"type": "topk"}}}, "crosscoders.batchtopk.type"),
        ({"layer": "thirteen"}, "layer"),
        ({"corpus": {"chat_fraction": 1.5}}, "corpus.chat_fraction"),
        ({"analysis": {"unknown_knob": 1}}, "analysis"),
    ],
)
def test_bad_value_names_the_key(override, key):
    bad = cfg.merge(yaml.safe_load((ROOT / "params.yaml").read_text()), override)
    with pytest.raises(cfg.ParamsError, match=f"`{key}`"):
        cfg.validate(bad)


def test_batchtopk_requires_k():
    bad = yaml.safe_load((ROOT / "params.yaml").read_text())
    del bad["crosscoders"]["batchtopk"]["k"]
    with pytest.raises(cfg.ParamsError, match="'k' is a required property"):
        cfg.validate(bad)


def test_select_returns_only_declared_keys():
    c = cfg.load(ROOT / "params.yaml")
    s = cfg.select(c, ["crosscoders.{variant}", "layer"], variant="batchtopk")
    assert s == {"crosscoders": {"batchtopk": c["crosscoders"]["batchtopk"]}, "layer": c["layer"]}


def test_snakemake_stops_before_compute_on_bad_params(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("crosscoders:\n  batchtopk:\n    k: -3\n")
    r = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--configfile", str(bad)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode != 0
    assert "crosscoders.batchtopk.k" in r.stdout + r.stderr
    assert "Building DAG" not in r.stdout + r.stderr
