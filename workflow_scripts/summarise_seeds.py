"""Every variant over its training seeds (crossdiff.seeds): headline numbers as mean and spread, each paper claim
as holding in n of N seeds -> --out/{metrics.json, runs.parquet}."""

from crossdiff import cli
from crossdiff.seeds import run_summary


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--runs", nargs="+", required=True, help="primary variants and their replicates (NAME-seedN)")
    p.add_argument("--crosscoders", required=True, help="folder holding {run}/metrics.json")
    p.add_argument("--analysis", required=True, help="folder holding {run}/metrics.json")
    p.add_argument("--causal", required=True, help="folder holding {run}/kl.parquet and {run}/metrics.json")
    p.add_argument("--out", required=True)
    args, params = cli.parse(p, argv)
    run_summary(args.runs, args.crosscoders, args.analysis, args.causal, params["seed"], args.out)


if __name__ == "__main__":
    main()
