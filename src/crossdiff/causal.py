"""Causal KL evaluation (paper A.8, Fig. 5-7): do the chat-specific latents carry the chat model's behaviour?

At layer L we build a patched residual h' from the base model's h_base, run the CHAT model's remaining layers
on it, and measure KL(p_chat ‖ p_patched) per token over assistant-response predictions. Conditions:
    none        h' = h_base
    all         h' = h_base + Σ_j f_j (d_j^chat − d_j^base) over every latent
    template    h_base with the chat-template positions replaced by h_chat
    {delta_norm,nu}_{best,worst}   the sum over the best / worst half of one pool of chat-only latents ranked
                by Δnorm (eq. 4, higher = more chat-only) or by rank(ν^ε) + rank(ν^r) (A.8, lower = more
                chat-only). The pool (`causal.pool`, see `ranked_pools`) is by default the authors': chat-only
                latents with both ν defined and in [-0.1, 2], ranked by signed ν, the same pool for both halves
with f = encode([h_base, h_chat]) (θ-thresholded for BatchTopK, eq. 10) and decoders in raw units, as the
authors' code does it. Means over tokens come with 95% bootstrap CIs that resample whole conversations (tokens
of one conversation are correlated, so resampling tokens would understate the uncertainty).

Positions. Logits at position t predict token t+1; a prediction belongs to a response when its target is an
assistant-content token (`data.template_mask`'s `assistant`; the closing end-of-turn marker is template).
"full" = every response token; "first" = response tokens `first_tokens` (1-based, inclusive; default 2-10 =
the first 10 predictions minus the one made at the template newline, where Template is trivially favoured).
The crosscoder never saw BOS (the cache excludes it), so latent patches leave BOS positions at h_base.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from crossdiff import io, latents
from crossdiff.cli import resolve_device
from crossdiff.config import Runtime
from crossdiff.crosscoder import CrossCoder
from crossdiff.models import hidden_and_logits, hidden_at_layer, load_pair, logits_from_layer
from crossdiff.report.figures import kl_figure

log = logging.getLogger(__name__)

CONDITIONS = ("none", "all", "template", "delta_norm_best", "delta_norm_worst", "nu_best", "nu_worst")
RANKINGS = ("delta_norm", "nu")
MASKS = ("full", "first")
SOURCES = ("all", "generated", "heldout")
POOLS = ("authors", "legacy")  # params.yaml `causal.pool` (first = default; a test keeps them equal)
NU_RANGE = (-0.1, 2.0)         # params.yaml `causal.nu_range`: the authors' filter on ν^ε and ν^r, both ends kept


# ---- masks and latent sets ----------------------------------------------------------------------------------

def response_masks(assistant: Sequence[bool], first: Sequence[int] = (2, 10)) -> tuple[np.ndarray, np.ndarray]:
    """Over prediction positions t (the logits at t predict token t+1): `full` = the target is a response token;
    `first` = the target is the k-th token of its response (each contiguous assistant run) with lo <= k <= hi."""
    lo, hi = first
    if not 1 <= lo <= hi:
        raise ValueError(f"first_tokens must be 1 <= lo <= hi (1-based, inclusive), got {list(first)}")
    target = np.asarray(assistant, dtype=bool)[1:]
    idx = np.arange(len(target))
    starts = target & ~np.r_[False, target[:-1]]
    k = idx - np.maximum.accumulate(np.where(starts, idx, 0)) + 1  # 1-based index of the target in its response
    full, first_m = np.zeros(len(target) + 1, bool), np.zeros(len(target) + 1, bool)
    full[:-1] = target
    first_m[:-1] = target & (k >= lo) & (k <= hi)
    return full, first_m


def _by_delta_norm(df: pl.DataFrame) -> pl.DataFrame:
    return df.filter(pl.col("delta_norm").is_not_null()).sort(["delta_norm", "latent"], descending=[True, False])


def _candidates(table: pl.DataFrame, top_n: int | None) -> pl.DataFrame:
    """Live chat-only latents, or with `top_n` the top_n live latents of highest Δnorm (the stand-in for a
    crosscoder whose chat-only class is too small to halve, as for a BatchTopK crosscoder on a small pair)."""
    live = table.filter(~pl.col("dead").fill_null(False)) if "dead" in table.columns else table
    return live.filter(pl.col("klass") == "chat_only") if top_n is None else _by_delta_norm(live).head(top_n)


def ranked_pools(table: pl.DataFrame, pool: str = POOLS[0], top_n: int | None = None,
                 nu_range: Sequence[float] = NU_RANGE) -> dict[str, pl.DataFrame]:
    """The latents each ranking halves, best first: {"delta_norm": Δnorm descending (eq. 4, higher = more
    chat-only), "nu": ν ranking ascending (lower = more chat-only)}.

    authors: one pool for both rankings, the authors' A.8 set: the candidates with ν^ε and ν^r both defined
        (not null / NaN) and lo <= ν <= hi (`nu_range`, both ends kept), ranked on ν by
        rank(ν^ε) + rank(ν^r) of the SIGNED values within the pool (A.8's "combined low ν^ε/ν^r"; ν^ε, ν^r =
        β^base/β^chat of eq. 5 with the targets of eqs. 31-34, A.6).
    legacy: Δnorm over every candidate, ν over the candidates with both ν by the table's rank_nu
        (rank(|ν^ε|) + rank(|ν^r|), the absolute-value ranks of Tables 3/4), re-ranked within a top_n pool.
    Ties break by latent id."""
    if pool not in POOLS:
        raise ValueError(f"params key `causal.pool`: {pool!r} is not one of {list(POOLS)}")
    lo, hi = (float(x) for x in nu_range)
    if not lo <= hi:
        raise ValueError(f"params key `causal.nu_range`: need lo <= hi, got {list(nu_range)}")
    need = {"latent", "klass", "delta_norm"} | ({"nu_eps", "nu_r"} if pool == "authors" else {"rank_nu"})
    if need - set(table.columns):
        raise ValueError(f"the latent table lacks columns {sorted(need - set(table.columns))} (causal.pool: {pool})")
    cand = _candidates(table, top_n)
    if pool == "legacy":
        if top_n is not None:  # ν re-ranked within the pool
            cand = latents.add_rank_nu(cand.drop("rank_nu"), pool=pl.lit(True))
        return {"delta_norm": _by_delta_norm(cand),
                "nu": cand.filter(pl.col("rank_nu").is_not_null()).sort(["rank_nu", "latent"])}
    inside = lambda c: pl.col(c).fill_nan(None).is_between(lo, hi, closed="both")  # null -> dropped
    kept = cand.filter(inside("nu_eps") & inside("nu_r") & pl.col("delta_norm").is_not_null()).sort("latent")
    kept = kept.with_columns(nu_rank=pl.col("nu_eps").rank("ordinal") + pl.col("nu_r").rank("ordinal"))  # A.8, signed ν
    return {"delta_norm": _by_delta_norm(kept), "nu": kept.sort(["nu_rank", "latent"])}


def latent_sets(table: pl.DataFrame, top_n: int | None = None, pool: str = POOLS[0],
                nu_range: Sequence[float] = NU_RANGE) -> dict[str, np.ndarray | None]:
    """Best / worst half of each ranking of `ranked_pools` (paper A.8: top / bottom 50%). Halves have equal
    size (the middle latent of an odd pool is in neither); a ranking over fewer than 2 latents gives None."""
    sets: dict[str, np.ndarray | None] = {}
    for name, df in ranked_pools(table, pool, top_n, nu_range).items():
        ids, half = df["latent"].to_numpy().astype(np.int64), df.height // 2
        sets[f"{name}_best"] = ids[:half] if half else None
        sets[f"{name}_worst"] = ids[df.height - half:] if half else None
    return sets


def pool_sizes(table: pl.DataFrame, top_n: int | None = None, nu_range: Sequence[float] = NU_RANGE) -> dict:
    """Latents ranked under each pool (for metrics.json): the candidates (live chat-only, or the top_n), and per
    pool and ranking how many latents are halved."""
    out = {"candidates": _candidates(table, top_n).height}
    for pool in POOLS:
        out[pool] = {name: df.height for name, df in ranked_pools(table, pool, top_n, nu_range).items()}
    return out


# ---- patching and KL ----------------------------------------------------------------------------------------

def kl_divergence(ref_logits: Tensor, logits: Tensor, chunk: int = 1024) -> Tensor:
    """KL(p_ref ‖ p) per row of (n, V) logits, computed `chunk` rows at a time in float32 so no (n, V) float32
    tensor is ever materialised: Σ_v p_ref (log p_ref − log p)."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    out = torch.empty(ref_logits.shape[0], dtype=torch.float32, device=logits.device)
    for i in range(0, ref_logits.shape[0], chunk):
        lp = torch.log_softmax(ref_logits[i : i + chunk].float(), dim=-1)
        lq = torch.log_softmax(logits[i : i + chunk].float(), dim=-1)
        out[i : i + chunk] = F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1)  # KL(p_chat ‖ p_patched)
    return out


def latent_patch(f: Tensor, decoder_diff: Tensor, latents: Tensor | None) -> Tensor:
    """Σ_{j∈S} f_j (d_j^chat − d_j^base) for rows of f (M, D); `latents` None = every latent (A.8)."""
    if latents is None:
        return f @ decoder_diff
    return f[:, latents] @ decoder_diff[latents]


@dataclass
class TokenKL:
    """Per scored token: its conversation, whether it is in the `first` mask, and KL per condition (NaN where a
    condition has no latent set)."""
    seq: np.ndarray
    first: np.ndarray
    kl: dict[str, np.ndarray]


def _batch(rows: Sequence[dict], pad_id: int, first: Sequence[int], device) -> dict[str, Tensor]:
    """Right-padded tensors (real tokens keep positions 0..n-1, as in the full forward)."""
    T = max(len(r["input_ids"]) for r in rows)
    out = {k: torch.zeros(len(rows), T, dtype=torch.bool) for k in ("att", "template", "full", "first")}
    out["ids"] = torch.full((len(rows), T), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        full, first_m = response_masks(r["assistant"], first)
        out["ids"][i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        out["att"][i, :n] = True
        out["template"][i, :n] = torch.tensor(r["template"], dtype=torch.bool)
        out["full"][i, :n], out["first"][i, :n] = torch.from_numpy(full), torch.from_numpy(first_m)
    return {k: v.to(device) for k, v in out.items()}


@torch.inference_mode()
def evaluate(base, chat, crosscoder, eval_set: pl.DataFrame, layer: int, sets: Mapping[str, np.ndarray | None],
             first: Sequence[int] = (2, 10), batch_size: int = 16, bos_id: int | None = None, pad_id: int = 0,
             chunk: int = 1024, conditions: Sequence[str] = CONDITIONS) -> TokenKL:
    """KL(p_chat ‖ p_patched) at every response prediction of `eval_set`, per condition (module docstring)."""
    unknown = set(conditions) - set(CONDITIONS)
    if unknown:
        raise ValueError(f"unknown conditions {sorted(unknown)}; known: {CONDITIONS}")
    missing = [c for c in conditions if c not in ("none", "all", "template") and c not in sets]
    if missing:
        raise KeyError(f"no latent set for conditions {missing} (see latent_sets)")
    device = next(chat.parameters()).device
    dtype = next(chat.parameters()).dtype
    raw = crosscoder.decoder_raw().float()
    diff = (raw[1] - raw[0]).to(device)  # d_j^chat − d_j^base in raw units, (D, d)
    idx = {k: None if v is None else torch.as_tensor(v, dtype=torch.long, device=device) for k, v in sets.items()}
    rows = sorted(eval_set.select("seq", "input_ids", "template", "assistant").iter_rows(named=True),
                  key=lambda r: len(r["input_ids"]))  # length-sorted batches waste little on padding
    seqs, firsts, kls = [], [], {c: [] for c in conditions}
    for i in tqdm(range(0, len(rows), batch_size), desc="causal KL", unit="batch"):
        b = _batch(rows[i : i + batch_size], pad_id, first, device)
        if not b["full"].any():
            continue
        att = b["att"].long()
        h_base = hidden_at_layer(base, b["ids"], att, layer)
        h_chat, ref = hidden_and_logits(chat, b["ids"], att, layer)  # the true chat outputs, one pass
        ref = ref[b["full"]]
        patchable = b["att"] if bos_id is None else b["att"] & (b["ids"] != bos_id)
        f = crosscoder.encode(torch.stack([h_base[patchable], h_chat[patchable]], dim=1).float())  # eq. 1 / eq. 10
        for c in conditions:
            h = h_base.clone()
            if c == "template":
                h[b["template"]] = h_chat[b["template"]]
            elif c != "none":
                latents = None if c == "all" else idx[c]
                if latents is None and c != "all":  # fewer than 2 chat-only latents: nothing to compare
                    kls[c].append(torch.full((ref.shape[0],), float("nan")))
                    continue
                h[patchable] = (h_base[patchable].float() + latent_patch(f, diff, latents)).to(dtype)  # A.8
            kls[c].append(kl_divergence(ref, logits_from_layer(chat, h, att, layer)[b["full"]], chunk).cpu())
        seqs.append(torch.tensor([r["seq"] for r in rows[i : i + batch_size]])[:, None].expand_as(b["full"])[b["full"].cpu()])
        firsts.append(b["first"][b["full"]].cpu())
    if not seqs:
        raise ValueError("the evaluation set has no assistant-response token to score")
    return TokenKL(torch.cat(seqs).numpy(), torch.cat(firsts).numpy(),
                   {c: torch.cat(v).double().numpy() for c, v in kls.items()})


# ---- statistics ---------------------------------------------------------------------------------------------

def conversation_bootstrap(values: np.ndarray, groups: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Token means of each row of `values` (C, N) and their bootstrap replicates (C, n_boot), resampling the
    conversations `groups` (N,) with replacement: mean* = Σ_s w_s sum_s / Σ_s w_s n_s, w ~ Multinomial(S, 1/S).
    All rows share the resamples, so differences between conditions get paired CIs."""
    values = np.atleast_2d(values)
    _, g = np.unique(groups, return_inverse=True)
    S = g.max() + 1
    sums = np.stack([np.bincount(g, weights=v, minlength=S) for v in values])  # (C, S)
    counts = np.bincount(g, minlength=S).astype(float)
    w = np.random.default_rng(seed).multinomial(S, np.full(S, 1.0 / S), size=n_boot).astype(float)  # (B, S)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums.sum(1) / counts.sum(), (w @ sums.T).T / (w @ counts)


def _ci(samples: np.ndarray) -> tuple[float, float]:
    if np.isnan(samples).all():
        return float("nan"), float("nan")
    lo, hi = np.nanpercentile(samples, [2.5, 97.5])
    return float(lo), float(hi)


def summarise(tokens: TokenKL, sources: Mapping[int, str], sets: Mapping[str, np.ndarray | None], variant: str,
              n_boot: int = 1000, seed: int = 0, n_latents_all: int | None = None) -> tuple[pl.DataFrame, dict]:
    """kl.parquet (one row per source × mask × condition) and metrics.json: means, 95% CIs, and for each ranking
    the paired best − worst difference (the paper's claim is best < worst)."""
    conds = list(tokens.kl)
    src = np.array([sources[int(s)] for s in tokens.seq])
    n_lat = {"none": 0, "all": n_latents_all, "template": 0} | {k: (None if v is None else len(v)) for k, v in sets.items()}
    rows, kl, order = [], {}, {}
    for source in SOURCES:
        for mask in MASKS:
            keep = (src == source if source != "all" else np.ones(len(src), bool)) & (tokens.first if mask == "first" else True)
            if not keep.any():
                continue
            means, boot = conversation_bootstrap(np.stack([tokens.kl[c][keep] for c in conds]), tokens.seq[keep], n_boot, seed)
            for k, c in enumerate(conds):
                lo, hi = _ci(boot[k])
                rows.append(dict(variant=variant, source=source, mask=mask, condition=c, n_tokens=int(keep.sum()),
                                 n_convs=len(np.unique(tokens.seq[keep])), mean=float(means[k]), ci_low=lo, ci_high=hi,
                                 n_latents=n_lat.get(c)))
                kl.setdefault(source, {}).setdefault(mask, {})[c] = dict(mean=float(means[k]), ci_low=lo, ci_high=hi)
            for r in RANKINGS:
                if f"{r}_best" not in conds:
                    continue
                b, w = conds.index(f"{r}_best"), conds.index(f"{r}_worst")
                d = float(means[b] - means[w])
                lo, hi = _ci(boot[b] - boot[w])
                order.setdefault(source, {}).setdefault(mask, {})[r] = dict(
                    best_minus_worst=d, ci_low=lo, ci_high=hi, best_lower=None if np.isnan(d) else bool(d < 0),
                    significant=None if np.isnan(d) else bool(hi < 0 or lo > 0))  # 95% paired CI excludes 0
    table = pl.DataFrame(rows, schema={"variant": pl.String, "source": pl.String, "mask": pl.String,
                                       "condition": pl.String, "n_tokens": pl.Int64, "n_convs": pl.Int64,
                                       "mean": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                       "n_latents": pl.Int64}).with_columns(pl.col("mean", "ci_low", "ci_high").fill_nan(None))
    notes = [f"{k}: fewer than 2 latents in this ranking's pool; no {k} condition" for k, v in sets.items() if v is None]
    metrics = {"variant": variant, "bootstrap": {"unit": "conversation", "replicates": n_boot, "level": 0.95, "seed": seed},
               "n_latents": n_lat, "kl": kl, "best_minus_worst": order, "notes": notes}
    return table, metrics


# ---- the stage ----------------------------------------------------------------------------------------------

def run_causal_kl(params: Mapping, base: str, chat: str, eval_set: str | Path, crosscoder: str | Path,
                  latent_table: str | Path, variant: str, out: str | Path, device: str | None = None) -> dict:
    """The causal_kl stage for one crosscoder: `params` = the {models, layer, causal, device} slice; writes
    {out}/kl.parquet, {out}/metrics.json (with both pools' sizes) and {out}/figures/kl_{source}.png."""
    cp, layer, rt = params["causal"], params["layer"], Runtime.from_params(params, device)
    pool, top_n, nu_range = cp.get("pool", POOLS[0]), cp.get("top_n"), cp.get("nu_range", NU_RANGE)
    dev = resolve_device(rt.device)
    t0 = time.perf_counter()
    table = pl.read_parquet(latent_table)
    sets = latent_sets(table, top_n=top_n, pool=pool, nu_range=nu_range)
    pair = load_pair(base, chat, layer=layer, dtype=rt.dtype, device=dev)
    cc = CrossCoder.load(crosscoder, device=dev)
    es = pl.read_parquet(eval_set)
    tok = pair.tokenizer
    tokens = evaluate(pair.base, pair.chat, cc, es, layer, sets, first=cp["first_tokens"], batch_size=cp["batch_size"],
                      bos_id=tok.bos_token_id, pad_id=tok.pad_token_id or 0)
    sources = dict(zip(es["seq"].to_list(), es["source"].to_list()))
    kl, metrics = summarise(tokens, sources, sets, variant, n_boot=cp["bootstrap"], seed=cp["seed"],
                            n_latents_all=cc.cfg.dict_size)
    log.info("mean KL(p_chat ‖ p_patched), all conversations:\n%s",
             kl.filter(pl.col("source") == "all").drop("variant", "source"))
    out = Path(out)
    io.write_parquet(out / "kl.parquet", kl)
    for source in kl["source"].unique(maintain_order=True):
        kl_figure(out / "figures" / f"kl_{source}.png", kl, source, title=f"{variant}: causal KL ({source})",
                  first_tokens=cp["first_tokens"])
    metrics = {**metrics, "pool": {"used": pool, "nu_range": [float(x) for x in nu_range], "top_n": top_n,
                                   "sizes": pool_sizes(table, top_n, nu_range)},
               "first_tokens": cp["first_tokens"], "seconds": round(time.perf_counter() - t0, 2)}
    io.write_json(out / "metrics.json", metrics)
    return metrics
