"""Explain each latent with an LLM and detection-score the explanations (paper A.10).

With `autointerp.endpoint.base_url` empty, a local OpenAI-compatible server (`transformers serve`)
of `endpoint.model`, or else of --serve-model, runs for the duration of this script.
"""

import json
from pathlib import Path

import polars as pl

from crossdiff import cli, io
from crossdiff.autointerp.pipeline import explain_and_score, open_endpoint


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--examples", required=True, help="examples.parquet from collect_examples")
    p.add_argument("--serve-model", default=None, help="local model dir to serve when no endpoint is set")
    p.add_argument("--cache", required=True, help="LLM response cache dir (shared across runs; makes reruns resume)")
    p.add_argument("--out", required=True, help="dir for explanations.jsonl, scores.parquet, metrics.json")
    args, params = cli.parse(p, argv)
    ai, out = params["autointerp"], Path(args.out)
    dtype = params.get("models", {}).get("dtype", "auto")
    examples = pl.read_parquet(args.examples)
    with open_endpoint(ai, args.cache, serve_model=args.serve_model, dtype=dtype) as client:
        explanations, scores, metrics = explain_and_score(examples, client, ai)
    with io.atomic_path(out / "explanations.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in explanations))
    io.write_parquet(out / "scores.parquet", scores)
    io.write_json(out / "metrics.json", metrics)


if __name__ == "__main__":
    main()
