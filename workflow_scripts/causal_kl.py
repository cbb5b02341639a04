"""Causal KL of one crosscoder (paper A.8, Fig. 5): patch latent sets onto base activations, run the chat model on,
KL(p_chat ‖ p_patched) over responses -> kl.parquet, metrics.json, figures/."""

import logging
import time
from pathlib import Path

import polars as pl

from crossdiff import causal, cli, io
from crossdiff.config import Runtime
from crossdiff.crosscoder import CrossCoder
from crossdiff.models import load_pair


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--base", required=True, help="base model (HF id or local dir)")
    p.add_argument("--chat", required=True, help="chat model (HF id or local dir)")
    p.add_argument("--eval-set", required=True, help="eval_set.parquet from generate_eval_set")
    p.add_argument("--crosscoder", required=True, help="crosscoder dir (model.safetensors + config.json)")
    p.add_argument("--latents", required=True, help="latents.parquet of this crosscoder")
    p.add_argument("--variant", required=True, help="crosscoder variant name (a params.yaml crosscoders: key)")
    p.add_argument("--out", required=True, help="output dir: kl.parquet, metrics.json, figures/")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    cp, layer, rt = params["causal"], params["layer"], Runtime.from_params(params, args.device)
    device = cli.resolve_device(rt.device)
    t0 = time.perf_counter()
    pair = load_pair(args.base, args.chat, layer=layer, dtype=rt.dtype, device=device)
    cc = CrossCoder.load(args.crosscoder, device=device)
    eval_set = pl.read_parquet(args.eval_set)
    sets = causal.latent_sets(pl.read_parquet(args.latents), top_n=cp.get("top_n"))
    tok = pair.tokenizer
    tokens = causal.evaluate(pair.base, pair.chat, cc, eval_set, layer, sets, first=cp["first_tokens"],
                             batch_size=cp["batch_size"], bos_id=tok.bos_token_id, pad_id=tok.pad_token_id or 0)
    sources = dict(zip(eval_set["seq"].to_list(), eval_set["source"].to_list()))
    table, metrics = causal.summarise(tokens, sources, sets, args.variant, n_boot=cp["bootstrap"], seed=cp["seed"],
                                      n_latents_all=cc.cfg.dict_size)
    logging.getLogger("causal_kl").info("mean KL(p_chat ‖ p_patched), all conversations:\n%s",
                                        table.filter(pl.col("source") == "all").drop("variant", "source"))
    out = Path(args.out)
    io.write_parquet(out / "kl.parquet", table)
    for source in table["source"].unique(maintain_order=True):
        causal.kl_figure(out / "figures" / f"kl_{source}.png", table, source, title=f"{args.variant}: causal KL ({source})",
                          first_tokens=cp["first_tokens"])
    io.write_json(out / "metrics.json", {**metrics, "first_tokens": cp["first_tokens"],
                                         "seconds": round(time.perf_counter() - t0, 2)})


if __name__ == "__main__":
    main()
