"""Every figure of the pipeline, in one home: one palette, one `_save` (Agg; PNG or SVG by the file's suffix).

Analysis (paper Fig. 1a/b, 8, 10, 11, 12 and the Δnorm histogram; dead latents left out, as in A.13), causal KL
(Fig. 5), the synthetic ground-truth check and the sparsity × expansion sweep. Each function writes one file atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after matplotlib.use: the headless backend first)
import numpy as np  # noqa: E402  (after matplotlib.use: the headless backend first)
import polars as pl  # noqa: E402  (after matplotlib.use: the headless backend first)
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter  # noqa: E402  (after matplotlib.use)

from crossdiff.io import atomic_path  # noqa: E402  (after matplotlib.use: the headless backend first)

# The one palette. A latent's colour means the same thing in every figure: Δnorm classes (Fig. 1c), the
# synthetic pair's true feature kinds, and the causal KL conditions (Fig. 5).
PALETTE = {
    "base_only": "tab:purple", "shared": "tab:red", "chat_only": "tab:blue", "other": "0.6",
    "shrinkage": "tab:orange", "decoupled": "tab:brown", "unmatched": "0.7",
    "none": "0.55", "all": "0.3", "template": "tab:olive", "delta_norm_best": "tab:cyan",
    "delta_norm_worst": "paleturquoise", "nu_best": "tab:green", "nu_worst": "palegreen",
    # the sweep: the Pareto front, the params' own point, and one colour per dictionary size (in order)
    "front": "0.2", "chosen": "black", "series": ("tab:cyan", "tab:pink", "tab:olive", "tab:gray", "goldenrod"),
}
LABELS = {"chat_only": "chat-only", "shared": "shared", "base_only": "base-only", "other": "other",
          "none": "None", "all": "All", "template": "Template", "delta_norm_best": "Δnorm\nbest 50%",
          "delta_norm_worst": "Δnorm\nworst 50%", "nu_best": "ν (ours)\nbest 50%", "nu_worst": "ν (ours)\nworst 50%"}
TRUE_KINDS = ("shared", "chat_only", "base_only", "shrinkage", "decoupled", "unmatched")  # synthetic legend order
FORMATS = ("png", "svg")
DPI = 120


def _save(fig, path: str | Path) -> Path:
    """Write `fig` to `path` (format from its suffix) via a temp file renamed into place, then close it."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise ValueError(f"figure path {path}: suffix must be one of {FORMATS}")
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format=fmt)
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
        ax.scatter(x, y, s=size, alpha=alpha, c=PALETTE[k], label=f"{LABELS[k]} ({len(x)})", linewidths=0)
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
        ax.axvspan(lo, hi, color=PALETTE[k], alpha=0.12, label=f"{LABELS[k]} {lo}–{hi}")
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
        ax.hist(v, bins=40, color=PALETTE[k])
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
                color=[PALETTE["chat_only"], PALETTE["unmatched"]], label=[f"f_template > {template_share:g}", "other"])
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


# ---- causal KL (Fig. 5) --------------------------------------------------------------------------------------

def kl_figure(path: str | Path, table: pl.DataFrame, source: str = "all", title: str = "",
              first_tokens: Sequence[int] = (2, 10)) -> Path:
    """Paper Fig. 5: mean KL per condition with 95% CIs, (a) full responses, (b) the first-tokens mask.

    Masks and conditions are drawn in the kl.parquet row order (causal.MASKS × causal.CONDITIONS)."""
    sub = table.filter(pl.col("source") == source)
    masks = sub["mask"].unique(maintain_order=True).to_list()
    fig, axes = plt.subplots(1, len(masks), figsize=(5.2 * len(masks), 3.6), squeeze=False)
    for ax, mask in zip(axes[0], masks):
        df = {r["condition"]: r for r in sub.filter(pl.col("mask") == mask).iter_rows(named=True)}
        conds = list(df)
        means = np.array([np.nan if df[c]["mean"] is None else df[c]["mean"] for c in conds], float)
        lo = np.array([np.nan if df[c]["ci_low"] is None else df[c]["ci_low"] for c in conds], float)
        hi = np.array([np.nan if df[c]["ci_high"] is None else df[c]["ci_high"] for c in conds], float)
        x = np.arange(len(conds))
        ax.bar(x, np.nan_to_num(means), color=[PALETTE[c] for c in conds],
               yerr=np.nan_to_num(np.stack([means - lo, hi - means])), capsize=3)
        for xi, m in zip(x, means):
            if np.isnan(m):
                ax.text(xi, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, [LABELS[c] for c in conds], fontsize=7)
        n = next(iter(df.values()))["n_tokens"] if df else 0
        what = "full responses" if mask == "full" else f"response tokens {first_tokens[0]}–{first_tokens[1]}"
        ax.set_title(f"{what} ({n} tokens)", fontsize=9)
        ax.set_ylabel("KL(chat ‖ patched)")
    fig.suptitle(title or f"causal KL ({source})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


# ---- synthetic ground truth (validate stage) -----------------------------------------------------------------

def truth_nu_scatter(path: str | Path, runs: Mapping[str, tuple]) -> Path:
    """Fig. 1 on ground truth: ν^r (x) vs ν^ε (y) of the Δnorm chat-only latents, coloured by their true kind.

    `runs`: variant -> (latent table, matched kind per latent). Points are clipped to [-0.2, 1.4] like the
    paper's zoom; shared-class latents matched to shared features are drawn faintly for reference.
    """
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4.5), squeeze=False)
    for ax, (name, (table, kind)) in zip(axes[0], runs.items()):
        t = table.sort("latent")
        klass, dead = t["klass"].to_numpy().astype(str), t["dead"].to_numpy().astype(bool)
        x = np.clip(t["nu_r"].to_numpy().astype(float), -0.2, 1.4)
        y = np.clip(t["nu_eps"].to_numpy().astype(float), -0.2, 1.4)
        ref = ~dead & (klass == "shared") & (kind == "shared")
        ax.scatter(x[ref], y[ref], s=4, c=PALETTE["shared"], alpha=0.15, label="shared class (ref.)")
        for k in TRUE_KINDS:
            sel = ~dead & (klass == "chat_only") & (kind == k)
            if sel.any():
                ax.scatter(x[sel], y[sel], s=18, c=PALETTE[k], edgecolors="k", linewidths=0.3,
                           label=f"{k} ({sel.sum()})")
        ax.set(title=f"{name}: Δnorm chat-only latents by true kind", xlabel="ν^r", ylabel="ν^ε",
               xlim=(-0.25, 1.45), ylim=(-0.25, 1.45))
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    return _save(fig, path)


def truth_delta_norm_by_kind(path: str | Path, runs: Mapping[str, tuple], bands: Mapping[str, list]) -> Path:
    """Δnorm (eq. 4) histograms of alive latents grouped by the kind of the true feature they match."""
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    bins = np.linspace(0, 1, 41)
    for ax, (name, (table, kind)) in zip(axes[0], runs.items()):
        t = table.sort("latent")
        dn, dead = t["delta_norm"].to_numpy().astype(float), t["dead"].to_numpy().astype(bool)
        for k in TRUE_KINDS:
            sel = ~dead & (kind == k)
            if sel.any():
                ax.hist(dn[sel], bins=bins, histtype="step", color=PALETTE[k], linewidth=1.5,
                        label=f"{k} ({sel.sum()})")
        for lo, hi in bands.values():
            ax.axvspan(lo, hi, color="0.9", zorder=0)
        ax.set(title=f"{name}: Δnorm by true kind", xlabel="Δnorm", ylabel="latents", yscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


# ---- the sparsity × expansion sweep ----------------------------------------------------------------------------

def sweep_front(path: str | Path, table: pl.DataFrame, knob: str = "k", title: str = "") -> Path:
    """Left: val FVE vs L0 of every sweep point (colour = expansion, label = its k or target L0), the Pareto
    front as a line, the params' own point ringed. Right: the dead fraction (dotted) and the opposed share
    (dashed: latents whose base and chat decoders point opposite ways, crossdiff.health) against L0.

    `table`: crossdiff.sweep.table (sparsity, expansion, fve, l0, dead, opposed, on_front, chosen)."""
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colours = PALETTE["series"]
    for i, x in enumerate(sorted(table["expansion"].unique().to_list())):
        t = table.filter(pl.col("expansion") == x).sort("l0")
        c = colours[i % len(colours)]
        for a, y, name in ((ax, "fve", ""), (ax2, "dead", "dead, ")):
            a.plot(t["l0"].to_numpy(), t[y].to_numpy(), "o:", color=c, ms=6, lw=0.8, label=f"{name}expansion {x}")
        ax2.plot(t["l0"].to_numpy(), t["opposed"].to_numpy(), "s--", color=c, ms=4, lw=0.8,
                 label=f"opposed, expansion {x}")
        for r in t.iter_rows(named=True):
            ax.annotate(f"{knob}={r['sparsity']}", (r["l0"], r["fve"]), fontsize=7, xytext=(4, -9),
                        textcoords="offset points")
    front = table.filter("on_front").sort("l0")
    ax.plot(front["l0"].to_numpy(), front["fve"].to_numpy(), "-", color=PALETTE["front"], lw=1.5, zorder=0,
            label=f"Pareto front ({front.height})")
    pick = table.filter("chosen")
    for a, y in ((ax, "fve"), (ax2, "dead")):
        if pick.height:
            a.scatter(pick["l0"].to_numpy(), pick[y].to_numpy(), s=160, facecolors="none",
                      edgecolors=PALETTE["chosen"], linewidths=1.5, label="params' own point", zorder=3)
        a.set_xscale("log")
        a.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        a.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        a.xaxis.set_minor_formatter(NullFormatter())
        a.set_xlabel("val L0 (active latents per token)")
    ax.set(ylabel="val FVE", title=(title or f"FVE vs L0 over {knob} × expansion")
           + ("" if pick.height else "\n(the params' own point is not in the grid)"))
    top = np.nanmax(table.select("dead", "opposed").to_numpy(), initial=0.05)
    ax2.set(ylabel="share of latents", title="dead (dotted) and opposed (dashed) latents", ylim=(0, top * 1.1))
    ax.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
