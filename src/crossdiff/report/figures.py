"""The analysis stage's figures (paper Fig. 1a/b, 8, 10, 11, 12 and the Δnorm histogram), PNG via Agg.

Every function takes a latent table (DESIGN §3) and writes one file atomically; dead latents are left out,
as in the paper (A.13).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from crossdiff.io import atomic_path  # noqa: E402

COLOURS = {"chat_only": "tab:blue", "shared": "tab:red", "base_only": "tab:purple", "other": "0.6"}
LABELS = {"chat_only": "chat-only", "shared": "shared", "base_only": "base-only", "other": "other"}
DPI = 120


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def _alive(table: pl.DataFrame) -> pl.DataFrame:
    return table.filter(~pl.col("dead"))


def _col(df: pl.DataFrame, c: str) -> np.ndarray:
    return df[c].drop_nulls().to_numpy().astype(float)


def _limits(*arrays: np.ndarray) -> tuple[float, float]:
    """Axis range covering [0, 1.1] and the 1st-99th percentile of the data (outliers would hide the bulk)."""
    x = np.concatenate([a[np.isfinite(a)] for a in arrays] + [np.array([0.0, 1.1])])
    lo, hi = np.quantile(x, [0.01, 0.99])
    lo, hi = min(lo, -0.05), max(hi, 1.1)
    pad = 0.03 * (hi - lo)
    return lo - pad, hi + pad


def nu_scatter(path, table: pl.DataFrame, title: str = "") -> Path:
    """Fig. 1a/b: ν^r (x) vs ν^ε (y) of chat-only latents, shared latents in red for reference."""
    t = _alive(table).filter(pl.col("nu_eps").is_not_null() & pl.col("nu_r").is_not_null())
    fig, ax = plt.subplots(figsize=(5.5, 5))
    xs = []
    for k, size, alpha in (("shared", 4, 0.25), ("chat_only", 10, 0.8)):
        s = t.filter(pl.col("klass") == k)
        x, y = s["nu_r"].to_numpy(), s["nu_eps"].to_numpy()
        xs += [x, y]
        ax.scatter(x, y, s=size, alpha=alpha, c=COLOURS[k], label=f"{LABELS[k]} ({len(x)})", linewidths=0)
    lim = _limits(*xs)
    ax.set(xlim=lim, ylim=lim, xlabel="ν^r (reconstruction ratio)", ylabel="ν^ε (error ratio)",
           title=title or "Latent Scaling")
    ax.axhline(0, c="0.85", lw=0.8, zorder=0)
    ax.axvline(0, c="0.85", lw=0.8, zorder=0)
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def delta_norm_hist(path, table: pl.DataFrame, bands: Mapping[str, list], title: str = "") -> Path:
    """Δnorm (eq. 4) histogram of alive latents with the class bands shaded (Fig. 1c's classes)."""
    dn = _col(_alive(table), "delta_norm")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in ("base_only", "shared", "chat_only"):
        lo, hi = bands[k]
        ax.axvspan(lo, hi, color=COLOURS[k], alpha=0.12, label=f"{LABELS[k]} {lo}–{hi}")
    ax.hist(dn, bins=np.linspace(0, 1, 101), color="0.25")
    ax.set(yscale="log", xlim=(0, 1), xlabel="Δnorm", ylabel="latents", title=title or "Relative decoder norm")
    ax.legend(fontsize=8)
    return _save(fig, path)


def by_class_hist(path, table: pl.DataFrame, column: str, log_x: bool = False, title: str = "", xlabel: str = "") -> Path:
    """Distribution of `column` per Δnorm class (Fig. 10: cos_sim; Fig. 11: freq on a log axis)."""
    t = _alive(table)
    classes = [k for k in ("base_only", "shared", "chat_only", "other") if (t["klass"] == k).any()]
    fig, axes = plt.subplots(1, max(len(classes), 1), figsize=(3.2 * max(len(classes), 1), 3.2), squeeze=False,
                             layout="constrained")
    for ax, k in zip(axes[0], classes):
        v = _col(t.filter(pl.col("klass") == k), column)
        if log_x:
            v = np.log10(v[v > 0])
        ax.hist(v, bins=40, color=COLOURS[k])
        ax.set(title=f"{LABELS[k]} ({len(v)})", xlabel=xlabel or (f"log10 {column}" if log_x else column))
    axes[0][0].set_ylabel("latents")
    fig.suptitle(title)
    return _save(fig, path)


def nu_hists(path, table: pl.DataFrame, template_share: float = 0.5, title: str = "") -> Path:
    """Fig. 12: ν^ε and ν^r of chat-only latents, those with f_template > `template_share` highlighted."""
    t = _alive(table).filter(pl.col("klass") == "chat_only")
    heavy = (t["f_template"].fill_null(0) > template_share).to_numpy()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for ax, c, label in zip(axes, ("nu_eps", "nu_r"), ("ν^ε", "ν^r")):
        v = t[c].fill_null(np.nan).to_numpy()
        ok = np.isfinite(v)
        lo, hi = _limits(v[ok])
        bins = np.linspace(lo, hi, 41)
        ax.hist([np.clip(v[ok & heavy], lo, hi), np.clip(v[ok & ~heavy], lo, hi)], bins=bins, stacked=True,
                color=["tab:blue", "0.7"], label=[f"f_template > {template_share:g}", "other"])
        ax.set(xlabel=label, ylabel="chat-only latents")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Latent Scaling of chat-only latents")
    return _save(fig, path)


def robust_curve(path, curves: Mapping, title: str = "") -> Path:
    """Fig. 8: latents with ν^ε < π and ν^r < π vs π, among each variant's top-N latents by Δnorm."""
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, (name, counts) in enumerate(curves["counts"].items()):
        ax.plot(curves["grid"], counts, ls=["-", "--", ":", "-."][i % 4], label=name)
    ax.set(xlabel="π", ylabel="latents with ν^ε < π and ν^r < π",
           title=title or f"Top-{curves['n']} latents by Δnorm")
    ax.legend()
    return _save(fig, path)


def analysis_figures(out_dir, table: pl.DataFrame, params: Mapping, name: str = "") -> list[Path]:
    """All per-variant figures into `out_dir`."""
    out = Path(out_dir)
    prefix = f"{name}: " if name else ""
    return [
        nu_scatter(out / "nu_scatter.png", table, f"{prefix}ν^ε vs ν^r (Fig. 1)"),
        delta_norm_hist(out / "delta_norm.png", table, params["classes"], f"{prefix}Δnorm (eq. 4)"),
        by_class_hist(out / "cos_sim.png", table, "cos_sim", title=f"{prefix}base–chat decoder cosine (Fig. 10)",
                      xlabel="cos(d^base, d^chat)"),
        by_class_hist(out / "freq.png", table, "freq", log_x=True, title=f"{prefix}activation frequency (Fig. 11)",
                      xlabel="log10 frequency"),
        nu_hists(out / "nu_hist.png", table, title=f"{prefix}ν of chat-only latents (Fig. 12)"),
    ]
