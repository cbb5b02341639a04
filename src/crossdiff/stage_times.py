"""Where a run's time and memory went: Snakemake's per-job `benchmark:` files as one table.

Every rule writes `results/benchmarks/{pair}/{rule}[-{wildcards}].tsv` (wall seconds, peak RSS of the
job's process tree). The report shows the table; `python -m crossdiff.stage_times DIR` prints it as
markdown, for notes and issue threads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import polars as pl


def read(folder: str | Path) -> pl.DataFrame | None:
    """One row per job, in the order the jobs finished; None if the folder holds no benchmark."""
    files = sorted(Path(folder).glob("*.tsv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return None
    rows = []
    for f in files:
        t = pl.read_csv(f, separator="\t")
        if t.height == 0 or "s" not in t.columns:
            raise ValueError(f"{f}: not a Snakemake benchmark file (no 's' column)")
        last = t.row(-1, named=True)  # `benchmark: repeat(...)` writes one row per repeat; the last is the run
        rss = last.get("max_rss")
        end = f.stat().st_mtime                   # Snakemake writes the file as the job ends
        rows.append({"job": f.stem, "seconds": float(last["s"]), "start": end - float(last["s"]), "end": end,
                     "peak_rss_gib": float(rss) / 1024 if rss not in (None, "-", "NA") else None})
    return pl.DataFrame(rows, schema={"job": pl.String, "seconds": pl.Float64, "start": pl.Float64, "end": pl.Float64,
                                      "peak_rss_gib": pl.Float64})


def totals(table: pl.DataFrame) -> dict:
    """Job time summed over jobs, the run's wall time (first start to last end: less than the sum where jobs
    ran side by side, as two trainings do; more where the run paused between jobs) and the largest peak RSS."""
    return {"seconds": float(table["seconds"].sum()),
            "wall_seconds": float(table["end"].max() - table["start"].min()),
            "peak_rss_gib": table["peak_rss_gib"].max()}


def markdown(table: pl.DataFrame) -> str:
    lines = ["| job | wall | peak RSS (GiB) |", "|---|---|---|"]
    for r in table.iter_rows(named=True):
        rss = "–" if r["peak_rss_gib"] is None else f"{r['peak_rss_gib']:.2f}"
        lines.append(f"| {r['job']} | {_clock(r['seconds'])} | {rss} |")
    t = totals(table)
    lines.append(f"| **sum over jobs** | **{_clock(t['seconds'])}** | **{t['peak_rss_gib'] or 0:.2f}** (max) |")
    lines.append(f"| **wall (first start to last end)** | **{_clock(t['wall_seconds'])}** | |")
    return "\n".join(lines)


def _clock(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}:{s:02d}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="results/benchmarks/{pair}")
    args = p.parse_args(argv)
    table = read(args.folder)
    if table is None:
        raise SystemExit(f"{args.folder}: no benchmark files (run the pipeline with Snakemake first)")
    print(markdown(table))


if __name__ == "__main__":
    main()
