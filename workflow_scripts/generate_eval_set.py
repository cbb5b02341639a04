"""Evaluation conversations for the causal KL stage (paper A.8): held-out prompts answered greedily by the chat
model itself, plus held-out chat conversations with their own responses -> eval_set.parquet (generated once)."""

from crossdiff import cli
from crossdiff.eval_set import run_eval_set


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--chat", required=True, help="chat model (HF id or local dir)")
    p.add_argument("--toy-data", help="the built pair's data dir (chat.parquet); used when models.chat is toy or finetune")
    p.add_argument("--corpus", help="validation corpus parquet; prompts and conversations for real pairs")
    p.add_argument("--out", required=True, help="eval_set.parquet")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    run_eval_set(params, args.chat, args.out, toy_data=args.toy_data, corpus=args.corpus, device=args.device)


if __name__ == "__main__":
    main()
