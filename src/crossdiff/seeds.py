"""Conclusions that survive seeds: each crosscoder variant trained with several seeds.

The primary run of a variant keeps its name (`l1`, seed = params `seed`); replicate runs are the same
variant under another training seed, named `l1-seed1`, `l1-seed2`, ... Replicates go through training,
analysis and causal KL like any variant (the rules' `{variant}` wildcard), so the summary here can state
every headline number as a mean with its spread and every paper claim as holding in n of N seeds, and in
how many of them significantly (the paired 95% CI of best − worst excludes 0) or significantly reversed.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from crossdiff import io

_REPLICATE = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")

# The paper's causal claims (§3.2, Fig. 5) on one run's headline numbers: claim -> (statement, ranking, mask).
CLAIMS: dict[str, tuple[str, str, str]] = {
    f"{rank}_best_beats_worst_{mask}": (f"{label}: patching the best half lowers KL more than the worst half ({what})",
                                        rank, mask)
    for rank, label in (("nu", "Latent Scaling ν"), ("delta_norm", "Δnorm"))
    for mask, what in (("full", "full responses"), ("first", "tokens 2-10"))
}


def verdict(h: Mapping[str, float], rank: str, mask: str) -> tuple[bool, bool, bool]:
    """(holds, significant, reversed) for one run: the best half's KL is below the worst half's (the claim's
    sign), and the paired bootstrap 95% CI of best − worst (crossdiff.causal) lies wholly below 0 (significant)
    or wholly above it (reversed). A sign inside the CI is noise: on the toy pair, L1's Δnorm claim (full
    responses) held in 0 of 2 seeds in one run, neither significant, and in 2 of 2 after a tolerance-level
    change to the L1 step."""
    holds = h[f"kl_{mask}_{rank}_best"] < h[f"kl_{mask}_{rank}_worst"]
    lo, hi = h.get(f"diff_{mask}_{rank}_ci_low"), h.get(f"diff_{mask}_{rank}_ci_high")
    return holds, hi is not None and hi < 0, lo is not None and lo > 0


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


def headline(training: Mapping, analysis: Mapping, kl: pl.DataFrame, causal: Mapping | None = None) -> dict[str, float]:
    """One run's headline numbers: val FVE and L0, class counts, ν medians, causal KL means per condition and,
    from the causal metrics, the 95% CI of each best − worst difference."""
    val = training.get("val") or {}
    out = {"val_fve": val.get("fve"), "val_l0": val.get("l0"), "dead": analysis.get("n_dead")}
    out.update({f"n_{c}": n for c, n in (analysis.get("classes") or {}).items()})
    for cls, nus in (analysis.get("median_nu") or {}).items():
        out.update({f"median_{k}_{cls}": v for k, v in nus.items()})
    source = None
    if "source" in kl.columns:  # the eval set's "all" conversations when present (as the report's headline)
        sources = kl["source"].unique().to_list()
        source = "all" if "all" in sources else sources[0]
        kl = kl.filter(pl.col("source") == source)
    for r in kl.iter_rows(named=True):
        out[f"kl_{r.get('mask', 'full')}_{r['condition']}"] = r["mean"]
    diffs = (causal or {}).get("best_minus_worst") or {}
    picked = diffs.get(source) if source else next(iter(diffs.values()), None)   # the KL means' source
    for mask, ranks in (picked or {}).items():
        for rank, d in (ranks or {}).items():
            if d and d.get("ci_low") is not None:
                out[f"diff_{mask}_{rank}_ci_low"], out[f"diff_{mask}_{rank}_ci_high"] = d["ci_low"], d["ci_high"]
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
        for name, (statement, rank, mask) in CLAIMS.items():
            verdicts = []
            for _, h in seeded:
                try:
                    verdicts.append(verdict(h, rank, mask))
                except (KeyError, TypeError):  # the run lacks this number (e.g. no chat-only latents to rank)
                    pass
            claims[name] = {"statement": statement, "holds": sum(v[0] for v in verdicts), "of": len(verdicts),
                            "significant": sum(v[1] for v in verdicts), "reversed": sum(v[2] for v in verdicts)}
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
        ci = Path(causal) / name / "metrics.json"
        h = headline(io.read_json(Path(crosscoders) / name / "metrics.json"),
                     io.read_json(Path(analysis) / name / "metrics.json"),
                     pl.read_parquet(Path(causal) / name / "kl.parquet"), io.read_json(ci) if ci.exists() else None)
        per_variant.setdefault(variant, []).append((seed, h))
        rows.append({"variant": variant, "seed": seed, **h})
    summary = summarise(per_variant)
    Path(out).mkdir(parents=True, exist_ok=True)
    io.write_parquet(Path(out) / "runs.parquet", pl.DataFrame(rows))
    io.write_json(Path(out) / "metrics.json", summary)
    return summary
