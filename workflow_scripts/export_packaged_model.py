"""Rebuild a model that ships inside a package (e.g. Gemma 3 270M), verify its sha256 and save it as a plain
HF folder (dequantised weights, tokenizer with its chat template) into --out."""

from crossdiff import cli
from crossdiff.config import Runtime
from crossdiff.packaged import export_hf


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--name", required=True, help="packaged model name (crossdiff.packaged.MODELS), e.g. gemma-3-270m")
    p.add_argument("--out", required=True, help="results/models/packaged/{name}")
    args, params = cli.parse(p, argv)
    export_hf(args.name, args.out, dtype=Runtime.from_params(params).dtype)


if __name__ == "__main__":
    main()
