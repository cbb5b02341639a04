"""Build the token corpora (web + chat, template mask) the activations are cached on: --out/{train,val}.parquet."""

from pathlib import Path

from transformers import AutoTokenizer

from crossdiff import cli, io
from crossdiff.data import CorpusConfig, build_corpus
from crossdiff.models import check_tokenizers


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--base", required=True, help="base model: HF id or local dir")
    p.add_argument("--chat", required=True, help="chat model: HF id or local dir (its chat template renders the chats)")
    p.add_argument("--toy-data", help="the embedded pair's data dir (web.parquet, chat.parquet), for corpus sources = toy")
    p.add_argument("--out", required=True, help="results/corpus/{pair}")
    args, params = cli.parse(p, argv)
    tokenizer = AutoTokenizer.from_pretrained(args.chat)
    check_tokenizers(AutoTokenizer.from_pretrained(args.base), tokenizer)
    corpora = build_corpus(tokenizer, CorpusConfig.from_dict(params["corpus"]), args.toy_data, seed=params["seed"])
    for split, df in corpora.items():
        io.write_parquet(Path(args.out) / f"{split}.parquet", df)


if __name__ == "__main__":
    main()
