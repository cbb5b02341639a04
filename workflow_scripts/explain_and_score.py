"""Explain each latent with an LLM and detection-score the explanations (paper A.10).

With `autointerp.endpoint.base_url` empty, a local OpenAI-compatible server (`transformers serve`)
of `endpoint.model` (a local dir), or else of --serve-model (the exported `package:NAME`, or the chat
model), runs for the duration of this script. With
--behaviours (the embedded pair's planted behaviours, from validate_behaviours), metrics.json also
says how often an explanation names the behaviour its latent detects (`ground_truth`).
"""

import json
import logging
import time
from pathlib import Path

import polars as pl

from crossdiff import cli, io
from crossdiff.autointerp import ground_truth
from crossdiff.autointerp.pipeline import explain_and_score, open_endpoint
from crossdiff.config import Runtime
from crossdiff.toy.corpus import DESCRIPTIONS  # the embedded pair's planted behaviours, one line each

log = logging.getLogger("explain_and_score")


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--examples", required=True, help="examples.parquet from collect_examples")
    p.add_argument("--serve-model", default=None,
                   help="local model dir to serve when no endpoint is set (the exported package:NAME, or the chat model)")
    p.add_argument("--cache", required=True, help="LLM response cache dir (shared across runs; makes reruns resume)")
    p.add_argument("--out", required=True, help="dir for explanations.jsonl, scores.parquet, metrics.json")
    p.add_argument("--behaviours", default=None, help="behaviours.json of the pair (planted behaviours), optional")
    p.add_argument("--variant", default=None, help="this crosscoder variant's name in behaviours.json")
    args, params = cli.parse(p, argv)
    ai, out = params["autointerp"], Path(args.out)
    rt = Runtime.from_params(params)  # the served model's device and dtype, as every model-loading stage
    examples = pl.read_parquet(args.examples)
    t0 = time.perf_counter()
    with open_endpoint(ai, args.cache, serve_model=args.serve_model, dtype=rt.dtype,
                       device=rt.device) as client:
        explanations, scores, metrics = explain_and_score(examples, client, ai)
    metrics["stage_wall_s"] = time.perf_counter() - t0  # with the local server's start-up
    if args.behaviours:
        metrics["ground_truth"] = score_against_behaviours(explanations, args.behaviours, args.variant,
                                                           ai["behaviour_auroc"])
    with io.atomic_path(out / "explanations.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in explanations))
    io.write_parquet(out / "scores.parquet", scores)
    io.write_json(out / "metrics.json", metrics)


def score_against_behaviours(explanations: list[dict], path: str, variant: str | None, min_auroc: float) -> dict:
    """Explanation -> planted behaviour top-1 accuracy (ground_truth.py) for this variant."""
    variants = io.read_json(path).get("variants", {})
    if variant not in variants:
        raise SystemExit(f"--variant {variant!r} is not in {path} (has {sorted(variants)})")
    truth = ground_truth.behaviour_latents(variants[variant], min_auroc)
    result = ground_truth.explanation_accuracy(explanations, truth, DESCRIPTIONS)
    log.info("explanations naming their latent's planted behaviour: %d/%d (chance %.3f)",
             result["n_correct"], result["n"], result["chance"])
    return result


if __name__ == "__main__":
    main()
