"""Per-latent statistics, Δnorm classes and Latent Scaling of one crosscoder -> latents.parquet, metrics.json, figures/."""

import time
from pathlib import Path

from crossdiff import cli, io
from crossdiff.cache import summary
from crossdiff.latents import analyse, normalisation_space, summarise
from crossdiff.report.figures import analysis_figures


def main(argv=None) -> None:
    p = cli.parser(__doc__)
    p.add_argument("--crosscoder", required=True, help="crosscoder dir (model.safetensors + config.json)")
    p.add_argument("--train", required=True, help="train activation cache (Latent Scaling over its first scaling_tokens rows)")
    p.add_argument("--val", required=True, help="validation activation cache (frequencies, template shares, max)")
    p.add_argument("--out", required=True, help="output dir: latents.parquet, metrics.json, figures/")
    p.add_argument("--device", default=None, help="overrides params `device` (auto | cpu | cuda[:N])")
    args, params = cli.parse(p, argv)
    ap = params["analysis"]
    out = Path(args.out)
    t0 = time.perf_counter()
    device = cli.resolve_device(cli.device_name(args, params))
    table = analyse(args.crosscoder, args.train, args.val, ap, device=device)
    metrics = {**summarise(table, ap), "space": normalisation_space(args.crosscoder),  # which space Δnorm, ν are in
               "cache": {"train": summary(args.train), "val": summary(args.val)},
               "seconds": round(time.perf_counter() - t0, 2)}
    io.write_parquet(out / "latents.parquet", table)
    analysis_figures(out / "figures", table, ap, name=Path(args.crosscoder).name)
    io.write_json(out / "metrics.json", metrics)


if __name__ == "__main__":
    main()
