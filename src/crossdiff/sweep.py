"""The sweep: one crosscoder per point of a small sparsity × expansion grid, and the FVE–L0 trade-off it traces.

Why: the right k (BatchTopK) or target L0 (L1 with `mu: auto`) and the dictionary size depend on the model pair;
one run says nothing about whether a sparser or larger dictionary would reconstruct as well (issue 17). Each
point is the params' `crosscoders:` entry named by `sweep.variant` with only the swept keys replaced, trained by
the normal trainer (`crossdiff.train.train`) on the pipeline's activation cache, then scored on the val cache:
FVE, L0 and dead fraction (the trainer's own validation), the share of opposed latents (crossdiff.health: a sign
of k above the data's L0) and the live Δnorm chat-only class count (eq. 4).
`aggregate` gathers the points into one table, marks the Pareto front (no other point has at least the FVE at
no more L0, one of them strictly) and the params' own point ("chosen"), and draws the front.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl

# The swept sparsity knob of each crosscoder type, as it appears in paths, tables and figures.
KNOB = {"batchtopk": "k", "l1": "target_l0"}
PREFIX = {"batchtopk": "k", "l1": "l0_"}  # a point's name and directory: k8-x16, l0_8-x16


def knob(entry: Mapping) -> str:
    if entry.get("type") not in KNOB:
        raise ValueError(f"sweep.variant: crosscoder type must be one of {sorted(KNOB)}, got {entry.get('type')!r}")
    return KNOB[entry["type"]]


def grid(sweep: Mapping) -> list[tuple[int, int]]:
    """Every (sparsity, expansion) point of the `sweep:` params, sparsity-major, without duplicates."""
    sparsity, expansion = list(dict.fromkeys(sweep["sparsity"])), list(dict.fromkeys(sweep["expansion"]))
    if not sparsity or not expansion:
        raise ValueError(f"sweep.sparsity and sweep.expansion need at least one value, got {sparsity}, {expansion}")
    return [(int(s), int(x)) for s in sparsity for x in expansion]


def point_params(entry: Mapping, sparsity: int, expansion: int, max_steps: int | None = None) -> dict:
    """The entry with the swept keys replaced: `expansion` (and no fixed `dict_size`), BatchTopK `k`, or for L1
    `target_l0` with `mu: auto` (a fixed μ has no L0 to sweep); `max_steps` caps the run when set."""
    name = knob(entry)
    if sparsity < 1 or expansion < 1:
        raise ValueError(f"sweep point needs positive sparsity and expansion, got {sparsity}, {expansion}")
    out = {k: v for k, v in entry.items() if k != "dict_size"}
    out.update(expansion=int(expansion), **{name: int(sparsity)})
    if name == "k":
        out["k_max_per_dim"] = None                 # the grid's k is what is asked about: no cap
    if name == "target_l0":
        out["mu"] = "auto"
        out.pop("target_fve", None)                 # the swept L0 is the target now
    if max_steps:
        out["max_steps"] = int(max_steps)
    return out


def chosen(entry: Mapping, d_model: int | None = None) -> tuple[int | None, int]:
    """The params' own point: (k or target_l0, expansion); sparsity None for an L1 entry with a fixed μ.
    BatchTopK's k is the one its training uses, capped by `k_max_per_dim` at `d_model` (crossdiff.train.capped_k)."""
    from crossdiff.train import capped_k

    s = entry.get(knob(entry))
    if knob(entry) == "k" and d_model:
        s = capped_k(s, entry.get("k_max_per_dim"), d_model)
    return (int(s) if s is not None else None), int(entry["expansion"])


def chat_only_count(model_dir: str | Path, val: str | Path, classes: Mapping, dead_freq: float,
                    device="cpu", batch_size: int = 4096) -> int:
    """Live latents in the Δnorm chat-only band (eq. 4): the analysis stage's class count without Latent Scaling."""
    from crossdiff.cache import ActivationCache
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.latents import activation_stats, classify, delta_norm

    cc = CrossCoder.load(model_dir, device=device).eval()
    cache = ActivationCache(val)
    acts = activation_stats(cc, cache.iter_sequential(batch_size, fields=("acts", "template"), device=device),
                            progress=False)
    norms = cc.decoder_norms().detach().double().cpu().numpy()
    alive = acts.fired / max(acts.n_tokens, 1) >= max(dead_freq, 1e-300)
    return int(((classify(delta_norm(norms[0], norms[1]), classes) == "chat_only") & alive).sum())


def run_point(train_path: str | Path, val_path: str | Path, out: str | Path, entry: Mapping, sparsity: int,
              expansion: int, analysis: Mapping, seed: int = 0, device: str = "auto",
              max_steps: int | None = None, progress: bool = True) -> dict:
    """Train one grid point with the normal trainer and add its `sweep` block to {out}/metrics.json."""
    from crossdiff.cli import resolve_device
    from crossdiff.io import write_json
    from crossdiff.train import train

    t0 = time.perf_counter()
    metrics = train(train_path, val_path, out, point_params(entry, sparsity, expansion, max_steps), seed=seed,
                    device=device, progress=progress)
    n_chat = chat_only_count(out, val_path, analysis["classes"], analysis.get("dead_freq", 1e-6),
                             device=resolve_device(device))
    metrics["sweep"] = {"knob": knob(entry), "sparsity": int(sparsity), "expansion": int(expansion),
                        "chat_only": n_chat, "time_s": time.perf_counter() - t0}
    write_json(Path(out) / "metrics.json", metrics)
    return metrics


# -- the table and its front ---------------------------------------------------------------------------------

def pareto_front(l0: Sequence[float], fve: Sequence[float]) -> np.ndarray:
    """Mask of the points no other point dominates (L0 ≤ and FVE ≥, one strictly); non-finite points never are.

    One pass in order of L0 (ties: highest FVE first): a point is on the front when its FVE beats every point
    of strictly lower L0 and equals the best at its own L0 (equal points do not dominate each other)."""
    l0, fve = np.asarray(l0, float), np.asarray(fve, float)
    ok = np.isfinite(l0) & np.isfinite(fve)
    on = np.zeros(len(l0), bool)
    idx = np.flatnonzero(ok)
    idx = idx[np.lexsort((-fve[idx], l0[idx]))]
    best = -math.inf
    i = 0
    while i < len(idx):
        j = i
        while j < len(idx) and l0[idx[j]] == l0[idx[i]]:
            j += 1
        top = fve[idx[i]]                                        # highest FVE at this L0
        if top > best:
            on[idx[i:j]] = fve[idx[i:j]] == top
            best = top
        i = j
    return on


def _num(v) -> float:
    return math.nan if v is None else float(v)          # metrics.json writes NaN as null


def table(points: Sequence[Mapping], chosen_point: tuple[int | None, int]) -> pl.DataFrame:
    """One row per point's metrics.json (sorted by sparsity, expansion) with `on_front` and `chosen`."""
    rows = []
    for m in points:
        sw, val = m.get("sweep"), m.get("val") or m.get("train") or {}
        if sw is None:
            raise ValueError("a sweep point's metrics.json has no `sweep` block (not written by crossdiff.sweep)")
        rows.append({"sparsity": sw["sparsity"], "expansion": sw["expansion"], "dict_size": m.get("dict_size"),
                     "steps": m.get("steps"), "fve": _num(val.get("fve")), "l0": _num(val.get("l0")),
                     "dead": _num(val.get("dead")), "opposed": _num(m.get("opposed_decoders")),
                     "chat_only": sw.get("chat_only"), "time_s": float(sw["time_s"]), "health": m.get("health")})
    if not rows:
        raise ValueError("no sweep points to aggregate")
    df = pl.DataFrame(rows, schema_overrides={"health": pl.Utf8}).sort("sparsity", "expansion")
    if df.select("sparsity", "expansion").is_duplicated().any():
        raise ValueError("two sweep points have the same (sparsity, expansion)")
    return df.with_columns(on_front=pl.Series(pareto_front(df["l0"], df["fve"])),
                           chosen=(pl.col("sparsity") == chosen_point[0]) & (pl.col("expansion") == chosen_point[1]))


def aggregate(point_files: Sequence[str | Path], out: str | Path, entry: Mapping, variant: str) -> dict:
    """{out}/table.parquet, front.tsv (for `dvc plots`), metrics.json and figures/front.png from the points."""
    from crossdiff.io import atomic_path, read_json, write_json, write_parquet
    from crossdiff.report.figures import sweep_front

    out = Path(out)
    points = [read_json(p) for p in point_files]
    d_model = points[0]["dict_size"] // points[0]["sweep"]["expansion"] if points else None
    pick = chosen(entry, d_model)
    df = table(points, pick)
    write_parquet(out / "table.parquet", df)
    with atomic_path(out / "front.tsv", suffix=".tsv") as tmp:
        df.write_csv(tmp, separator="\t")
    name = knob(entry)
    sweep_front(out / "figures" / "front.png", df, name, f"{variant}: val FVE vs L0 over {name} × expansion")
    prefix = PREFIX[entry["type"]]
    metrics = {"variant": variant, "knob": name, "chosen": {name: pick[0], "expansion": pick[1]},
               "chosen_in_grid": bool(df["chosen"].any()), "n_points": df.height,
               "front": [f"{prefix}{r['sparsity']}-x{r['expansion']}" for r in df.filter("on_front").iter_rows(named=True)],
               "points": {f"{prefix}{r['sparsity']}-x{r['expansion']}":
                          {k: r[k] for k in ("fve", "l0", "dead", "opposed", "chat_only", "time_s", "on_front")}
                          for r in df.iter_rows(named=True)}}
    write_json(out / "metrics.json", metrics)
    return metrics
