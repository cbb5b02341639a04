"""Build the embedded default base/chat pair (corpora, tokenizer, models, metrics) into --out."""

from crossdiff import cli
from crossdiff.toy import build_pair


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="results/models/{pair}: gets base/, chat/, data/, metrics.json")
    args, params = cli.parse(p, argv)
    build_pair(args.out, params["toy"])


if __name__ == "__main__":
    main()
