"""Turn run outputs into the report's tables: plain Python rows the templates print as they are.

The per-stage metrics files are nested JSON whose exact keys belong to their stages; the report reads
the few numbers it places in the paper's table layouts by their key words (`fve`, `base`, `val`, ...)
and shows every other number in generic tables, so a key renamed upstream is still on the page.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import polars as pl
from markupsafe import Markup

from crossdiff.report.collect import VariantRun

CLASSES = ("base_only", "shared", "chat_only", "other")
CLASS_NAMES = {"base_only": "base-only", "shared": "shared", "chat_only": "chat-only", "other": "other"}
MODELS = ("base", "chat")
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------- generic JSON tables

def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}; lists of scalars stay values, lists of dicts are indexed."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        out = {}
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def _tokens(key: str) -> list[str]:
    return [t for t in re.split(r"[/._\-\s]+", key.lower()) if t]


def fmt(v: Any, digits: int = 4) -> str:
    """Numbers at `digits` significant digits, None as an en dash, everything else as text."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        return f"{v:.{digits}g}" if v != 0 else "0"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x, 3) for x in v) + "]"
    return str(v)


def pct(v: Any, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{100 * v:.{digits}f}%"


def base_vs_chat(metrics: dict) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any]]]:
    """Split flattened metrics into (metric, base, chat) rows and the remaining (key, value) rows.

    A key belongs to a model when one of its `/`- or `_`-separated words is exactly `base` or `chat`
    (`loss/web_heldout/base`, `behaviours/refusal/chat_answer`); the row name is the key without it.
    The part nearest the leaf decides (`loss/chat_heldout/base` is the base model's chat loss).
    """
    pairs: dict[str, dict[str, Any]] = {}
    rest = []
    for key, value in flatten(metrics).items():
        parts = key.split("/")
        hit = None
        for i, part in reversed(list(enumerate(parts))):
            words = part.split("_")
            models = [w for w in words if w in MODELS]
            if len(models) == 1:
                rest_words = [w for w in words if w not in MODELS]
                name = "/".join(parts[:i] + (["_".join(rest_words)] if rest_words else []) + parts[i + 1:])
                hit = (name, models[0])
                break
        if hit:
            pairs.setdefault(hit[0], {})[hit[1]] = value
        else:
            rest.append((key, value))
    rows = [(name, d.get("base"), d.get("chat")) for name, d in pairs.items()]
    return rows, rest


def side_by_side(dicts: dict[str, dict | None]) -> list[tuple[str, list[Any]]]:
    """One row per flattened key, one column per named dict (None when the dict lacks the key)."""
    flat = {name: flatten(d) if d else {} for name, d in dicts.items()}
    keys: list[str] = []
    for f in flat.values():
        keys += [k for k in f if k not in keys]
    return [(k, [flat[name].get(k) for name in dicts]) for k in keys]


# ------------------------------------------------------------------- crosscoder training (Table 1/2)

def find(flat: dict[str, Any], need: Iterable[str], avoid: Iterable[str] = ()) -> Any:
    """The scalar under the shortest key containing all words `need` and none of `avoid`."""
    need, avoid = set(need), set(avoid)
    hits = []
    for key, value in flat.items():
        words = set(_tokens(key))
        if need <= words and not (avoid & words) and isinstance(value, (int, float)) and not isinstance(value, bool):
            hits.append((len(_tokens(key)), key, value))
    return min(hits)[2] if hits else None


TRAIN_FIELDS = {  # column -> (words the key must contain, words it must not)
    "fve_base": ({"fve", "base"}, {"chat"}),
    "fve_chat": ({"fve", "chat"}, {"base"}),
    "dead": ({"dead"}, set()),
    "fve_total": ({"fve"}, {"base", "chat"}),
    "l0": ({"l0"}, {"target"}),  # not the target_l0 the health check compares it with
}


ONLY_FOR = {"mu": "l1", "k": "batchtopk"}  # hyperparameters of one crosscoder type


def training_rows(variant: VariantRun, params: dict) -> list[dict]:
    """The paper's Table 1/2 rows (one per split) for one variant; [] when training has not run."""
    if variant.training is None:
        return []
    flat = flatten(variant.training)
    hp = dict(params.get("crosscoders", {}).get(variant.name, {}))
    cfg = {**flatten(variant.config or {}), "type": (variant.config or {}).get("kind")}
    for key in ("type", "mu", "k", "lr", "epochs", "dict_size"):
        if hp.get(key) in (None, "auto"):  # `auto`: the value training resolved (config.json)
            hp[key] = next((v for k, v in cfg.items() if k.split("/")[-1] == key), None)
    for key, kind in ONLY_FOR.items():  # config.json holds every default; show a key only where it acts
        if hp.get("type") != kind:
            hp[key] = None
    rows = []
    for split in SPLITS:
        other = set(SPLITS) - {split}
        row = {col: find(flat, need | {split}, avoid | other) for col, (need, avoid) in TRAIN_FIELDS.items()}
        if split == "val" and all(v is None for v in row.values()):  # unsplit keys are validation numbers
            row = {col: find(flat, need, avoid | other) for col, (need, avoid) in TRAIN_FIELDS.items()}
        if any(v is not None for v in row.values()):
            rows.append({"split": split, **row})
    return [{"variant": variant.name, "kind": hp.get("type"), "D": hp.get("dict_size"), "mu": hp.get("mu"), "k": hp.get("k"),
             "lr": hp.get("lr"), "epochs": hp.get("epochs"), **r} for r in rows]


# --------------------------------------------------------------------------- latent classes etc.

def class_counts(variants: list[VariantRun], bands: dict | None) -> list[dict]:
    """Paper Fig. 1c: live latents per Δnorm class (eq. 4 bands) per variant; dead latents are a row of
    their own (excluded from the analyses, A.13), so the class rows plus dead add up to the total."""
    rows = []
    for klass in CLASSES:
        band = (bands or {}).get(klass)
        rows.append({"name": CLASS_NAMES[klass], "band": f"{band[0]}–{band[1]}" if band else "",
                     "counts": [None if v.latents is None else int(((v.latents["klass"] == klass) & ~v.latents["dead"]).sum())
                                for v in variants]})
    rows.append({"name": "dead (not in the rows above)", "band": "",
                 "counts": [None if v.latents is None else int(v.latents["dead"].sum()) for v in variants]})
    rows.append({"name": "total", "band": "",
                 "counts": [None if v.latents is None else v.latents.height for v in variants]})
    return rows


def template_stats(latents: pl.DataFrame | None) -> dict | None:
    """Paper §3 / A.13: share of live chat-only latents with f_template above 50% and above 1/3."""
    if latents is None:
        return None
    ft = latents.filter((pl.col("klass") == "chat_only") & ~pl.col("dead"))["f_template"].drop_nulls()
    n = ft.len()
    return {"n_chat_only": n,
            "above_half": float((ft > 0.5).mean()) if n else None,
            "above_third": float((ft > 1 / 3).mean()) if n else None}


def add_ranks(latents: pl.DataFrame) -> pl.DataFrame:
    """Paper Tables 3/4 rank columns, among chat-only latents only (others null).

    r(ν): rank of |ν| among chat-only latents, 1 = lowest (most chat-specific). r(Δnorm): rank of
    Δnorm (eq. 4) among chat-only latents, 1 = highest (furthest towards chat).
    """
    chat = pl.col("klass") == "chat_only"

    def rank(expr: pl.Expr, descending: bool) -> pl.Expr:
        masked = pl.when(chat).then(expr).otherwise(None)
        return masked.rank(method="min", descending=descending).cast(pl.Int64)

    return latents.with_columns(
        r_nu_eps=rank(pl.col("nu_eps").abs(), False),
        r_nu_r=rank(pl.col("nu_r").abs(), False),
        r_delta_norm=rank(pl.col("delta_norm"), True),
    )


# ---------------------------------------------------------------------------------- autointerp

def autointerp_scores(scores: pl.DataFrame | None) -> pl.DataFrame | None:
    """scores.parquet -> latent, score (balanced accuracy with MiniLM-similar negatives, A.10),
    score_random (random negatives), recall_t* (scorer recall per activation tercile, 0 = strongest)."""
    if scores is None:
        return None
    missing = {"latent", "ba_similar", "ba_random"} - set(scores.columns)
    if missing:
        raise ValueError(f"scores.parquet lacks columns {sorted(missing)}")
    recall = sorted(c for c in scores.columns if c.startswith("recall_"))
    return scores.select(pl.col("latent").cast(pl.Int64), pl.col("ba_similar").cast(pl.Float64).alias("score"),
                         pl.col("ba_random").cast(pl.Float64).alias("score_random"), *recall)


def latent_table(variant: VariantRun) -> pl.DataFrame | None:
    """latents.parquet with ranks, autointerp score and explanation joined (the dashboard's rows)."""
    if variant.latents is None:
        return None
    df = variant.latents.with_columns(pl.col("latent").cast(pl.Int64), pl.col(pl.Float32, pl.Float64).fill_nan(None))
    df = add_ranks(df)  # NaN -> null first: a NaN ν would otherwise rank as the largest value
    drop = [c for c in ("score", "score_random", "explanation") if c in df.columns]
    df = df.drop(drop)
    scores = autointerp_scores(variant.scores)
    if scores is not None:
        df = df.join(scores, on="latent", how="left")
    else:
        df = df.with_columns(score=pl.lit(None, pl.Float64), score_random=pl.lit(None, pl.Float64))
    expl = variant.explanations or {}
    text = [expl.get(i, {}).get("explanation") for i in df["latent"].to_list()]
    return df.with_columns(explanation=pl.Series(text, dtype=pl.String))


def page_order(table: pl.DataFrame, examples: pl.DataFrame | None, max_latents: int) -> list[int]:
    """Which latents get a page, most interesting first: explained or with examples, then chat-only
    by rank_nu (ascending = most chat-specific), then base-only, then the rest by frequency."""
    has_ex = set(examples["latent"].to_list()) if examples is not None and "latent" in examples.columns else set()
    order = table.with_columns(
        _g=pl.when(pl.col("explanation").is_not_null() | pl.col("latent").is_in(list(has_ex))).then(0)
        .when(pl.col("klass") == "chat_only").then(1)
        .when(pl.col("klass") == "base_only").then(2).otherwise(3),
        _rank=pl.col("rank_nu") if "rank_nu" in table.columns else pl.lit(None),
    ).filter(~pl.col("dead") | (pl.col("_g") == 0)).sort(
        ["_g", "_rank", "freq", "latent"], descending=[False, False, True, False], nulls_last=True)
    return order["latent"].head(max_latents).to_list()


TABLE_COLUMNS = ("latent", "klass", "delta_norm", "nu_eps", "nu_r", "f_template", "freq", "score",
                 "max_act", "cos_sim", "rank_nu", "dead", "explanation")


def table_json(tables: dict[str, pl.DataFrame], pages: dict[str, set[int]]) -> dict:
    """All variants' latent rows for the dashboard script: {"columns": names, "rows": [[values]]}
    (arrays, not objects, and 5 significant digits: the JSON stays ~100 bytes per latent)."""
    columns = ["variant", *TABLE_COLUMNS, "page"]
    rows = []
    for name, df in tables.items():
        cols = [c if c in df.columns else None for c in TABLE_COLUMNS]
        data = [df[c].to_list() if c else [None] * df.height for c in cols]
        for i, latent in enumerate(data[0]):
            row = [name] + [_compact(col[i]) for col in data]
            row.append(f"latents/{name}/{latent}.html" if latent in pages.get(name, ()) else None)
            rows.append(row)
    return {"columns": columns, "rows": rows}


def _compact(v: Any) -> Any:
    if isinstance(v, float):
        return None if not math.isfinite(v) else float(f"{v:.5g}")
    return v


# --------------------------------------------------------------------------------------- causal

CONDITION_LABELS = {"none": "None", "all": "All", "template": "Template",
                    "delta_norm_best": "Δnorm best 50%", "delta_norm_worst": "Δnorm worst 50%",
                    "nu_best": "ν (Latent Scaling) best 50%", "nu_worst": "ν (Latent Scaling) worst 50%"}
SOURCE_LABELS = {"all": "all evaluation conversations", "generated": "prompts answered by the chat model",
                 "heldout": "held-out chat conversations"}


def kl_tables(variants: list[VariantRun], first_tokens: list[int] | None = None) -> list[dict]:
    """One table per conversation source; rows = conditions, columns = (mask, variant): mean
    KL(p_chat ‖ p_patched) with its 95% CI (paper Fig. 5 on generated responses, Fig. 7 on held-out)."""
    frames = [v.kl if "variant" in v.kl.columns else v.kl.with_columns(variant=pl.lit(v.name))
              for v in variants if v.kl is not None]
    if not frames:
        return []
    kl = pl.concat(frames, how="diagonal_relaxed")
    if "source" not in kl.columns:
        kl = kl.with_columns(source=pl.lit("all"))
    first = f"tokens {first_tokens[0]}–{first_tokens[1]}" if first_tokens else "first tokens"
    names = [v.name for v in variants if v.kl is not None]
    out = []
    for source in dict.fromkeys(kl["source"].to_list()):
        sub = kl.filter(pl.col("source") == source)
        masks = list(dict.fromkeys(sub["mask"].to_list()))
        cells = {(r["condition"], r["mask"], r["variant"]): r for r in sub.iter_rows(named=True)}
        rows = [{"condition": c, "label": CONDITION_LABELS.get(c, c),
                 "cells": [cells.get((c, m, n)) for m in masks for n in names]}
                for c in dict.fromkeys(sub["condition"].to_list())]
        out.append({"source": source, "label": SOURCE_LABELS.get(source, source), "masks": masks,
                    "mask_labels": [{"full": "full response", "first": first}.get(m, m) for m in masks],
                    "variants": names, "rows": rows})
    return out


def causal_pools(variants: list[VariantRun]) -> list[dict]:
    """Which latents each variant's best/worst halves were ranked over (causal metrics.json `pool`): the pool
    used (authors: live chat-only with ν in nu_range, signed ν; legacy: |ν| ranks) and every pool's sizes."""
    out = []
    for v in variants:
        p = (v.causal or {}).get("pool")
        if not p:
            continue
        sizes = p.get("sizes") or {}
        out.append({"variant": v.name, "used": p.get("used"), "nu_range": p.get("nu_range"), "top_n": p.get("top_n"),
                    "candidates": sizes.get("candidates"),
                    "pools": {k: s for k, s in sizes.items() if k != "candidates" and isinstance(s, dict)}})
    return out


CACHE_FIELDS = ("rows", "dtype", "sink_rows_excluded", "outlier_rows", "outlier_factor", "norm_base", "norm_chat",
                "norm_ratio")


def cache_rows(variants: list[VariantRun]) -> list[dict]:
    """The activation caches behind the analysis (analysis metrics.json `cache`), one row per split. All
    variants of a run read the same caches, so the first variant that recorded them speaks for all."""
    for v in variants:
        cache = (v.analysis or {}).get("cache")
        if not cache:
            continue
        rows = []
        for split in SPLITS:
            s = cache.get(split)
            if not s:
                continue
            row = {"split": split, **{k: s.get(k) for k in CACHE_FIELDS}}
            if row["norm_ratio"] is None and s.get("norm_base") and s.get("norm_chat") is not None:
                row["norm_ratio"] = s["norm_chat"] / s["norm_base"]  # r = E‖h_chat‖ / E‖h_base‖
            rows.append(row)
        return rows
    return []


def explained_rows(table: pl.DataFrame | None) -> list[dict]:
    """The latents autointerp explained or scored, best score first."""
    if table is None:
        return []
    sub = table.filter(pl.col("explanation").is_not_null() | pl.col("score").is_not_null())
    return sub.sort("score", descending=True, nulls_last=True).select(
        "latent", "klass", "score", "score_random", "nu_eps", "nu_r", "f_template", "explanation").to_dicts()


# ------------------------------------------------------------------------------------ validation

VALIDATION_ROWS = (  # (label, flattened key of validate/metrics.json variants.{name})
    ("recall of true chat-only features (Δnorm chat-only set)", "chat_only_set/recall"),
    ("precision of the chat-only set", "chat_only_set/precision"),
    ("chat-only set size", "chat_only_set/n"),
    ("… of which shrinkage bait", "chat_only_set/composition/shrinkage"),
    ("… of which decoupling artefacts", "chat_only_set/composition/decoupling_artefact"),
    ("AUROC ν^ε: shrinkage bait vs true chat-only", "auroc_nu_eps_shrinkage_vs_chat_only/auroc"),
    ("AUROC ν^r: decoupling artefacts vs true chat-only", "auroc_nu_r_decoupling_artefact_vs_chat_only/auroc"),
    ("AUROC ν^r: decoupled-feature latents vs true chat-only", "auroc_nu_r_decoupled_vs_chat_only/auroc"),
)


def validation_rows(validate: dict) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    """Ground-truth scores per variant, the rows a reader needs first (the full metrics stay below)."""
    variants = validate.get("variants", {})
    names = list(variants)
    flat = [flatten(variants[n]) for n in names]
    rows = [(label, [f.get(key) for f in flat]) for label, key in VALIDATION_ROWS]
    robust = [(variants[n].get("robust_by_threshold") or [None])[0] for n in names]  # the smallest π
    pis = {r["pi"] for r in robust if r}
    if len(pis) == 1:  # Fig. 8 on ground truth: true features kept vs bait kept
        rows.append((f"robust at π = {pis.pop():g}: true chat-only / bait",
                     [f"{r['true_chat_only']} / {r['bait']}" if r else None for r in robust]))
    return names, rows


def behaviour_rows(behaviours: dict) -> tuple[list[str], list[tuple[str, list[Any]]]]:
    """Best single-latent AUROC per planted behaviour: over all latents and over the chat-only ones."""
    variants = behaviours.get("variants", {})
    cols = [(v, pool) for v in variants for pool in ("all_latents", "chat_only")]
    names = [f"{v}: {'all' if pool == 'all_latents' else 'chat-only'}" for v, pool in cols]
    labels = list(dict.fromkeys(b for v in variants.values() for b in v))
    fmt = lambda r: None if not r or r.get("auroc") is None else f"{r['auroc']:.2f} (#{r['latent']})"
    return names, [(b, [fmt(variants[v].get(b, {}).get(pool)) for v, pool in cols]) for b in labels]


# ------------------------------------------------------------------------ summary (the first screen)

KL_SOURCES = ("generated", "all", "heldout")  # preferred first: the paper's Fig. 5 scores the chat model's own answers


def headline_kl(kl: pl.DataFrame | None) -> dict | None:
    """One variant's headline causal numbers: KL(p_chat ‖ p_patched) over full responses for no patch, all
    latents, and the ν-best / ν-worst halves of the chat-only latents (means with 95% CIs), and the share
    of the KL drop from patching all latents that the ν-best half alone achieves:
    (KL_none − KL_ν-best) / (KL_none − KL_all)."""
    if kl is None or kl.is_empty():
        return None
    if "source" in kl.columns:
        sources = kl["source"].unique(maintain_order=True).to_list()
        source = next((s for s in KL_SOURCES if s in sources), sources[0])
        kl = kl.filter(pl.col("source") == source)
    else:
        source = "all"
    if "mask" in kl.columns:
        kl = kl.filter(pl.col("mask") == "full")
    cells = {r["condition"]: r for r in kl.iter_rows(named=True)}
    mean = {c: (cells.get(c) or {}).get("mean") for c in ("none", "all", "nu_best")}
    share = None
    if None not in mean.values() and mean["none"] != mean["all"]:
        share = (mean["none"] - mean["nu_best"]) / (mean["none"] - mean["all"])
    return {"source": SOURCE_LABELS.get(source, source), "none": cells.get("none"), "all": cells.get("all"),
            "nu_best": cells.get("nu_best"), "nu_worst": cells.get("nu_worst"), "nu_best_share": share}


def summary_row(variant: VariantRun) -> dict:
    """One variant's answer in numbers: headline KL, chat-only detection scores, parse rate, and how often
    explanations name their latent's planted behaviour (vs chance)."""
    ai = variant.autointerp or {}
    chat = ai.get("chat_only") or {}
    gt = ai.get("ground_truth") or {}
    return {"variant": variant.name, "kl": headline_kl(variant.kl),
            "score": chat.get("ba_similar"), "score_random": chat.get("ba_random"), "n_chat_only": chat.get("n"),
            "parse_rate": ai.get("parse_rate"), "constraint": (ai.get("constraint") or {}).get("mode"),
            "gt_accuracy": gt.get("accuracy"), "gt_chance": gt.get("chance"), "gt_n": gt.get("n"),
            "gt_correct": gt.get("n_correct")}


def robust_latents(table: pl.DataFrame | None, variant: VariantRun, behaviours: dict | None, min_auroc: float,
                   n: int) -> list[dict]:
    """The first `n` live chat-only latents in ν-filter order (rank(ν^ε) + rank(ν^r), most chat-specific
    first; autointerp explains the same ones), each with its explanation, detection score, the planted
    behaviour it detects (AUROC >= min_auroc, from behaviours.json) and whether its explanation names it."""
    from crossdiff.autointerp.ground_truth import behaviour_latents

    if table is None or "rank_nu" not in table.columns:
        return []
    truth = behaviour_latents((behaviours or {}).get("variants", {}).get(variant.name, {}), min_auroc)
    named = {r["latent"]: r["correct"] for r in ((variant.autointerp or {}).get("ground_truth") or {}).get("latents", [])}
    chat = table.filter((pl.col("klass") == "chat_only") & ~pl.col("dead") & pl.col("rank_nu").is_not_null())
    rows = chat.sort(["rank_nu", "latent"]).head(n).select(
        "latent", "nu_eps", "nu_r", "score", "score_random", "explanation").to_dicts()
    for r in rows:
        behaviour, auroc = truth.get(r["latent"], (None, None))
        r.update(behaviour=behaviour, auroc=auroc, named=named.get(r["latent"]))
    return rows


SEED_NUMBERS = {  # headline key (crossdiff.seeds.headline) -> column label of the report's across-seeds table
    "n_chat_only": "chat-only latents", "n_shared": "shared", "n_base_only": "base-only", "val_fve": "val FVE",
    "median_nu_eps_chat_only": "median ν<sup>ε</sup> chat-only", "median_nu_r_chat_only": "median ν<sup>r</sup> chat-only",
    "kl_full_all": "KL all latents", "kl_full_nu_best": "KL ν best 50%", "kl_full_nu_worst": "KL ν worst 50%",
    "kl_full_delta_norm_best": "KL Δnorm best 50%", "kl_full_delta_norm_worst": "KL Δnorm worst 50%",
}


def seed_rows(summary: dict | None) -> dict | None:
    """The across-seeds tables: per variant, SEED_NUMBERS as mean ± sd; per paper claim, n of N seeds per variant."""
    if not summary:
        return None
    variants = list(summary)
    numbers = [{"variant": v, "seeds": len(s["seeds"]), "cells": [s["numbers"].get(k) for k in SEED_NUMBERS]}
               for v, s in summary.items()]
    claim_names = list(dict.fromkeys(c for s in summary.values() for c in s["claims"]))
    claims = [{"statement": next(s["claims"][c]["statement"] for s in summary.values() if c in s["claims"]),
               "held": [summary[v]["claims"].get(c) for v in variants]} for c in claim_names]
    return {"labels": [Markup(x) for x in SEED_NUMBERS.values()], "variants": variants, "numbers": numbers,
            "claims": claims}
