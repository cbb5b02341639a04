"""Activating examples as HTML with per-token highlighting (the paper's Fig. 13–25 style:
red background whose intensity is the token's activation over the latent's maximum)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl
from markupsafe import Markup, escape

VISIBLE = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}  # shown like the paper prints them


@dataclass
class Example:
    tokens: list[str]
    acts: list[float]
    role: str             # "activating" | "similar" | "random"
    tercile: int | None
    max_act: float
    text: str | None = None


def highlight(tokens: Sequence[str], acts: Sequence[float], scale: float) -> Markup:
    """One <span> per token; alpha = act / scale clipped to [0, 1]; the value in the tooltip."""
    parts = []
    for tok, act in zip(tokens, acts, strict=True):
        shown = "".join(VISIBLE.get(ch, ch) for ch in tok)
        if act is not None and act > 0 and scale > 0:
            alpha = min(act / scale, 1.0)
            parts.append(f'<span class="tok on" style="background-color: rgba(220, 38, 38, {alpha:.3f})" '
                         f'title="{act:.4g}" data-act="{act:.6g}">{escape(shown)}</span>')
        else:
            parts.append(f'<span class="tok" title="0">{escape(shown)}</span>')
    return Markup("".join(parts))


def _role(split: str | None) -> str:
    """examples.parquet `split`: explain | score | negative_similar | negative_random."""
    split = split or ""
    return "similar" if "similar" in split else "random" if "random" in split else "activating"


def examples_for(examples: pl.DataFrame, latent: int) -> list[Example]:
    """All stored windows of one latent (examples.parquet: `tokens` per-token strings, `acts`
    per-token activations, `split`, `tercile`), in file order."""
    missing = {"latent", "tokens", "acts"} - set(examples.columns)
    if missing:
        raise ValueError(f"examples.parquet lacks columns {sorted(missing)}")
    out = []
    for row in examples.filter(pl.col("latent") == latent).iter_rows(named=True):
        acts = [float(x) if x is not None else 0.0 for x in row["acts"]]
        terc = row.get("tercile")
        out.append(Example(list(row["tokens"]), acts, _role(row.get("split")), None if terc is None else int(terc),
                           max(acts, default=0.0), row.get("text")))
    return out


def group_examples(examples: list[Example], per_group: int) -> dict:
    """{"terciles": [(tercile, [Example])] strongest tercile first, "similar": [...], "random": [...]},
    each group cut to its `per_group` strongest windows; `scale` = the largest activation shown."""
    act = [e for e in examples if e.role == "activating"]
    by_t: dict = {}
    for e in act:
        by_t.setdefault(e.tercile, []).append(e)
    top = lambda xs: sorted(xs, key=lambda e: -e.max_act)[:per_group]
    terciles = sorted(((t, top(xs)) for t, xs in by_t.items()), key=lambda g: -g[1][0].max_act)
    groups = {
        "terciles": terciles,
        "similar": [e for e in examples if e.role == "similar"][:per_group],
        "random": [e for e in examples if e.role == "random"][:per_group],
    }
    shown = [e for _, xs in terciles for e in xs] + groups["similar"] + groups["random"]
    groups["scale"] = max((e.max_act for e in shown), default=0.0)
    return groups
