"""Gather the sweep points into --out/{table.parquet, front.tsv, metrics.json, figures/front.png}: the FVE–L0
Pareto front and the dead fraction, with the params' own point marked."""

from crossdiff import cli
from crossdiff.sweep import aggregate


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--points", nargs="+", required=True, help="the points' metrics.json files")
    p.add_argument("--out", required=True, help="sweep folder")
    args, params = cli.parse(p, argv)
    variant = params["sweep"]["variant"]
    aggregate(args.points, args.out, params["crosscoders"][variant], variant)


if __name__ == "__main__":
    main()
