"""Render results/report/{pair}/: overview, latent table and per-latent pages from the run's outputs."""

from crossdiff import cli
from crossdiff.report.collect import collect
from crossdiff.report.html import render_report


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--pair", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--out", required=True, help="report folder (index.html, latents/)")
    p.add_argument("--root", default=".", help="folder holding results/")
    args, params = cli.parse(p, argv)
    run = collect(args.root, args.pair, args.layer, args.variants, params)
    report = params["report"]
    render_report(run, args.out, report["max_latents"], report["examples_per_latent"])


if __name__ == "__main__":
    main()
