"""Compare crosscoder variants (paper §3, Fig. 8): top-N latents by Δnorm, robust counts, side-by-side metrics."""

from pathlib import Path

import polars as pl

from crossdiff import cli, io
from crossdiff.latents import compare
from crossdiff.report.figures import robust_curve


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--analysis", required=True, help="folder holding {variant}/latents.parquet")
    p.add_argument("--out", required=True, help="output dir: metrics.json, figures/")
    args, params = cli.parse(p, argv)
    tables = {v: pl.read_parquet(Path(args.analysis) / v / "latents.parquet") for v in args.variants}
    metrics, curves = compare(tables, params["analysis"])
    out = Path(args.out)
    robust_curve(out / "figures" / "robust_counts.png", curves)
    io.write_json(out / "metrics.json", metrics)


if __name__ == "__main__":
    main()
