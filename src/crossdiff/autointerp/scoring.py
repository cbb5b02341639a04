"""Detection scoring (Paulo et al. 2024; paper A.10): how well an explanation lets an LLM tell a latent's
activating windows from non-activating ones.

Each latent's scoring set mixes its held-out activating windows with as many MiniLM-similar and as
many random non-activating windows, shuffled into prompts of `score_batch` excerpts. The same positive
labels then give two balanced accuracies, against similar and against random negatives, so their
difference measures only how much harder the similar negatives are. An answer that cannot be parsed
counts as wrong for every excerpt of its prompt (a scorer gets no credit for not answering).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl

from .examples import N_TERCILES

UNPARSED = -1


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """(TPR + TNR) / 2; a prediction of UNPARSED is wrong for either class. NaN without both classes."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    pos, neg = y_true == 1, y_true == 0
    if not pos.any() or not neg.any():
        return math.nan
    tpr = float(np.mean(y_pred[pos] == 1))
    tnr = float(np.mean(y_pred[neg] == 0))
    return 0.5 * (tpr + tnr)


def scoring_batches(examples: pl.DataFrame, batch: int, seed: int) -> list[pl.DataFrame]:
    """One latent's scorer excerpts (score + both negative splits), shuffled and cut into prompts."""
    items = examples.filter(pl.col("split").is_in(["score", "negative_similar", "negative_random"]))
    items = items.sample(fraction=1.0, shuffle=True, seed=seed) if items.height else items
    return [items.slice(i, batch) for i in range(0, items.height, batch)]


def latent_scores(preds: pl.DataFrame) -> dict:
    """Per-latent detection metrics from its predictions (columns split, tercile, pred)."""
    split = preds["split"].to_numpy()
    pred = preds["pred"].to_numpy()
    label = (split == "score").astype(int)
    out = {}
    for name in ("similar", "random"):
        keep = (split == "score") | (split == f"negative_{name}")
        out[f"ba_{name}"] = balanced_accuracy(label[keep], pred[keep])
    pos = preds.filter(pl.col("split") == "score")
    for t in range(N_TERCILES):  # recall of the scorer on each activation tercile (0 = strongest)
        p = pos.filter(pl.col("tercile") == t)["pred"].to_numpy()
        out[f"recall_t{t}"] = float(np.mean(p == 1)) if len(p) else math.nan
    out["n_pos"] = int((split == "score").sum())
    out["n_neg_similar"] = int((split == "negative_similar").sum())
    out["n_neg_random"] = int((split == "negative_random").sum())
    out["n_unparsed"] = int((pred == UNPARSED).sum())
    return out


def _means(sub: pl.DataFrame) -> dict:
    out = {"n": sub.height}
    for col in ("ba_similar", "ba_random", "recall_t0", "recall_t1", "recall_t2"):
        vals = sub[col].drop_nans().drop_nulls() if sub.height else sub[col]
        out[col] = float(vals.mean()) if len(vals) else math.nan
    return out


def summarise(scores: pl.DataFrame) -> dict:
    """metrics.json: mean detection score of chat-only vs shared latents, with similar vs random negatives.

    The class means are over the ν-ranked chat-only latents and the random shared control; latents added
    because they detect a planted behaviour (`why` == "behaviour") are summarised on their own.
    """
    out: dict = {"n_latents": scores.height}
    behaviour = pl.col("why") == "behaviour" if "why" in scores.columns else pl.lit(False)
    for klass in ("chat_only", "shared"):
        out[klass] = _means(scores.filter((pl.col("klass") == klass) & ~behaviour.fill_null(False)))
    if "why" in scores.columns:
        out["behaviour_latents"] = _means(scores.filter(behaviour.fill_null(False)))
    n_items = int(scores["n_pos"].sum() + scores["n_neg_similar"].sum() + scores["n_neg_random"].sum())
    out["unparsed_fraction"] = float(scores["n_unparsed"].sum() / n_items) if n_items else math.nan
    return out
