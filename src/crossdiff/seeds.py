"""Conclusions that survive seeds: each crosscoder variant trained with several seeds.

The primary run of a variant keeps its name (`l1`, seed = params `seed`); replicate runs are the same
variant under another training seed, named `l1-seed1`, `l1-seed2`, ... Replicates go through training,
analysis and causal KL like any variant (the rules' `{variant}` wildcard), so the summary here can state
every headline number as a mean with its spread and every paper claim as holding in n of N seeds.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import polars as pl

from crossdiff import io

_REPLICATE = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")

# The paper's causal claims (§3.2, Fig. 5) as tests on one run's headline numbers: claim -> (statement, test).
CLAIMS: dict[str, tuple[str, Callable[[Mapping[str, float]], bool]]] = {
    f"{rank}_best_beats_worst_{mask}": (
        f"{label}: patching the best half lowers KL more than the worst half ({what})",
        lambda h, rank=rank, mask=mask: h[f"kl_{mask}_{rank}_best"] < h[f"kl_{mask}_{rank}_worst"],
    )
    for rank, label in (("nu", "Latent Scaling ν"), ("delta_norm", "Δnorm"))
    for mask, what in (("full", "full responses"), ("first", "tokens 2-10"))
}


def replicate_name(variant: str, seed: int) -> str:
    return f"{variant}-seed{seed}"


def parse(name: str) -> tuple[str, int | None]:
    """`l1-seed2` -> ("l1", 2); a primary run `l1` -> ("l1", None): its seed is params `seed`."""
    m = _REPLICATE.match(name)
    return (m["variant"], int(m["seed"])) if m else (name, None)


def replicates(variants: Sequence[str], seed: int, n_seeds: int) -> list[str]:
    """Names of the replicate runs: seeds seed+1 .. seed+n_seeds-1 of every variant (the primary is seed)."""
    if n_seeds < 1:
        raise ValueError(f"params `seeds` must be >= 1, got {n_seeds}")
    return [replicate_name(v, seed + i) for v in variants for i in range(1, n_seeds)]


def headline(training: Mapping, analysis: Mapping, kl: pl.DataFrame) -> dict[str, float]:
    """One run's headline numbers: val FVE and L0, class counts, ν medians, and causal KL means per condition."""
    val = training.get("val") or {}
    out = {"val_fve": val.get("fve"), "val_l0": val.get("l0"), "dead": analysis.get("n_dead")}
    out.update({f"n_{c}": n for c, n in (analysis.get("classes") or {}).items()})
    for cls, nus in (analysis.get("median_nu") or {}).items():
        out.update({f"median_{k}_{cls}": v for k, v in nus.items()})
    if "source" in kl.columns:  # the eval set's "all" conversations when present (as the report's headline)
        sources = kl["source"].unique().to_list()
        kl = kl.filter(pl.col("source") == ("all" if "all" in sources else sources[0]))
    for r in kl.iter_rows(named=True):
        out[f"kl_{r.get('mask', 'full')}_{r['condition']}"] = r["mean"]
    return {k: (None if v is None else float(v)) for k, v in out.items()}


def summarise(runs: Mapping[str, Sequence[tuple[int, Mapping[str, float]]]]) -> dict:
    """variant -> [(seed, headline)] into, per variant: every number's mean, sd, min and max over seeds, and
    every claim as holding in n of N seeds (a claim whose numbers are missing in a run is not counted)."""
    out = {}
    for variant, seeded in runs.items():
        keys = sorted({k for _, h in seeded for k in h})
        numbers = {}
        for k in keys:
            xs = [h[k] for _, h in seeded if h.get(k) is not None]
            if xs:
                numbers[k] = {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                              "min": min(xs), "max": max(xs), "n": len(xs)}
        claims = {}
        for name, (statement, holds) in CLAIMS.items():
            verdicts = []
            for _, h in seeded:
                try:
                    verdicts.append(bool(holds(h)))
                except (KeyError, TypeError):  # the run lacks this number (e.g. no chat-only latents to rank)
                    pass
            claims[name] = {"statement": statement, "holds": sum(verdicts), "of": len(verdicts)}
        out[variant] = {"seeds": [s for s, _ in seeded], "numbers": numbers, "claims": claims}
    return out


def run_summary(names: Sequence[str], crosscoders: str, analysis: str, causal: str, base_seed: int, out: str) -> dict:
    """Read every run's training/analysis/causal outputs ({dir}/{name}/...), write `out`/metrics.json (the
    summary) and `out`/runs.parquet (one row per run: variant, seed, headline numbers)."""
    per_variant: dict[str, list[tuple[int, dict]]] = {}
    rows = []
    for name in names:
        variant, seed = parse(name)
        seed = base_seed if seed is None else seed
        h = headline(io.read_json(Path(crosscoders) / name / "metrics.json"),
                     io.read_json(Path(analysis) / name / "metrics.json"),
                     pl.read_parquet(Path(causal) / name / "kl.parquet"))
        per_variant.setdefault(variant, []).append((seed, h))
        rows.append({"variant": variant, "seed": seed, **h})
    summary = summarise(per_variant)
    Path(out).mkdir(parents=True, exist_ok=True)
    io.write_parquet(Path(out) / "runs.parquet", pl.DataFrame(rows))
    io.write_json(Path(out) / "metrics.json", summary)
    return summary
