"""Collect each selected latent's activating windows (by tercile) and its similar/random negatives.

With --behaviours (the embedded pair's planted behaviours, from validate_behaviours), the latents that
best detect a behaviour (AUROC >= autointerp.behaviour_auroc; at most autointerp.max_behaviour_latents,
spread over behaviours) are collected too, so that their explanations can be checked against that behaviour.
"""

import numpy as np

from crossdiff import cli, io
from crossdiff.autointerp.examples import collect_examples
from crossdiff.autointerp.ground_truth import behaviour_latents, pick_behaviour_latents


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--crosscoder", required=True, help="crosscoder dir (model.safetensors + config.json)")
    p.add_argument("--latents", required=True, help="latents.parquet of that crosscoder")
    p.add_argument("--val", required=True, help="validation activation cache (HDF5)")
    p.add_argument("--tokenizer", required=True, help="tokenizer dir or HF id (the chat model's)")
    p.add_argument("--out", required=True, help="examples.parquet")
    p.add_argument("--behaviours", default=None, help="behaviours.json of the pair (planted behaviours), optional")
    p.add_argument("--variant", default=None, help="this crosscoder variant's name in behaviours.json")
    p.add_argument("--window-embeddings", default=None, help="window_embeddings.npy of this val cache (embed_windows); "
                   "default: embed the windows here")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    ai = params["autointerp"]
    extra = []
    if args.behaviours:
        variants = io.read_json(args.behaviours).get("variants", {})
        if args.variant not in variants:
            raise SystemExit(f"--variant {args.variant!r} is not in {args.behaviours} (has {sorted(variants)})")
        truth = behaviour_latents(variants[args.variant], ai["behaviour_auroc"])
        extra = pick_behaviour_latents(truth, ai["max_behaviour_latents"])
    examples = collect_examples(args.crosscoder, args.latents, args.val, args.tokenizer, ai,
                                device=cli.resolve_device(cli.device_name(args, params)), behaviour_latents=extra,
                                window_emb=np.load(args.window_embeddings) if args.window_embeddings else None)
    io.write_parquet(args.out, examples)


if __name__ == "__main__":
    main()
