"""Params: the shipped files validate; bad values stop Snakemake before compute, naming the key."""

import ast
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from crossdiff import config as cfg
from crossdiff.cli import resolve_device
from crossdiff.latents import DEAD_FREQ

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


@pytest.mark.parametrize("endpoint,message", [
    ({"model": "package:no-such-model"}, "unknown packaged model 'no-such-model'"),
    ({"model": "package:smollm2-135m-instruct", "base_url": "http://127.0.0.1:1/v1"}, "base_url must be empty"),
])
def test_a_bad_explainer_names_its_key(tmp_path, endpoint, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"autointerp": {"endpoint": endpoint}}))
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--configfile", str(bad)],
                       cwd=ROOT, capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "autointerp.endpoint.model" in out and message in out, out[-2000:]


# ---- one way to read device and dtype --------------------------------------------------------------------

# The stages that load a language model (the pair, the chat model, or the served explainer/scorer).
MODEL_STAGES = ["cache_activations", "generate_eval_set", "causal_kl", "explain_and_score"]
# The stages that run only crosscoders (training, Latent Scaling, examples, validation): device, no dtype.
CROSSCODER_STAGES = ["train_crosscoder", "analyse_latents", "collect_examples", "validate_synthetic",
                     "validate_behaviours"]


def dry_run_params(tmp_path, override: dict) -> dict[str, list[dict]]:
    """rule -> the --params JSON of each of its jobs, as `snakemake -n -p` prints the commands it would run."""
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    r = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "--forceall", "--configfile",
                        str(tmp_path / "override.yaml")], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, list[dict]] = {}
    for line in r.stdout.splitlines():
        if "workflow_scripts/" not in line or "--params" not in line:
            continue
        argv = shlex.split(line.split("2>&1")[0])
        script = next(a for a in argv if a.startswith("workflow_scripts/"))
        assert "--device" not in argv, line  # a rule passing --device would override the params slice
        out.setdefault(Path(script).stem, []).append(json.loads(argv[argv.index("--params") + 1]))
    return out


def test_device_and_dtype_reach_every_model_loading_stage(tmp_path):
    jobs = dry_run_params(tmp_path, {"device": "cuda:1", "models": {"dtype": "bfloat16"}})
    for stage in MODEL_STAGES:
        assert jobs.get(stage), f"no {stage} job in the dry run"
        for params in jobs[stage]:
            rt = cfg.Runtime.from_params(params)
            assert rt == cfg.Runtime(device="cuda:1", dtype="bfloat16"), (stage, params)
            assert resolve_device(rt.device) == torch.device("cuda", 1)  # no GPU needed to name one
    for stage in CROSSCODER_STAGES:  # crosscoders train, are analysed and validated there too
        assert jobs.get(stage) and all(p["device"] == "cuda:1" for p in jobs[stage]), stage


@pytest.mark.parametrize("stage", MODEL_STAGES + CROSSCODER_STAGES)
def test_model_loading_scripts_have_no_device_default_that_wins(stage):
    """The defect: `--device` defaulting to "auto" silently replaced params `device`. An override may exist
    (tests pass --device cpu) but must default to None, so the params slice decides."""
    tree = ast.parse((ROOT / "workflow_scripts" / f"{stage}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args \
                and getattr(node.args[0], "value", None) == "--device":
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            assert isinstance(default, ast.Constant) and default.value is None, f"{stage}: --device has a default"


def test_runtime_and_library_defaults_are_params_yaml():
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert cfg.Runtime() == cfg.Runtime(device=p["device"], dtype=p["models"]["dtype"])
    assert cfg.Runtime.from_params({"device": "cpu"}, device="cuda:0").device == "cuda:0"  # --device wins
    assert DEAD_FREQ == p["analysis"]["dead_freq"]


def test_runtime_names_a_bad_dtype():
    with pytest.raises(cfg.ParamsError, match="`models.dtype`"):
        cfg.Runtime.from_params({"device": "cpu", "models": {"dtype": "float8"}})
