"""Train one crosscoder (an entry of params.yaml `crosscoders:`) on an activation cache; writes --out/
{model.safetensors, config.json, metrics.json, dvclive/}. Resumes from --checkpoints when a run was killed.
A run that fails its health checks (crossdiff.health) exits non-zero with the reasons when `health.strict`.
A seed replicate (`--variant l1-seed1`, crossdiff.seeds) trains entry `l1` with seed 1."""

from crossdiff import cli, seeds
from crossdiff.health import HealthError
from crossdiff.train import train


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--variant", required=True, help="name of the entry in params `crosscoders:` (or NAME-seedN)")
    p.add_argument("--train", required=True, help="train activation cache (.h5, public format)")
    p.add_argument("--val", help="validation activation cache (.h5)")
    p.add_argument("--out", required=True, help="output dir of this crosscoder")
    p.add_argument("--checkpoints", help="dir for resumable checkpoints (removed after a complete run)")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    entries = params.get("crosscoders", {})
    variant, seed = seeds.parse(args.variant)
    if variant not in entries:
        raise SystemExit(f"variant {variant!r} not in params crosscoders: {sorted(entries)}")
    try:
        train(args.train, args.val, args.out, entries[variant], seed=params.get("seed", 0) if seed is None else seed,
              checkpoints=args.checkpoints, device=cli.device_name(args, params))
    except HealthError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
