"""Ground-truth check of the diffing method on synthetic activations with planted features -> metrics.json, figures/

Trains every `crosscoders:` variant on a generated base/chat pair (shared, chat-only, base-only features and
the paper's Complete Shrinkage / Latent Decoupling bait), runs the normal analysis, and scores Δnorm and
Latent Scaling against the known answers. See crossdiff.synthetic.
"""

import tempfile

from crossdiff import cli
from crossdiff.synthetic import run_validation


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="folder for metrics.json and figures/")
    p.add_argument("--work", default=None, help="keep caches, crosscoders and latent tables here (default: a temp dir)")
    p.add_argument("--variants", nargs="*", default=None, help="subset of `crosscoders:` (default: all)")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    device = cli.device_name(args, params)
    if args.work:
        run_validation(params, args.out, args.work, device, args.variants)
        return
    with tempfile.TemporaryDirectory(prefix="crossdiff-validate-") as work:
        run_validation(params, args.out, work, device, args.variants)


if __name__ == "__main__":
    main()
