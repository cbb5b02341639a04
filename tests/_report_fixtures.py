"""Synthetic outputs of a whole run in the documented formats (DESIGN §2–3), for the report tests.

Numbers are random but internally consistent (Δnorm from the norms by eq. 4, classes from the bands,
ν from the β's), so tests can recompute what the report shows by brute force.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from crossdiff.io import write_json, write_parquet

BANDS = {"base_only": [0.0, 0.1], "shared": [0.4, 0.6], "chat_only": [0.9, 1.0]}
PARAMS = {
    "pair": "toy", "layer": 1, "seed": 0,
    "crosscoders": {"l1": {"type": "l1", "mu": 0.041, "lr": 1e-4, "epochs": 1},
                    "batchtopk": {"type": "batchtopk", "k": 8, "lr": 1e-4, "epochs": 1}},
    "analysis": {"classes": BANDS},
    "causal": {"first_tokens": [2, 10]},
    "report": {"max_latents": 50, "examples_per_latent": 10},
}
WINDOW = ["<start_of_turn>", "user", "\n", "The", " E", "iffel", " Tower", " is", " in", " Texas",
          "<end_of_turn>", "\n", "<start_of_turn>", "model", "\n", "</script>"]
NASTY = "fires on <b>false</b> facts & corrections </script>"  # must come out escaped
WARNING = "90% of scorer answers were unparseable"


def klass_of(dn: float) -> str:
    """Δnorm classes (DESIGN §4): base-only [0, 0.1), shared [0.4, 0.6], chat-only (0.9, 1]."""
    if dn < 0.1:
        return "base_only"
    if 0.4 <= dn <= 0.6:
        return "shared"
    if dn > 0.9:
        return "chat_only"
    return "other"


def latents_frame(d: int, rng: np.random.Generator) -> pl.DataFrame:
    norm_chat = rng.uniform(0.2, 1.0, d)
    ratio = rng.choice([0.02, 1.0, 0.5, 5.0, 50.0], size=d, p=[0.2, 0.5, 0.15, 0.05, 0.1])  # base / chat
    norm_base = norm_chat * ratio * rng.uniform(0.9, 1.1, d)
    delta = 0.5 * ((norm_chat - norm_base) / np.maximum(norm_chat, norm_base) + 1)  # eq. 4
    klass = [klass_of(x) for x in delta]
    chat = np.flatnonzero(np.array(klass) == "chat_only")
    dead = np.zeros(d, bool)  # 2 dead chat-only latents (null ν must sort last) and 2 others
    dead[rng.choice(chat, min(2, len(chat)), replace=False)] = True
    dead[rng.choice(np.flatnonzero(~dead & (np.array(klass) != "chat_only")), 2, replace=False)] = True
    be_chat, br_chat = rng.uniform(0.5, 1.5, d), rng.uniform(0.5, 1.5, d)
    be_base, br_base = be_chat * rng.uniform(-0.1, 0.9, d), br_chat * rng.uniform(0.0, 1.0, d)
    nu_eps, nu_r = be_base / be_chat, br_base / br_chat
    df = pl.DataFrame({
        "latent": np.arange(d, dtype=np.int64), "norm_base": norm_base, "norm_chat": norm_chat, "delta_norm": delta,
        "klass": klass, "cos_sim": rng.uniform(-0.2, 1.0, d), "freq": np.where(dead, 0.0, rng.uniform(1e-4, 0.2, d)),
        "dead": dead, "f_template": rng.uniform(0, 1, d),
        "beta_err_base": be_base, "beta_err_chat": be_chat, "beta_rec_base": br_base, "beta_rec_chat": br_chat,
        "nu_eps": nu_eps, "nu_r": nu_r, "max_act": rng.uniform(1, 30, d),
    }).with_columns(  # dead latents: no Latent Scaling (null, not NaN)
        [pl.when(pl.col("dead")).then(None).otherwise(pl.col(c)).alias(c)
         for c in ("beta_err_base", "beta_err_chat", "beta_rec_base", "beta_rec_chat", "nu_eps", "nu_r", "f_template")])
    chat = pl.col("klass") == "chat_only"
    live_chat = chat & pl.col("nu_eps").is_not_null()
    r = lambda c: pl.when(live_chat).then(pl.col(c)).otherwise(None).rank("ordinal")
    return df.with_columns(rank_nu=(r("nu_eps") + r("nu_r")).cast(pl.Int64))


def examples_frame(latents: pl.DataFrame, chosen: list[int], rng: np.random.Generator) -> pl.DataFrame:
    """autointerp examples.parquet: per latent, 3 terciles (0 = strongest) x explain/score windows,
    plus MiniLM-similar and random non-activating windows."""
    rows = []
    for latent in chosen:
        row = latents.filter(pl.col("latent") == latent).row(0, named=True)
        for tercile in (0, 1, 2):
            for split in ("explain", "score"):
                for _ in range(3):
                    acts = np.zeros(len(WINDOW), np.float32)
                    peak = rng.integers(5, 12)
                    acts[peak] = row["max_act"] * (3 - tercile) / 3 * rng.uniform(0.7, 1.0)
                    acts[peak + 1] = acts[peak] * 0.4
                    rows.append((latent, row["klass"], tercile, split, acts))
        for split in ("negative_similar", "negative_random"):
            for _ in range(3):
                rows.append((latent, row["klass"], None, split, np.zeros(len(WINDOW), np.float32)))
    n = len(rows)
    return pl.DataFrame({
        "latent": [r[0] for r in rows], "klass": [r[1] for r in rows], "split": [r[3] for r in rows],
        "tercile": [r[2] for r in rows], "window": list(range(n)), "seq": list(range(n)), "pos": [0] * n,
        "max_act": [float(r[4].max()) for r in rows], "token_ids": [list(range(len(WINDOW)))] * n,
        "acts": [r[4].tolist() for r in rows], "tokens": [WINDOW] * n, "text": ["".join(WINDOW)] * n,
    }, schema_overrides={"tercile": pl.Int8, "max_act": pl.Float32, "token_ids": pl.List(pl.Int32),
                         "acts": pl.List(pl.Float32)})


def figure(path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    ax.plot([0, 1, 2], [0, 1, 0.5])
    ax.set_title(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# analysis metrics.json `cache` (cache.summary of the train and val caches); val predates the norm_ratio attr
CACHE = {"train": {"rows": 40960, "dtype": "float16", "sink_rows_excluded": 640, "outlier_rows": 3,
                   "outlier_factor": 10.0, "outlier_max_ratio": 14.2, "outliers_dropped": False,
                   "norm_base": 12.5, "norm_chat": 15.625, "norm_ratio": 1.25},
         "val": {"rows": 8192, "dtype": "float16", "sink_rows_excluded": 128, "outlier_rows": 0,
                 "outlier_factor": 10.0, "norm_base": 12.0, "norm_chat": 16.2}}
# analysis metrics.json `space` (latents.normalisation_space): per variant, which space Δnorm and ν are in
SPACE = {v: {"normalisation": mode, "scale": s, "norm_ratio": 1.25, "nu_to_raw": s[1] / s[0], "meaning": f"{mode} text"}
         for v, mode, s in (("l1", "per_model", [0.8, 0.64]), ("batchtopk", "shared", [0.7, 0.7]))}
KL_CONDITIONS = ["none", "all", "template", "delta_norm_best", "delta_norm_worst", "nu_best", "nu_worst"]


def build_run(root: Path, pair: str = "toy", layer: int = 1, variants=("l1", "batchtopk"), d: int = 96,
              skip: frozenset = frozenset(), seed: int = 0) -> dict:
    """Write every stage's outputs under root/results; `skip` names pieces to leave out
    (models, comparison, validate, or "{variant}:{training|latents|causal|autointerp}")."""
    rng = np.random.default_rng(seed)
    truth: dict = {"latents": {}, "training": {}, "chosen": {}}
    if "models" not in skip:
        write_json(root / f"results/models/{pair}/metrics.json", {"n_params": 123456, "time_s": {"total": 60.0}})
        write_json(root / f"results/models/{pair}/evaluation.json", {
            "loss": {"web_heldout": {"base": 3.1, "chat": 3.3}, "chat_heldout_responses": {"base": 4.2, "chat": 1.1}},
            "behaviours": {"refusal": {"n": 20, "base": 0.05, "chat": 0.95}, "false_fact": {"n": 20, "base": 0.0, "chat": 0.8,
                           "base_answer": 0.1, "chat_answer": 0.7, "n_answer": 20}},
            "time_s": {"total": 7.0}})
    for v in variants:
        cc = root / f"results/crosscoders/{pair}/L{layer}/{v}"
        an = root / f"results/analysis/{pair}/L{layer}/{v}"
        ca = root / f"results/causal/{pair}/L{layer}/{v}"
        ai = root / f"results/autointerp/{pair}/L{layer}/{v}"
        if f"{v}:training" not in skip:
            tr = {s: {"fve_base": float(rng.uniform(0.7, 0.9)), "fve_chat": float(rng.uniform(0.7, 0.9)),
                      "fve": float(rng.uniform(0.7, 0.9)), "l0": float(rng.uniform(5, 50)),
                      "dead": float(rng.uniform(0, 0.1))} for s in ("train", "val")}
            truth["training"][v] = tr
            write_json(cc / "metrics.json", {**tr, "steps": 100})
            kind = PARAMS["crosscoders"][v]["type"]  # the trainer records every knob, defaults of the other type too
            write_json(cc / "config.json", {"d_model": 16, "dict_size": d, "kind": kind,
                                            "extra": {"train": {"type": kind, "mu": 0.041, "k": 8}}})
        if f"{v}:latents" in skip:
            continue
        lat = latents_frame(d, rng)
        truth["latents"][v] = lat
        write_parquet(an / "latents.parquet", lat)
        write_json(an / "metrics.json", {"counts": {k: int((lat["klass"] == k).sum()) for k in BANDS},
                                         "nu_r_in_shared_95": 0.18, "nu_below": {"0.1": 3, "0.5": 7},
                                         "cache": CACHE, "space": SPACE[v]})
        figure(an / "figures" / "nu_scatter.png", f"{v}: nu scatter")
        figure(an / "figures" / "delta_norm_hist.png", f"{v}: delta norm")
        if f"{v}:causal" not in skip:
            rows = [{"variant": v, "source": src, "mask": m, "condition": c, "n_tokens": 500, "n_convs": 16,
                     "mean": float(mu), "ci_low": float(mu * 0.9), "ci_high": float(mu * 1.1), "n_latents": 7}
                    for src in ("all", "generated", "heldout") for m in ("full", "first")
                    for c, mu in zip(KL_CONDITIONS, rng.uniform(0.05, 1.0, 7))]
            write_parquet(ca / "kl.parquet", pl.DataFrame(rows))
            pool = {"used": "authors" if v == variants[0] else "legacy", "nu_range": [-0.1, 2.0], "top_n": None,
                    "sizes": {"candidates": 11 + len(v), "authors": {"delta_norm": 7, "nu": 6},
                              "legacy": {"delta_norm": 11 + len(v), "nu": 9}}}
            truth.setdefault("pool", {})[v] = pool
            write_json(ca / "metrics.json", {"best_lt_worst_delta_norm": True, "pool": pool})
            figure(ca / "figures" / "kl_bars.png", f"{v}: KL")
        if f"{v}:autointerp" not in skip:
            live_chat = lat.filter((pl.col("klass") == "chat_only") & ~pl.col("dead")).sort("rank_nu")["latent"].head(3)
            shared = lat.filter((pl.col("klass") == "shared") & ~pl.col("dead"))["latent"].head(2)
            chosen = live_chat.to_list() + shared.to_list()
            truth["chosen"][v] = chosen
            write_parquet(ai / "examples.parquet", examples_frame(lat, chosen, rng))
            klass = dict(zip(lat["latent"].to_list(), lat["klass"].to_list()))
            (ai / "explanations.jsonl").write_text("".join(json.dumps(
                {"latent": j, "klass": klass[j], "prompt_hash": "0" * 16, "explanation": f"latent {j} {NASTY}",
                 "parsed": True, "response": f"Explanation: latent {j}", "model": "toy"}) + "\n" for j in chosen))
            write_parquet(ai / "scores.parquet", pl.DataFrame({
                "latent": chosen, "klass": [klass[j] for j in chosen],
                "ba_similar": rng.uniform(0.5, 1, len(chosen)), "ba_random": rng.uniform(0.6, 1, len(chosen)),
                **{f"recall_t{t}": rng.uniform(0, 1, len(chosen)) for t in range(3)},
                "n_pos": [9] * len(chosen), "n_neg_similar": [9] * len(chosen), "n_neg_random": [9] * len(chosen),
                "n_unparsed": [0] * len(chosen)}))
            gt = [{"latent": chosen[0], "klass": "chat_only", "behaviour": "refusal", "auroc": 0.95,
                   "explanation": f"latent {chosen[0]} {NASTY}", "predicted": "refusal", "similarity": 0.61, "correct": True}]
            write_json(ai / "metrics.json", {  # the shape explain_and_score writes
                "n_latents": len(chosen),
                "chat_only": {"n": 3, "ba_similar": 0.7, "ba_random": 0.9, "recall_t0": 0.8, "recall_t1": 0.6, "recall_t2": 0.4},
                "shared": {"n": 2, "ba_similar": 0.6, "ba_random": 0.8, "recall_t0": 0.7, "recall_t1": 0.5, "recall_t2": 0.3},
                "unparsed_fraction": 0.0, "parse_rate": 0.96, "parse_rate_explain": 0.8, "parse_rate_score": 1.0,
                "constraint": {"mode": "logit_bias", "explain": "one line", "score": "logit_bias"},
                "ground_truth": {"n": 1, "n_correct": 1, "accuracy": 1.0, "chance": 0.125, "n_behaviours": 8, "latents": gt},
                **({"warning": WARNING} if v == "l1" else {})})
    if "comparison" not in skip:
        comp = root / f"results/analysis/{pair}/L{layer}/comparison"
        write_json(comp / "metrics.json", {"n_chat_only": {v: 1 for v in variants}})
        figure(comp / "figures" / "nu_threshold_curve.png", "Fig. 8")
    if "validate" not in skip:  # the shape validate_synthetic / validate_behaviours write
        val = {v: {"chat_only_set": {"n": 20 + i, "recall": 0.9 - i / 10, "precision": 0.5 + i / 10,
                                     "composition": {"shrinkage": 3 + i, "decoupling_artefact": i}},
                   "auroc_nu_eps_shrinkage_vs_chat_only": {"auroc": 0.95},
                   "auroc_nu_r_decoupling_artefact_vs_chat_only": {"auroc": None},
                   "robust_by_threshold": [{"pi": 0.1, "n": 9, "true_chat_only": 7 + i, "bait": i}]}
               for i, v in enumerate(variants)}
        truth["validate"] = val
        write_json(root / "results/validate/metrics.json", {"variants": val})
        figure(root / "results/validate/figures/nu_scatter.png", "ν by true kind")
        # refusal: detected by the first explained chat-only latent (AUROC 0.95); joke: by the second, below 0.9
        beh = {v: {b: {"all_latents": {"latent": truth["chosen"].get(v, [j, j])[j], "auroc": auroc},
                       "chat_only": {"latent": j + 1, "auroc": 0.8}}
                   for j, (b, auroc) in enumerate((("refusal", 0.95), ("joke", 0.85)))}
               for v in variants}
        truth["behaviours"] = beh
        write_json(root / f"results/validate/{pair}/behaviours.json", {"variants": beh})
    return truth
