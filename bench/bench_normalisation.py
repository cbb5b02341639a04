"""Normalisation modes and the authors' init/aux on one cache (issue 18): what changes in the classes and ν.

Trains each crosscoder of the params file under normalisation per_model | shared | none (crossdiff.train.train,
as the pipeline does), analyses it (crossdiff.latents.analyse + summarise, as analyse_latents does) and writes
one row per run: class counts (alive latents), median ν^ε / ν^r of the shared and chat-only latents, their
raw-space medians (ν · nu_to_raw), r, val FVE per model and in total, L0, dead share. Then BatchTopK with
`init: authors` + `aux_loss: authors` (k_aux unset, so d/2) next to ours. Runs are ordered by priority and
stop once `--budget-cpu-s` of process CPU time is spent (the rest are listed as skipped).

    python bench/bench_normalisation.py --params params.yaml --train results/activations/toy/L2/train.h5 \
        --val results/activations/toy/L2/val.h5 --out /tmp/norm/bench.json --steps 800
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import yaml

from crossdiff.io import write_json
from crossdiff.latents import analyse, normalisation_space, summarise
from crossdiff.train import train

RUNS = [  # (name, variant, overrides): priority order
    ("l1/per_model", "l1", {"normalisation": "per_model"}),
    ("batchtopk/per_model", "batchtopk", {"normalisation": "per_model"}),
    ("batchtopk/per_model/authors", "batchtopk", {"normalisation": "per_model", "init": "authors",
                                                  "aux_loss": "authors", "k_aux": None}),
    ("l1/shared", "l1", {"normalisation": "shared"}),
    ("batchtopk/shared", "batchtopk", {"normalisation": "shared"}),
    ("l1/none", "l1", {"normalisation": "none"}),
    ("batchtopk/none", "batchtopk", {"normalisation": "none"}),
]


def run_one(name, entry, args, analysis_params, out: Path) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    m = train(args.train, args.val, out / name, entry, progress=False)
    table = analyse(out / name, args.train, args.val, analysis_params, progress=False)
    s = summarise(table, analysis_params)
    space = normalisation_space(out / name)
    alive = table.filter(~pl.col("dead"))

    def med(klass, col, factor=1.0):
        v = alive.filter(pl.col("klass") == klass)[col].drop_nulls().to_numpy()
        return float(np.median(v) * factor) if len(v) else None

    val = m["val"] or {}
    return {"run": name, "normalisation": space["normalisation"], "init": m["init"], "aux_loss": m["aux_loss"],
            "init_norm": m["init_norm"], "k_aux": m["k_aux"], "steps": m["steps"], "r": space["norm_ratio"],
            "classes": s["classes"], "dead_latents": s["n_dead"],
            "median_nu": {k: {c: med(k, c) for c in ("nu_eps", "nu_r")} for k in ("shared", "chat_only")},
            "median_nu_raw": {k: {c: med(k, c, space["nu_to_raw"]) for c in ("nu_eps", "nu_r")}
                              for k in ("shared", "chat_only")},
            "fve": val.get("fve"), "fve_base": val.get("fve_base"), "fve_chat": val.get("fve_chat"),
            "l0": val.get("l0"), "dead": val.get("dead"), "health": m.get("health"),
            "seconds": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}


def table_md(rows: list[dict]) -> str:
    f = lambda v, p=3: "–" if v is None else (f"{v:.{p}f}" if isinstance(v, float) else str(v))
    lines = ["| run | r | base-only | shared | chat-only | other | ν^ε sh | ν^r sh | ν^ε co | ν^r co | "
             "ν^r co raw | FVE | FVE base | FVE chat | L0 | dead |", "|" + "---|" * 16]
    for r in rows:
        c, n, nr = r["classes"], r["median_nu"], r["median_nu_raw"]
        lines.append("| " + " | ".join([r["run"], f(r["r"]), *(str(c[k]) for k in ("base_only", "shared", "chat_only", "other")),
                                        f(n["shared"]["nu_eps"]), f(n["shared"]["nu_r"]), f(n["chat_only"]["nu_eps"]),
                                        f(n["chat_only"]["nu_r"]), f(nr["chat_only"]["nu_r"]), f(r["fve"]),
                                        f(r["fve_base"]), f(r["fve_chat"]), f(r["l0"], 1), f(r["dead"])]) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--params", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--val", required=True)
    p.add_argument("--out", required=True, help="JSON of all rows (+ .md table beside it); crosscoders under its folder")
    p.add_argument("--steps", type=int, default=None, help="max_steps for every run (default: the params' length)")
    p.add_argument("--budget-cpu-s", type=float, default=900.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="run names to run (default all)")
    p.add_argument("--seed", type=int, default=None, help="training seed (a repeat for the seed-to-seed spread)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    params = yaml.safe_load(Path(args.params).read_text())
    out = Path(args.out)
    work = out.parent / "crosscoders"
    rows, skipped = [], []
    for name, variant, over in RUNS:
        if args.only and name not in args.only:
            continue
        if time.process_time() > args.budget_cpu_s:
            skipped.append(name)
            continue
        entry = copy.deepcopy(params["crosscoders"][variant])
        for k, v in over.items():
            entry.pop(k, None) if v is None else entry.__setitem__(k, v)
        if args.steps:
            entry["max_steps"] = args.steps
        if args.seed is not None:
            entry["seed"], name = args.seed, f"{name}/seed{args.seed}"
        row = run_one(name, entry, args, params["analysis"], work)
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json(out, {"rows": rows, "skipped": skipped, "steps": args.steps})
    write_json(out, {"rows": rows, "skipped": skipped, "steps": args.steps, "cpu_s": time.process_time()})
    note = "\n\nskipped (CPU budget): " + ", ".join(skipped) if skipped else ""
    out.with_suffix(".md").write_text(table_md(rows) + note + "\n")
    print(table_md(rows))


if __name__ == "__main__":
    main()
