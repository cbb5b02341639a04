"""Causal KL evaluation (paper A.8, Fig. 5-7): do the chat-specific latents carry the chat model's behaviour?

At layer L we build a patched residual h' from the base model's h_base, run the CHAT model's remaining layers
on it, and measure KL(p_chat ‖ p_patched) per token over assistant-response predictions. Conditions:
    none        h' = h_base
    all         h' = h_base + Σ_j f_j (d_j^chat − d_j^base) over every latent
    template    h_base with the chat-template positions replaced by h_chat
    {delta_norm,nu}_{best,worst}   the sum over the best / worst half of the chat-only latents ranked by
                Δnorm (eq. 4, higher = more chat-only) or by rank(ν^ε) + rank(ν^r) (A.6, lower = more chat-only)
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
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from crossdiff import latents
from crossdiff.data import template_mask
from crossdiff.models import hidden_and_logits, hidden_at_layer, logits_from_layer

log = logging.getLogger(__name__)

CONDITIONS = ("none", "all", "template", "delta_norm_best", "delta_norm_worst", "nu_best", "nu_worst")
RANKINGS = ("delta_norm", "nu")
MASKS = ("full", "first")
SOURCES = ("all", "generated", "heldout")
EVAL_SCHEMA = {"seq": pl.Int64, "source": pl.String, "behaviour": pl.String, "prompt": pl.String,
               "input_ids": pl.List(pl.Int32), "template": pl.List(pl.Boolean), "assistant": pl.List(pl.Boolean),
               "text": pl.String}
_END_OF_TURN = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>")  # Gemma, Llama 3, ChatML, Phi


# ---- evaluation set ---------------------------------------------------------------------------------------

def stop_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: EOS (tokenizer and generation config) and the template's end-of-turn."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in _END_OF_TURN if t in vocab}
    return sorted(i for i in ids if i is not None)


@torch.inference_mode()
def generate_responses(model, tokenizer, prompts: Sequence[Sequence[Mapping[str, str]]], max_new_tokens: int,
                       batch_size: int = 16) -> list[str]:
    """Greedy responses of `model` to chat prompts (message lists ending in a user turn), batched with left
    padding, each stopped at its first end-of-turn / EOS token."""
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch"):
        texts = [tokenizer.apply_chat_template([dict(m) for m in p], tokenize=False, add_generation_prompt=True)
                 for p in prompts[i : i + batch_size]]
        enc = tokenizer(texts, add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt").to(device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
        out += [s.strip() for s in tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    return out


def _row(tokenizer, messages, source: str, behaviour, prompt: str) -> dict:
    ids, template, assistant = template_mask(tokenizer, messages)
    text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
    return dict(source=source, behaviour=behaviour, prompt=prompt, input_ids=ids, template=template,
                assistant=assistant, text=text)


def toy_sources(chat: pl.DataFrame, n_prompts: int, n_convs: int, seed: int) -> tuple[list, list]:
    """From the embedded pair's chat corpus: `n_prompts` distinct single-turn held-out user prompts (with their
    behaviour label) to be answered by the chat model, and `n_convs` other held-out conversations as written."""
    held = chat.filter(pl.col("split") == "heldout")
    if held.is_empty():
        raise ValueError("the chat corpus has no held-out conversations (split == 'heldout')")
    rows = list(held.select("messages", "behaviour").iter_rows())
    random.Random(seed).shuffle(rows)
    prompts, seen, rest = [], set(), []
    for messages, behaviour in rows:
        user = messages[0]["content"]
        if len(prompts) < n_prompts and len(messages) == 2 and user not in seen:
            seen.add(user)
            prompts.append(([{"role": "user", "content": user}], behaviour))
        else:
            rest.append((messages, behaviour))
    return prompts, rest[:n_convs]


def first_user_turn(input_ids: Sequence[int], template: Sequence[bool], assistant: Sequence[bool]) -> list[int]:
    """Token ids of the first user message of a rendered conversation: the first run of non-template,
    non-assistant tokens."""
    run = []
    for i, t, a in zip(input_ids, template, assistant):
        if not t and not a:
            run.append(i)
        elif run:
            break
    return run


def corpus_sources(corpus: pl.DataFrame, tokenizer, n_prompts: int, n_convs: int, seed: int) -> tuple[list, pl.DataFrame]:
    """For a real pair: prompts = first user turns of the validation corpus' chat rows, held-out conversations =
    other chat rows (already rendered and masked by the corpus stage)."""
    chat = corpus.filter((pl.col("source") == 1) & pl.col("assistant").list.any())
    if chat.is_empty():
        raise ValueError("the validation corpus has no chat sequence with an assistant turn")
    chat = chat.sample(fraction=1.0, shuffle=True, seed=seed)
    prompts, seen, used = [], set(), []
    for k, r in enumerate(chat.iter_rows(named=True)):
        if len(prompts) == n_prompts:
            break
        user = tokenizer.decode(first_user_turn(r["input_ids"], r["template"], r["assistant"])).strip()
        if user and user not in seen:
            seen.add(user)
            used.append(k)
            prompts.append(([{"role": "user", "content": user}], r["behaviour"]))
    rest = chat.with_row_index("_k").filter(~pl.col("_k").is_in(used)).drop("_k").head(n_convs)
    return prompts, rest


def build_eval_set(model, tokenizer, prompts: Sequence[tuple[list, str | None]], heldout, max_new_tokens: int,
                   batch_size: int = 16) -> pl.DataFrame:
    """The evaluation conversations: `prompts` answered greedily by the chat `model` (source "generated") and
    `heldout` conversations with their own responses (source "heldout"): a list of (messages, behaviour) or
    an already-rendered corpus frame. Responses the model ends immediately are dropped (nothing to score)."""
    responses = generate_responses(model, tokenizer, [p for p, _ in prompts], max_new_tokens, batch_size)
    rows = []
    for (prompt, behaviour), response in zip(prompts, responses):
        if response:
            rows.append(_row(tokenizer, prompt + [{"role": "assistant", "content": response}], "generated",
                             behaviour, prompt[-1]["content"]))
    if len(rows) < len(prompts):
        log.warning("dropped %d of %d prompts the chat model answered with an empty response",
                    len(prompts) - len(rows), len(prompts))
    if isinstance(heldout, pl.DataFrame):
        rows += [dict(source="heldout", behaviour=r["behaviour"],
                      prompt=tokenizer.decode(first_user_turn(r["input_ids"], r["template"], r["assistant"])).strip(),
                      input_ids=r["input_ids"], template=r["template"], assistant=r["assistant"], text=r["text"])
                 for r in heldout.iter_rows(named=True)]
    else:
        rows += [_row(tokenizer, messages, "heldout", behaviour, messages[0]["content"]) for messages, behaviour in heldout]
    df = pl.DataFrame(rows, schema={k: v for k, v in EVAL_SCHEMA.items() if k != "seq"})
    return df.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("seq")).select(list(EVAL_SCHEMA))


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


def latent_sets(table: pl.DataFrame, top_n: int | None = None) -> dict[str, np.ndarray | None]:
    """Best / worst half of the live chat-only latents by Δnorm (descending) and by rank_nu (ascending; latents
    without both ν are left out of that ranking). Halves have equal size (the middle latent of an odd set is in
    neither); a ranking over fewer than 2 latents gives None. Ties break by latent id.

    top_n replaces the chat-only class (paper A.8) by the top_n live latents of highest Δnorm: the pool for a
    crosscoder whose chat-only class is too small to halve (as for a BatchTopK crosscoder on a small pair)."""
    need = {"latent", "klass", "delta_norm", "rank_nu"} - set(table.columns)
    if need:
        raise ValueError(f"the latent table lacks columns {sorted(need)}")
    by_delta_norm = lambda df: df.filter(pl.col("delta_norm").is_not_null()).sort(  # noqa: E731
        ["delta_norm", "latent"], descending=[True, False])
    live = table.filter(~pl.col("dead").fill_null(False)) if "dead" in table.columns else table
    if top_n is None:
        chat = live.filter(pl.col("klass") == "chat_only")
    else:  # ν re-ranked within the pool
        chat = latents.add_rank_nu(by_delta_norm(live).head(top_n).drop("rank_nu"), pool=pl.lit(True))
    ranked = {
        "delta_norm": by_delta_norm(chat),
        "nu": chat.filter(pl.col("rank_nu").is_not_null()).sort(["rank_nu", "latent"]),
    }
    sets: dict[str, np.ndarray | None] = {}
    for name, df in ranked.items():
        ids, half = df["latent"].to_numpy().astype(np.int64), df.height // 2
        sets[f"{name}_best"] = ids[:half] if half else None
        sets[f"{name}_worst"] = ids[df.height - half:] if half else None
    return sets


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
    notes = [f"{k}: fewer than 2 chat-only latents in this ranking; no {k} condition" for k, v in sets.items() if v is None]
    metrics = {"variant": variant, "bootstrap": {"unit": "conversation", "replicates": n_boot, "level": 0.95, "seed": seed},
               "n_latents": n_lat, "kl": kl, "best_minus_worst": order, "notes": notes}
    return table, metrics


# ---- figure -------------------------------------------------------------------------------------------------

LABELS = {"none": "None", "all": "All", "template": "Template", "delta_norm_best": "Δnorm\nbest 50%",
          "delta_norm_worst": "Δnorm\nworst 50%", "nu_best": "ν (ours)\nbest 50%", "nu_worst": "ν (ours)\nworst 50%"}
COLOURS = {"none": "0.55", "all": "0.3", "template": "tab:olive", "delta_norm_best": "tab:blue",
           "delta_norm_worst": "lightsteelblue", "nu_best": "tab:orange", "nu_worst": "navajowhite"}


def kl_figure(path: str | Path, table: pl.DataFrame, source: str = "all", title: str = "",
              first_tokens: Sequence[int] = (2, 10)) -> Path:
    """Paper Fig. 5: mean KL per condition with 95% CIs, (a) full responses, (b) the first-tokens mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crossdiff.io import atomic_path

    sub = table.filter(pl.col("source") == source)
    masks = [m for m in MASKS if m in sub["mask"].to_list()]
    fig, axes = plt.subplots(1, len(masks), figsize=(5.2 * len(masks), 3.6), squeeze=False)
    for ax, mask in zip(axes[0], masks):
        df = {r["condition"]: r for r in sub.filter(pl.col("mask") == mask).iter_rows(named=True)}
        conds = [c for c in CONDITIONS if c in df]
        means = np.array([np.nan if df[c]["mean"] is None else df[c]["mean"] for c in conds], float)
        lo = np.array([np.nan if df[c]["ci_low"] is None else df[c]["ci_low"] for c in conds], float)
        hi = np.array([np.nan if df[c]["ci_high"] is None else df[c]["ci_high"] for c in conds], float)
        x = np.arange(len(conds))
        ax.bar(x, np.nan_to_num(means), color=[COLOURS[c] for c in conds],
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
    path = Path(path)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
