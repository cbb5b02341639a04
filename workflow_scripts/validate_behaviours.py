"""Do robust chat-only latents pick out the embedded pair's planted chat behaviours? -> behaviours.json

For every behaviour label of the val corpus and every crosscoder variant: the best AUROC of one latent's
maximum activation over a conversation's tokens, separating that label's chat conversations from the other
chat conversations; over all latents, Δnorm chat-only latents, and robust (low-ν) chat-only latents.
"""

from pathlib import Path

import numpy as np
import polars as pl

from crossdiff import cli
from crossdiff.cache import ActivationCache
from crossdiff.crosscoder import CrossCoder
from crossdiff.io import write_json
from crossdiff.synthetic import behaviour_aurocs, conversation_max_acts


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--crosscoders", required=True, help="folder holding {variant}/model.safetensors")
    p.add_argument("--analysis", required=True, help="folder holding {variant}/latents.parquet")
    p.add_argument("--val", required=True, help="val activation cache (HDF5, public format)")
    p.add_argument("--corpus", required=True, help="val corpus parquet (seq, source, behaviour)")
    p.add_argument("--out", required=True, help="behaviours.json")
    p.add_argument("--device", default="auto")
    args, params = cli.parse(p, argv)
    device = cli.resolve_device(args.device)
    corpus = pl.read_parquet(args.corpus, columns=["seq", "source", "behaviour"]).filter(pl.col("source") == 1)
    if corpus.is_empty():
        raise SystemExit(f"{args.corpus} has no chat conversations (source == 1)")
    cache = ActivationCache(args.val)
    corpus = corpus.filter(pl.col("seq").is_in(_cached_seqs(cache).tolist()))  # the cache may hold a prefix only
    seqs = corpus["seq"].to_numpy().astype(np.int64)
    behaviour = np.asarray(corpus["behaviour"].to_list(), dtype=object)
    thresholds = params["analysis"]["nu_thresholds"]
    result = {"score": "max activation over all cached tokens of a conversation",
              "n_chat_conversations": len(seqs), "variants": {}}
    for variant in args.variants:
        cc = CrossCoder.load(Path(args.crosscoders) / variant, device=device).eval()
        table = pl.read_parquet(Path(args.analysis) / variant / "latents.parquet")
        acts = conversation_max_acts(cc, cache, seqs, batch_size=params["analysis"]["batch_size"])
        result["variants"][variant] = behaviour_aurocs(acts, behaviour, table, thresholds)
    write_json(args.out, result)


def _cached_seqs(cache) -> np.ndarray:
    """Sequence ids present in the cache."""
    return np.unique(np.concatenate([b["seq"].cpu().numpy() for b in cache.iter_sequential(1 << 16, fields=("seq",))]))


if __name__ == "__main__":
    main()
