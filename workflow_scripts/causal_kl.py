"""Causal KL of one crosscoder (paper A.8, Fig. 5): patch latent sets onto base activations, run the chat model on,
KL(p_chat ‖ p_patched) over responses -> kl.parquet, metrics.json, figures/."""

from crossdiff import cli
from crossdiff.causal import run_causal_kl


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
    run_causal_kl(params, args.base, args.chat, args.eval_set, args.crosscoder, args.latents, args.variant, args.out,
                  device=args.device)


if __name__ == "__main__":
    main()
