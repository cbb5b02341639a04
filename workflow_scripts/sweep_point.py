"""Train one point of the sparsity × expansion sweep (params `sweep:`) on the activation cache and score it;
writes --out/{model.safetensors, config.json, metrics.json (the trainer's, plus a `sweep` block), dvclive/}."""

from crossdiff import cli
from crossdiff.health import HealthError
from crossdiff.sweep import run_point


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--sparsity", type=int, required=True, help="BatchTopK k, or L1 target_l0 (mu: auto)")
    p.add_argument("--expansion", type=int, required=True, help="dictionary size / d_model")
    p.add_argument("--train", required=True, help="train activation cache (.h5)")
    p.add_argument("--val", required=True, help="validation activation cache (.h5)")
    p.add_argument("--out", required=True, help="output dir of this point")
    args, params = cli.parse(p, argv)
    sweep = params["sweep"]
    entries = params.get("crosscoders", {})
    if sweep["variant"] not in entries:
        raise SystemExit(f"sweep.variant {sweep['variant']!r} not in params crosscoders: {sorted(entries)}")
    try:
        run_point(args.train, args.val, args.out, entries[sweep["variant"]], args.sparsity, args.expansion,
                  params["analysis"], seed=params.get("seed", 0), device=params.get("device", "auto"),
                  max_steps=sweep.get("max_steps"))
    except HealthError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
