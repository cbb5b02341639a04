"""Do the `crosscoders:` defaults generalise? Ground-truth validation on synthetic sets they were never tuned on.

Issue 17: a new model pair is always data the defaults have never seen. This generates synthetic base/chat
sets with the repo's generator (crossdiff.synthetic), varying d, the number of planted features (×d), the
activation rate and the noise, and runs the normal validation (train, analyse, score against the planted
features) with the params file's `crosscoders:` entries exactly as they are: `validate.train` is emptied
and each entry keeps its own epochs / min_steps (auto-calibration the entries switch on stays on). One row
per set and variant: chat-only recall (decoder cosine >= match_cos), bait share after the ν filter, val
FVE, L0, dead share, steps and wall time, and whether the issue's bars hold (BatchTopK recall >= 0.9, bait
<= 0.1; L1 FVE >= 0.8).

    python bench/validate_defaults.py --params params.yaml --out results/bench/validate_defaults.json
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import yaml

from crossdiff.io import write_json
from crossdiff.synthetic import KINDS, run_validation

# (name, d_model, features per d, feature_rate, noise): d 64-256, 4-16x d features, rate, noise
SETS = [
    ("d64-x6-r01-n01", 64, 6, 0.01, 0.01),       # the new-user set: ~6 active per token
    ("d64-x16-r005-n05", 64, 16, 0.005, 0.05),
    ("d128-x4-r02-n01", 128, 4, 0.02, 0.01),
    ("d128-x12-r005-n02", 128, 12, 0.005, 0.02),
    ("d128-x16-r005-n05", 128, 16, 0.005, 0.05),   # d64-x16 at twice d: a dictionary as large as the planted set
    ("d128-x16-r0025-n05", 128, 16, 0.0025, 0.05), # and at d64-x16's true L0 (5.1): is it k against d, or against L0?
    ("d256-x4-r01-n05", 256, 4, 0.01, 0.05),
    ("d256-x16-r0025-n01", 256, 16, 0.0025, 0.01),
]
SHARES = {"shared": 8, "chat_only": 1, "base_only": 1, "shrinkage": 1, "decoupled": 1}   # parts of 12
BARS = {"recall": 0.9, "bait_share": 0.1, "l1_fve": 0.8}
PI = 0.05  # the ν filter: a chat-only latent is kept when ν^ε < π and ν^r < π. Shrinkage bait keeps ρ = 0.1 of its
           # activation in base (ν^ε ≈ κρ, κ ≈ 1 here) and a true chat-only latent has ν ≈ 0: the filter must sit
           # between them, so half of ρ; the share at Fig. 8's 0.1 and 0.5 is reported too


def spec_params(d: int, per_d: int, rate: float, noise: float, n_tokens: int, seed: int) -> dict:
    """A `validate:` slice with F = per_d·d features split 8:1:1:1:1 over the kinds, and no training overrides."""
    total = per_d * d
    n = {k: total * s // sum(SHARES.values()) for k, s in SHARES.items()}
    return {"seed": seed, "d_model": d, "n_tokens": n_tokens, "n_features": n, "feature_rate": rate,
            "shrinkage_ratio": 0.1, "decoupled_share": 0.5, "noise": noise, "match_cos": 0.9, "train": {}}


def _robust(m: dict, pi: float) -> dict:
    return next(r for r in m["robust_by_threshold"] if abs(r["pi"] - pi) < 1e-9)


def _bait_share(m: dict, pi: float) -> float:
    r = _robust(m, pi)
    return r["bait"] / r["n"] if r["n"] else 0.0


def row(name: str, variant: str, m: dict, seconds: float, spec: dict) -> dict:
    """One table row from a variant's validation metrics."""
    tr, cset = m["training"], m["chat_only_set"]
    robust = _robust(m, PI)
    val = tr["val"] or {}
    bait_share = robust["bait"] / robust["n"] if robust["n"] else 0.0
    out = {"set": name, "variant": variant, "d": spec["d_model"], "features": sum(spec["n_features"].values()),
           "true_l0": round(sum(spec["n_features"].values()) * spec["feature_rate"], 2),
           "rate": spec["feature_rate"], "noise": spec["noise"],
           "recall": cset["recall"], "recall_after_nu": robust["recall"], "chat_only_set": cset["n"],
           "bait_share_after_nu": bait_share, "fve": val.get("fve"), "l0": val.get("l0"),
           "bait_share_at_0.1": _bait_share(m, 0.1), "bait_share_at_0.5": _bait_share(m, 0.5),
           "dead": 1 - m["n_alive"] / m["n_latents"], "opposed": tr.get("opposed_decoders"), "steps": tr["steps"],
           "k": tr.get("k"), "k_requested": tr.get("k_requested"), "mu": tr.get("mu"), "target_fve": tr.get("target_fve"),
           "health": tr["health"], "health_reasons": tr.get("health_reasons"), "seconds": round(seconds, 1)}
    if tr["kind"] == "batchtopk":
        out["pass"] = cset["recall"] >= BARS["recall"] and bait_share <= BARS["bait_share"]
    else:
        out["pass"] = (val.get("fve") or 0.0) >= BARS["l1_fve"]
    return out


COLUMNS = ("set", "true_l0", "variant", "k", "recall", "bait_share_after_nu", "bait_share_at_0.1", "fve", "l0", "dead",
           "opposed", "health", "steps", "seconds", "pass")


def markdown(rows: list[dict]) -> str:
    """The table over the generated sets, as in the README."""
    def cell(v):
        if v is None:
            return "–"
        if isinstance(v, float) and abs(v) >= 100:
            return f"{v:.0f}"
        return f"{v:.3g}" if isinstance(v, float) else ("**yes**" if v is True else "no" if v is False else str(v))
    names = {"true_l0": "true L0", "recall": "chat-only recall", "bait_share_after_nu": f"bait, ν < {PI}",
             "bait_share_at_0.1": "bait, ν < 0.1", "fve": "val FVE", "l0": "val L0", "seconds": "s", "pass": "bars met"}
    lines = ["| " + " | ".join(names.get(c, c) for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--out", help="the JSON to write (required unless --markdown)")
    p.add_argument("--sets", nargs="*", default=None, help=f"subset of {[s[0] for s in SETS]}")
    p.add_argument("--n-tokens", type=int, default=200_000)
    p.add_argument("--device", default="cpu")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="VARIANT.KEY=VALUE",
                   help="change one crosscoders entry key for this run (to try a candidate default)")
    p.add_argument("--variants", nargs="*", default=None)
    p.add_argument("--markdown", metavar="JSON", help="only print the table of an earlier run's JSON")
    args = p.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)["rows"]))
        return
    if not args.out:
        p.error("--out is required (unless --markdown)")
    with open(args.params) as f:
        params = yaml.safe_load(f)
    for o in args.overrides:
        key, value = o.split("=", 1)
        variant, name = key.split(".", 1)
        params["crosscoders"][variant][name] = yaml.safe_load(value)
    analysis = {**params["analysis"], "nu_thresholds": sorted({PI, *params["analysis"]["nu_thresholds"]})}
    rows = []
    for name, d, per_d, rate, noise in SETS:
        if args.sets and name not in args.sets:
            continue
        spec = spec_params(d, per_d, rate, noise, args.n_tokens, params.get("seed", 0))
        for variant, entry in params["crosscoders"].items():
            if args.variants and variant not in args.variants:
                continue
            sliced = {"validate": {**spec, "epochs": entry["epochs"]}, "analysis": analysis,
                      "crosscoders": {variant: copy.deepcopy(entry)}}
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="crossdiff-defaults-") as work:
                metrics = run_validation(sliced, f"{work}/out", work, args.device, progress=False)
            rows.append(row(name, variant, metrics["variants"][variant], time.perf_counter() - t0, spec))
            print({k: v for k, v in rows[-1].items() if k not in ("rate", "noise")}, flush=True)
            write_json(args.out, {"bars": BARS, "pi": PI, "kinds": KINDS, "overrides": args.overrides, "rows": rows})
    print(markdown(rows))


if __name__ == "__main__":
    main()
