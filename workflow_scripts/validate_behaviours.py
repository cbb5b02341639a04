"""Do robust chat-only latents pick out the embedded pair's planted chat behaviours? -> behaviours.json

For every behaviour label of the val corpus and every crosscoder variant: the best AUROC of one latent's
maximum activation over a conversation's tokens, separating that label's chat conversations from the other
chat conversations; over all latents, Δnorm chat-only latents, and robust (low-ν) chat-only latents.
"""

from crossdiff import cli
from crossdiff.toy.behaviours import run_behaviours


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--crosscoders", required=True, help="folder holding {variant}/model.safetensors")
    p.add_argument("--analysis", required=True, help="folder holding {variant}/latents.parquet")
    p.add_argument("--val", required=True, help="val activation cache (HDF5, public format)")
    p.add_argument("--corpus", required=True, help="val corpus parquet (seq, source, behaviour)")
    p.add_argument("--out", required=True, help="behaviours.json")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    run_behaviours(params, args.variants, args.crosscoders, args.analysis, args.val, args.corpus, args.out,
                   device=cli.device_name(args, params))


if __name__ == "__main__":
    main()
