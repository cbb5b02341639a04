"""Fine-tune a real base model into a chat model on the embedded chat corpus (LoRA, merged), and measure the
planted behaviours of both; writes base/, chat/, data/, metrics.json into --out like the toy pair."""

from crossdiff import cli
from crossdiff.toy.finetune import finetune_pair


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--base", required=True, help="the base model's HF folder")
    p.add_argument("--out", required=True, help="results/models/{pair}: gets base/, chat/, data/, metrics.json")
    args, params = cli.parse(p, argv)
    finetune_pair(args.base, args.out, params["finetune"])


if __name__ == "__main__":
    main()
