"""Ground truth for explanations: does a latent's explanation name the planted behaviour it detects?

On a pair with planted behaviours (the embedded toy pair), `validate_behaviours` records for every
behaviour the latent whose max activation over a conversation best separates that behaviour's chat
conversations from the others (AUROC), over all latents, chat-only latents and robust chat-only latents.
A latent that is such a best latent at AUROC >= `min_auroc` detects that behaviour; if it was explained,
its explanation should describe it. We embed the explanation and a one-line description of every
behaviour with all-MiniLM-L6-v2 and call the explanation correct when its most similar description is
its own behaviour's (top-1 accuracy). Chance is 1 / number of behaviours.

behaviours.json names only the best latents per behaviour, so a latent that detects a behaviour almost
as well as the best one is not counted: the check is over the latents known to detect a behaviour.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from . import negatives

POOLS = ("all_latents", "chat_only")  # plus every entry of robust_chat_only


def behaviour_latents(per_behaviour: dict, min_auroc: float) -> dict[int, tuple[str, float]]:
    """latent -> (behaviour, AUROC) for the latents that best detect a behaviour at AUROC >= `min_auroc`.

    `per_behaviour` is one variant of behaviours.json (`variants.{name}`). A latent best for several
    behaviours keeps the one it detects with the highest AUROC.
    """
    out: dict[int, tuple[str, float]] = {}
    for behaviour, pools in per_behaviour.items():
        entries = [pools.get(p) for p in POOLS] + list(pools.get("robust_chat_only") or [])
        for e in entries:
            if not e or e.get("latent") is None or e.get("auroc") is None or not math.isfinite(e["auroc"]):
                continue
            latent, auroc = int(e["latent"]), float(e["auroc"])
            if auroc >= min_auroc and (latent not in out or auroc > out[latent][1]):
                out[latent] = (behaviour, auroc)
    return out


def pick_behaviour_latents(truth: dict[int, tuple[str, float]], n: int | None) -> list[int]:
    """At most `n` (None: all) of the latents in `truth`, spread over behaviours: each behaviour's best latent
    first (highest AUROC, then lowest id), then the rest in that order, so a capped run checks as many
    different behaviours as it can."""
    ranked = sorted(truth, key=lambda lat: (-truth[lat][1], lat))
    seen: set[str] = set()
    first, rest = [], []
    for lat in ranked:
        (rest if truth[lat][0] in seen else first).append(lat)
        seen.add(truth[lat][0])
    return sorted((first + rest)[:n] if n is not None else ranked)


def match_behaviours(texts: Sequence[str], descriptions: dict[str, str],
                     embed: Callable[[Sequence[str]], np.ndarray] = negatives.embed) -> list[tuple[str, float]]:
    """For each text, the behaviour whose description is most cosine-similar (MiniLM), and that similarity."""
    if not descriptions:
        raise ValueError("no behaviour descriptions to match explanations against")
    if not texts:
        return []
    names = list(descriptions)
    sims = embed(list(texts)) @ embed([descriptions[n] for n in names]).T  # unit rows: dot = cosine
    best = sims.argmax(axis=1)
    return [(names[j], float(sims[i, j])) for i, j in enumerate(best)]


def explanation_accuracy(explanations: Sequence[dict], truth: dict[int, tuple[str, float]],
                         descriptions: dict[str, str],
                         embed: Callable[[Sequence[str]], np.ndarray] = negatives.embed) -> dict:
    """Top-1 accuracy of explanation -> behaviour matching over the explained latents with a known behaviour.

    A latent whose explanation did not parse counts as wrong (it names nothing). Returns the metrics
    for metrics.json: n, n_correct, accuracy, chance, and one row per latent.
    """
    missing = {b for b, _ in truth.values()} - set(descriptions)
    if missing:
        raise ValueError(f"no one-line description for planted behaviours {sorted(missing)}")
    recs = [r for r in explanations if int(r["latent"]) in truth]
    texts = [r["explanation"] for r in recs if r.get("explanation")]
    matched = iter(match_behaviours(texts, descriptions, embed))
    rows = []
    for r in recs:
        behaviour, auroc = truth[int(r["latent"])]
        predicted, sim = next(matched) if r.get("explanation") else (None, math.nan)
        rows.append({"latent": int(r["latent"]), "klass": r.get("klass"), "behaviour": behaviour, "auroc": auroc,
                     "explanation": r.get("explanation"), "predicted": predicted, "similarity": sim,
                     "correct": predicted == behaviour})
    n = len(rows)
    n_correct = sum(r["correct"] for r in rows)
    return {"n": n, "n_correct": n_correct, "accuracy": n_correct / n if n else math.nan,
            "chance": 1 / len(descriptions), "n_behaviours": len(descriptions), "latents": rows}
