"""Measure a built pair (toy or fine-tuned): held-out losses and the planted behaviours' success, base vs chat,
from greedy answers to held-out prompts -> evaluation.json and generations.parquet."""

from crossdiff import cli
from crossdiff.toy.pair_eval import evaluate_pair


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--models", required=True, help="results/models/{pair}: base/, chat/ and data/")
    p.add_argument("--out", required=True, help="folder for evaluation.json and generations.parquet")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    evaluate_pair(args.models, args.out, params, device=args.device)


if __name__ == "__main__":
    main()
