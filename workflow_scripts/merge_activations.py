"""Merge the shard files of one split (in shard order) into the final activation cache."""

from crossdiff import cli
from crossdiff.cache import merge


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="results/activations/{pair}/L{layer}/{split}.h5")
    p.add_argument("shards", nargs="+", help="shard files, any order (each records its index)")
    args, params = cli.parse(p, argv)
    acts = params.get("activations", {})
    merge(args.shards, args.out, outlier_factor=acts.get("outlier_factor", 10.0),
          drop_outliers=acts.get("drop_outliers", False))


if __name__ == "__main__":
    main()
