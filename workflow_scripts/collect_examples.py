"""Collect each selected latent's activating windows (by tercile) and its similar/random negatives."""

from crossdiff import cli, io
from crossdiff.autointerp.examples import collect_examples


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--crosscoder", required=True, help="crosscoder dir (model.safetensors + config.json)")
    p.add_argument("--latents", required=True, help="latents.parquet of that crosscoder")
    p.add_argument("--val", required=True, help="validation activation cache (HDF5)")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir or HF id (the chat model's)")
    p.add_argument("--out", required=True, help="examples.parquet")
    args, params = cli.parse(p, argv)
    ai = params["autointerp"]
    examples = collect_examples(args.crosscoder, args.latents, args.val, args.tokenizer, ai,
                                device=cli.resolve_device("auto"))
    io.write_parquet(args.out, examples)


if __name__ == "__main__":
    main()
