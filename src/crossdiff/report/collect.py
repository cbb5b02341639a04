"""Gather one run's outputs (DESIGN §2 paths) for the report. Every piece is optional.

A stage that has not run yet leaves its attribute `None` and its path in `missing`, so the report
says "not run" where it would show the piece instead of failing: the dashboard is useful while the
pipeline is half done. A file that exists but cannot be read is an error, not a missing piece.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import polars as pl

from crossdiff import stage_times
from crossdiff.io import read_json

VERSIONED = ("crossdiff", "torch", "transformers", "snakemake", "dvc", "polars", "numpy", "jinja2")


@dataclass
class VariantRun:
    """Everything one crosscoder variant produced (training, analysis, causal, autointerp)."""

    name: str
    training: dict | None = None          # crosscoders/.../metrics.json
    config: dict | None = None            # crosscoders/.../config.json
    latents: pl.DataFrame | None = None   # analysis/.../latents.parquet
    analysis: dict | None = None          # analysis/.../metrics.json
    analysis_figures: list[Path] = field(default_factory=list)
    kl: pl.DataFrame | None = None        # causal/.../kl.parquet
    causal: dict | None = None
    causal_figures: list[Path] = field(default_factory=list)
    examples: pl.DataFrame | None = None  # autointerp/.../examples.parquet
    explanations: dict[int, dict] | None = None
    scores: pl.DataFrame | None = None
    autointerp: dict | None = None
    missing: dict[str, str] = field(default_factory=dict)  # piece -> path that was not found


@dataclass
class Run:
    pair: str
    layer: int
    params: dict
    versions: dict[str, str]
    variants: list[VariantRun]
    models: dict | None = None
    comparison: dict | None = None
    comparison_figures: list[Path] = field(default_factory=list)
    seeds: dict | None = None             # analysis/.../seeds/metrics.json (crossdiff.seeds)
    validate: dict | None = None
    validate_figures: list[Path] = field(default_factory=list)
    behaviours: dict | None = None
    stage_times: pl.DataFrame | None = None  # benchmarks/{pair}/*.tsv: wall time and peak RSS per job
    sweep: dict | None = None             # sweep/.../metrics.json (only with report.include_sweep)
    sweep_table: pl.DataFrame | None = None
    sweep_figures: list[Path] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)


def _read(path: Path, reader, missing: dict[str, str], name: str) -> Any:
    if not path.is_file():
        missing[name] = str(path)
        return None
    try:
        return reader(path)
    except Exception as e:  # a corrupt output is a real error: say which file
        raise ValueError(f"cannot read {path}: {e}") from e


def read_jsonl(path: Path) -> dict[int, dict]:
    """explanations.jsonl -> {latent: record}; one JSON object per line with a `latent` key."""
    out = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            rec = json.loads(line)
            if "latent" not in rec:
                raise ValueError(f"line {i + 1} has no `latent` key")
            out[int(rec["latent"])] = rec
    return out


def _figures(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


def collect_variant(root: Path, pair: str, layer: int, name: str) -> VariantRun:
    v = VariantRun(name)
    cc = root / f"results/crosscoders/{pair}/L{layer}/{name}"
    an = root / f"results/analysis/{pair}/L{layer}/{name}"
    ca = root / f"results/causal/{pair}/L{layer}/{name}"
    ai = root / f"results/autointerp/{pair}/L{layer}/{name}"
    m = v.missing
    v.training = _read(cc / "metrics.json", read_json, m, "training")
    v.config = _read(cc / "config.json", read_json, m, "config")
    v.latents = _read(an / "latents.parquet", pl.read_parquet, m, "latents")
    v.analysis = _read(an / "metrics.json", read_json, m, "analysis")
    v.analysis_figures = _figures(an / "figures")
    v.kl = _read(ca / "kl.parquet", pl.read_parquet, m, "kl")
    v.causal = _read(ca / "metrics.json", read_json, m, "causal")
    v.causal_figures = _figures(ca / "figures")
    v.examples = _read(ai / "examples.parquet", pl.read_parquet, m, "examples")
    v.explanations = _read(ai / "explanations.jsonl", read_jsonl, m, "explanations")
    v.scores = _read(ai / "scores.parquet", pl.read_parquet, m, "scores")
    v.autointerp = _read(ai / "metrics.json", read_json, m, "autointerp")
    return v


def versions() -> dict[str, str]:
    """Package versions and the git commit the report was rendered from (reproducibility)."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=10)
        if rev.returncode == 0:
            out["git"] = rev.stdout.strip() + (" (modified)" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    out["executable"] = sys.executable
    return out


def _pair_metrics(models: Path, missing: dict[str, str]) -> dict | None:
    """A built pair's evaluation.json (losses, behaviours: the base vs chat rows, first; it wins a clash with an
    older metrics.json that still held them) and metrics.json (training), the evaluation's time as
    `time_s.evaluate`."""
    built = _read(models / "metrics.json", read_json, missing, "models")
    evaluation = _read(models / "evaluation.json", read_json, missing, "evaluation") if built else None
    if not evaluation:
        return built
    times = {**built.get("time_s", {}), "evaluate": evaluation.get("time_s", {}).get("total")}
    return {**evaluation, **{k: v for k, v in built.items() if k not in evaluation}, "time_s": times}


def collect(root: str | Path, pair: str, layer: int, variants: list[str], params: dict | None = None) -> Run:
    """Read every output of the run `pair`/`layer` under `root` (the directory holding results/)."""
    root = Path(root)
    run = Run(pair=pair, layer=layer, params=params or {}, versions=versions(),
              variants=[collect_variant(root, pair, layer, v) for v in variants])
    comp = root / f"results/analysis/{pair}/L{layer}/comparison"
    run.models = _pair_metrics(root / f"results/models/{pair}", run.missing)
    run.comparison = _read(comp / "metrics.json", read_json, run.missing, "comparison")
    run.comparison_figures = _figures(comp / "figures")
    run.seeds = _read(comp.parent / "seeds" / "metrics.json", read_json, run.missing, "seeds")
    run.validate = _read(root / "results/validate/metrics.json", read_json, run.missing, "validate")
    run.validate_figures = _figures(root / "results/validate/figures")
    run.behaviours = _read(root / f"results/validate/{pair}/behaviours.json", read_json, run.missing, "behaviours")
    run.stage_times = stage_times.read(root / f"results/benchmarks/{pair}")  # written by Snakemake; absent otherwise
    sweep = (params or {}).get("sweep")
    if (params or {}).get("report", {}).get("include_sweep") and sweep:
        sw = root / f"results/sweep/{pair}/L{layer}/{sweep['variant']}"
        run.sweep = _read(sw / "metrics.json", read_json, run.missing, "sweep")
        run.sweep_table = _read(sw / "table.parquet", pl.read_parquet, run.missing, "sweep_table")
        run.sweep_figures = _figures(sw / "figures")
    return run
