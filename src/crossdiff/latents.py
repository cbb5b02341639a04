"""Per-latent statistics and the latent table (DESIGN §3): decoder norms, Δnorm classes (eq. 4), decoder
cosine, activation frequency, template share, max activation, and Latent Scaling (scaling.py) for every
latent; the summary numbers of the paper's §3 / A.13; the cross-variant comparison of Fig. 8.

Decoder quantities (Δnorm, ν) are in the crosscoder's training space, its `normalisation` (what the sparsity
terms see); `normalisation_space` says which, for metrics.json and the report.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from scipy import stats as sps
from torch import Tensor
from tqdm import tqdm

from crossdiff.cache import ActivationCache
from crossdiff.crosscoder import CONFIG, WEIGHTS, CrossCoder
from crossdiff.scaling import ScalingStats, latent_scaling

log = logging.getLogger(__name__)

CLASSES = ("base_only", "shared", "chat_only", "other")
SCALING_COLUMNS = ("beta_err_base", "beta_err_chat", "beta_rec_base", "beta_rec_chat", "nu_eps", "nu_r")
COLUMNS = ("latent", "norm_base", "norm_chat", "delta_norm", "klass", "cos_sim", "freq", "dead", "f_template",
           *SCALING_COLUMNS, "max_act", "rank_nu")
DEAD_FREQ = 1e-6  # params.yaml `analysis.dead_freq` (a test keeps them equal), for sections built by hand
F_TEMPLATE = "share of a latent's positive activations (count, not mass) on template tokens"


# ---------------------------------------------------------------------------- decoder statistics

def delta_norm(norm_base: np.ndarray, norm_chat: np.ndarray) -> np.ndarray:
    """Relative decoder norm difference (eq. 4); NaN when both norms are 0."""
    norm_base, norm_chat = np.asarray(norm_base, float), np.asarray(norm_chat, float)
    mx = np.maximum(norm_base, norm_chat)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mx > 0, 0.5 * ((norm_chat - norm_base) / mx + 1), np.nan)  # eq. 4


def classify(dn: np.ndarray, bands: Mapping[str, list]) -> np.ndarray:
    """Δnorm classes (DESIGN §4) with the paper's boundary semantics: base_only [lo, hi), shared [lo, hi],
    chat_only (lo, hi], anything else (including NaN) `other`."""
    dn = np.asarray(dn, float)
    missing = {"base_only", "shared", "chat_only"} - set(bands)
    if missing:
        raise ValueError(f"analysis.classes lacks bands {sorted(missing)}")
    (b0, b1), (s0, s1), (c0, c1) = bands["base_only"], bands["shared"], bands["chat_only"]
    if not (b0 <= b1 <= s0 <= s1 <= c0 <= c1):
        raise ValueError(f"Δnorm bands must be ordered base_only <= shared <= chat_only, got {dict(bands)}")
    out = np.full(dn.shape, "other", dtype=object)
    out[(dn >= b0) & (dn < b1)] = "base_only"
    out[(dn >= s0) & (dn <= s1)] = "shared"
    out[(dn > c0) & (dn <= c1)] = "chat_only"
    return out


def decoder_cosine(W_dec: Tensor) -> np.ndarray:
    """cos(d_j^base, d_j^chat) (D,) (Fig. 10); NaN when either decoder is 0."""
    W = W_dec.detach().double().cpu()
    norms = W.norm(dim=-1)
    dot = (W[0] * W[1]).sum(-1)
    den = norms[0] * norms[1]
    return torch.where(den > 0, dot / den.clamp_min(1e-300), torch.full_like(dot, float("nan"))).numpy()


SPACES = {  # what Δnorm (eq. 4) and ν (eq. 5) mean in each training space (crosscoder.scale_from_norms)
    "per_model": "each model scaled to mean norm √d: Δnorm compares norms relative to each model's scale, "
                 "ν = r · ν_raw (r = E‖h_chat‖ / E‖h_base‖)",
    "shared": "one scale for both models: Δnorm and ν equal their raw-activation values",
    "none": "raw activations (as the paper): Δnorm and ν are raw-space values",
}


def normalisation_space(crosscoder_dir: str | Path) -> dict:
    """The space Δnorm and ν of this crosscoder are in: its training normalisation, the scales s (base, chat),
    r from the cache it was trained on, and ν_raw / ν = s_chat / s_base (β^m scales with s_m, eq. 30)."""
    from safetensors import safe_open

    crosscoder_dir = Path(crosscoder_dir)
    cfg = json.loads((crosscoder_dir / CONFIG).read_text())
    with safe_open(str(crosscoder_dir / WEIGHTS), "pt") as f:
        sb, sc = (float(v) for v in f.get_tensor("scale"))
    mode = cfg.get("normalisation", "per_model")      # checkpoints before the option were all per_model
    cache = cfg.get("extra", {}).get("cache", {})
    nb, nc = cache.get("norm_base"), cache.get("norm_chat")
    return {"normalisation": mode, "scale": [sb, sc], "norm_ratio": nc / nb if nb and nc else None,
            "nu_to_raw": sc / sb, "meaning": SPACES[mode]}


# ------------------------------------------------------------------------- activation statistics

@dataclass
class ActivationStats:
    """Counts over a token stream: how often each latent fires, how often on template tokens, its max."""

    n_tokens: int
    fired: np.ndarray        # (D,) #{n : f_nj > 0}
    on_template: np.ndarray  # (D,) #{n : f_nj > 0, token n is a template token}
    max_act: np.ndarray      # (D,)


@torch.no_grad()
def activation_stats(crosscoder: CrossCoder, batches: Iterable[Mapping[str, Tensor]], total: int | None = None,
                     progress: bool = True) -> ActivationStats:
    """One pass over {"acts": (B, 2, d) raw, "template": (B,) bool} batches with the inference encode."""
    p = crosscoder.W_dec
    D = p.shape[1]
    fired = torch.zeros(D, dtype=torch.long, device=p.device)
    on_tmpl = torch.zeros_like(fired)
    mx = torch.zeros(D, dtype=p.dtype, device=p.device)
    n = 0
    for b in tqdm(batches, total=total, desc="latent stats", unit="batch", disable=not progress):
        f = crosscoder.encode(b["acts"].to(p.device, p.dtype))
        active = f > 0
        fired += active.sum(0)
        on_tmpl += active[b["template"].to(p.device).bool()].sum(0)
        torch.maximum(mx, f.amax(0), out=mx)
        n += f.shape[0]
    return ActivationStats(n, fired.cpu().numpy(), on_tmpl.cpu().numpy(), mx.float().cpu().numpy())


# ---------------------------------------------------------------------------------- latent table

def build_latent_table(crosscoder: CrossCoder, acts: ActivationStats, scaling: ScalingStats, params: Mapping) -> pl.DataFrame:
    """The latent table (DESIGN §3 + max_act, rank_nu). Latent Scaling columns are null for dead latents and
    for latents that never fired in the scaling tokens (no data, not NaN noise)."""
    norms = crosscoder.decoder_norms().detach().double().cpu().numpy()
    D = norms.shape[1]
    if acts.fired.shape != (D,) or scaling.ff.shape != (D,):
        raise ValueError("activation / scaling statistics do not match the crosscoder's dictionary size")
    dn = delta_norm(norms[0], norms[1])
    freq = acts.fired / max(acts.n_tokens, 1)
    dead = (acts.fired == 0) | (freq < params.get("dead_freq", DEAD_FREQ))
    with np.errstate(divide="ignore", invalid="ignore"):
        f_template = np.where(acts.fired > 0, acts.on_template / np.maximum(acts.fired, 1), np.nan)
    betas = scaling.betas(crosscoder.W_dec)
    cols = {"latent": np.arange(D, dtype=np.int64), "norm_base": norms[0], "norm_chat": norms[1], "delta_norm": dn,
            "klass": classify(dn, params["classes"]).astype(str), "cos_sim": decoder_cosine(crosscoder.W_dec),
            "freq": freq, "dead": dead, "f_template": f_template,
            **{c: np.where(dead, np.nan, betas[c]) for c in SCALING_COLUMNS}, "max_act": acts.max_act.astype(float)}
    df = pl.DataFrame({k: pl.Series(k, v, nan_to_null=v.dtype.kind == "f") for k, v in cols.items()})
    return add_rank_nu(df)


def add_rank_nu(df: pl.DataFrame, pool: pl.Expr = pl.col("klass") == "chat_only") -> pl.DataFrame:
    """rank(|ν^ε|) + rank(|ν^r|) among the pool's latents with both ν, by default the chat-only ones (ascending:
    2 = most chat-specific; ranks of absolute values as in Tables 3/4); null elsewhere. The causal experiment
    ranks signed ν over the authors' filtered pool instead (causal.ranked_pools); this is its `legacy` pool."""
    live = pool & pl.col("nu_eps").is_not_null() & pl.col("nu_r").is_not_null()
    rank = lambda c: pl.when(live).then(pl.col(c).abs()).otherwise(None).rank("ordinal")
    return df.with_columns(rank_nu=(rank("nu_eps") + rank("nu_r")).cast(pl.Int64))


def analyse(crosscoder_dir: str | Path, train: str | Path, val: str | Path, params: Mapping, device="cpu",
            progress: bool = True) -> pl.DataFrame:
    """The latent table of one crosscoder: activation statistics over the val cache, Latent Scaling over the
    first `scaling_tokens` rows of the train cache (`params` = the `analysis:` section)."""
    cc = CrossCoder.load(crosscoder_dir, device=device).eval()
    bs = int(params.get("batch_size", 4096))
    val_cache, train_cache = ActivationCache(val), ActivationCache(train)
    for c in (val_cache, train_cache):
        if c.d_model != cc.cfg.d_model:
            raise ValueError(f"{c.path}: d_model {c.d_model} != crosscoder's {cc.cfg.d_model}")
    acts = activation_stats(cc, val_cache.iter_sequential(bs, fields=("acts", "template"), device=device),
                            total=-(-val_cache.n // bs), progress=progress)
    n_scale = min(int(params["scaling_tokens"]), train_cache.n)
    if n_scale < params["scaling_tokens"]:
        log.warning("%s has %d rows < analysis.scaling_tokens=%d; using all of them", train, train_cache.n,
                    params["scaling_tokens"])
    batches = (b["acts"] for b in train_cache.iter_sequential(bs, fields=("acts",), limit=n_scale, device=device))
    scaling = latent_scaling(cc, batches, total=n_scale, progress=progress)
    return build_latent_table(cc, acts, scaling, params)


# ---------------------------------------------------------------------------------------- metrics

def _share(x: np.ndarray, cond: np.ndarray):
    return float(cond.mean()) if len(x) else None


def robust_counts(table: pl.DataFrame, thresholds: Iterable[float]) -> list[dict]:
    """Fig. 8: number of latents of `table` with ν^ε < π and ν^r < π, per threshold π."""
    e, r = (table[c].fill_null(np.nan).to_numpy() for c in ("nu_eps", "nu_r"))
    return [{"pi": float(p), "n": int(((e < p) & (r < p)).sum())} for p in thresholds]


def summarise(table: pl.DataFrame, params: Mapping) -> dict:
    """metrics.json of one variant: Fig. 1c counts, ν^r overlap with shared (§3, A.11), Fig. 8 counts,
    template shares (§3), Spearman of ν with frequency (A.13). Dead latents are excluded throughout."""
    alive = table.filter(~pl.col("dead"))
    chat = alive.filter(pl.col("klass") == "chat_only")
    shared_r = alive.filter(pl.col("klass") == "shared")["nu_r"].drop_nulls().to_numpy()
    chat_r = chat["nu_r"].drop_nulls().to_numpy()
    overlap = {}
    for name, (lo, hi) in (("central_95", (0.025, 0.975)), ("central_50", (0.25, 0.75))):
        if len(shared_r) and len(chat_r):
            a, b = np.quantile(shared_r, [lo, hi])
            overlap[name] = {"shared_range": [float(a), float(b)],
                             "chat_only_share": _share(chat_r, (chat_r >= a) & (chat_r <= b))}
        else:
            overlap[name] = {"shared_range": None, "chat_only_share": None}
    ft = chat["f_template"].drop_nulls().to_numpy()
    spearman = {}
    for c in ("nu_eps", "nu_r"):
        sub = chat.select(c, "freq").drop_nulls()
        if sub.height >= 3 and sub[c].n_unique() > 1 and sub["freq"].n_unique() > 1:
            rho, p = sps.spearmanr(sub[c].to_numpy(), sub["freq"].to_numpy())
            spearman[c] = {"rho": float(rho), "p": float(p), "n": sub.height}
        else:
            spearman[c] = {"rho": None, "p": None, "n": sub.height}

    def medians(df):
        return {c: (float(np.median(v)) if len(v := df[c].drop_nulls().to_numpy()) else None) for c in ("nu_eps", "nu_r")}

    return {
        "n_latents": table.height, "n_dead": table.height - alive.height,
        "classes": {k: int((alive["klass"] == k).sum()) for k in CLASSES},   # Fig. 1c (alive latents)
        "nu_r_overlap_with_shared": overlap,                                # §3: 18% / A.11: 1.1%
        "robust_chat_only": robust_counts(chat, params["nu_thresholds"]),  # Fig. 8
        "template": {"definition": F_TEMPLATE, "n_chat_only": len(ft),      # §3: 40% / 67%
                     "over_half": _share(ft, ft > 0.5), "over_third": _share(ft, ft > 1 / 3)},
        "spearman_nu_freq_chat_only": spearman,                             # A.13
        "median_nu": {"chat_only": medians(chat), "shared": medians(alive.filter(pl.col("klass") == "shared"))},
        "freq_median": {k: (float(np.median(v)) if len(v := alive.filter(pl.col("klass") == k)["freq"].to_numpy()) else None)
                        for k in CLASSES},
    }


# ------------------------------------------------------------------------------- across variants

def top_by_delta_norm(table: pl.DataFrame, n: int) -> pl.DataFrame:
    """The n alive latents with the highest Δnorm (the paper's 'top-3176 BatchTopK latents', Fig. 8)."""
    return table.filter(~pl.col("dead") & pl.col("delta_norm").is_not_null()).sort(
        ["delta_norm", "latent"], descending=[True, False]).head(n)


def compare(tables: Mapping[str, pl.DataFrame], params: Mapping, grid: np.ndarray | None = None) -> tuple[dict, dict]:
    """Fig. 8 across variants: each variant's top-N latents by Δnorm, N = the largest chat-only count among
    the variants (the L1 crosscoder's in the paper); counts with ν^ε < π and ν^r < π. Returns (metrics, the
    curves on `grid` for the figure)."""
    if not tables:
        raise ValueError("no variants to compare")
    per = {name: summarise(t, params) for name, t in tables.items()}
    n_chat = {name: m["classes"]["chat_only"] for name, m in per.items()}
    ref = max(n_chat, key=lambda k: (n_chat[k], k))
    n = n_chat[ref]
    grid = np.linspace(0, 1, 101) if grid is None else grid
    tops = {name: top_by_delta_norm(t, n) for name, t in tables.items()}
    curves = {name: [c["n"] for c in robust_counts(top, grid)] for name, top in tops.items()}
    metrics = {
        "top_n": n, "top_n_from": ref,
        "robust_top_n": {name: robust_counts(top, params["nu_thresholds"]) for name, top in tops.items()},
        "top_n_min_delta_norm": {name: (float(top["delta_norm"].min()) if top.height else None) for name, top in tops.items()},
        "variants": {name: {"chat_only": m["classes"]["chat_only"], "shared": m["classes"]["shared"],
                            "base_only": m["classes"]["base_only"], "other": m["classes"]["other"], "dead": m["n_dead"],
                            "nu_r_in_shared_central_95": m["nu_r_overlap_with_shared"]["central_95"]["chat_only_share"],
                            "nu_r_in_shared_central_50": m["nu_r_overlap_with_shared"]["central_50"]["chat_only_share"],
                            "template_over_half": m["template"]["over_half"],
                            "template_over_third": m["template"]["over_third"],
                            "median_nu_eps_chat_only": m["median_nu"]["chat_only"]["nu_eps"],
                            "median_nu_r_chat_only": m["median_nu"]["chat_only"]["nu_r"],
                            "spearman_nu_eps_freq": m["spearman_nu_freq_chat_only"]["nu_eps"]["rho"],
                            "spearman_nu_r_freq": m["spearman_nu_freq_chat_only"]["nu_r"]["rho"]}
                     for name, m in per.items()},
    }
    return metrics, {"grid": grid.tolist(), "counts": curves, "n": n}
