"""Evaluation conversations for the causal KL stage (paper A.8): held-out prompts answered greedily by the chat
model itself, plus held-out chat conversations with their own responses -> eval_set.parquet (generated once)."""

from pathlib import Path

import polars as pl

from crossdiff import causal, cli, io
from crossdiff.config import Runtime
from crossdiff.models import DTYPES


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--chat", required=True, help="chat model (HF id or local dir)")
    p.add_argument("--toy-data", help="the built pair's data dir (chat.parquet); used when models.chat is toy or finetune")
    p.add_argument("--corpus", help="validation corpus parquet; prompts and conversations for real pairs")
    p.add_argument("--out", required=True, help="eval_set.parquet")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    cp, toy, rt = params["causal"], params["models"]["chat"] in ("toy", "finetune"), Runtime.from_params(params, args.device)
    cli.seed_everything(cp["seed"])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.chat)
    model = AutoModelForCausalLM.from_pretrained(args.chat, dtype=DTYPES[rt.dtype])
    model = model.to(cli.resolve_device(rt.device)).eval()
    if toy:
        if not args.toy_data:
            raise SystemExit("a built pair (models.chat: toy | finetune) needs --toy-data")
        chat = pl.read_parquet(Path(args.toy_data) / "chat.parquet")
        prompts, heldout = causal.toy_sources(chat, cp["eval_prompts"], cp["heldout_convs"], cp["seed"])
    else:
        if not args.corpus:
            raise SystemExit("a real pair needs --corpus (the validation corpus parquet)")
        prompts, heldout = causal.corpus_sources(pl.read_parquet(args.corpus), tokenizer, cp["eval_prompts"],
                                                 cp["heldout_convs"], cp["seed"])
    df = causal.build_eval_set(model, tokenizer, prompts, heldout, cp["max_new_tokens"], cp["batch_size"])
    io.write_parquet(args.out, df)


if __name__ == "__main__":
    main()
