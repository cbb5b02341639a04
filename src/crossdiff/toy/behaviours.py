"""Do robust chat-only latents pick out the embedded pair's planted chat behaviours? (behaviours.json)

The toy and fine-tuned pairs label every chat conversation with the behaviour it was written to show (refusal,
false fact, joke, ...). For every label and crosscoder variant: the best AUROC of one latent's maximum
activation over a conversation's tokens, separating that label's chat conversations from the other chat
conversations; over all latents, Δnorm chat-only latents, and robust (low-ν, Fig. 8's criterion) chat-only ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from crossdiff.cache import ActivationCache
from crossdiff.cli import resolve_device
from crossdiff.crosscoder import CrossCoder
from crossdiff.io import write_json
from crossdiff.synthetic import auroc


def auroc_columns(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AUROC of every column of `scores` (n, D) for boolean `labels` (n,), one sort per column."""
    labels = np.asarray(labels, bool)
    return np.array([auroc(scores[labels, j], scores[~labels, j]) for j in range(scores.shape[1])])


def conversation_max_acts(crosscoder, cache, chat_seqs: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """(len(chat_seqs), D): each latent's maximum activation over every cached token of each chat conversation.

    A behaviour is a label of a whole conversation, so a latent "detects" it if it fires strongly anywhere
    in it (prompt, template or response tokens alike); tokens of other sequences are skipped.
    """
    order = np.argsort(chat_seqs)
    sorted_seqs = chat_seqs[order]
    param = next(crosscoder.parameters())
    out = torch.zeros(len(chat_seqs), crosscoder.cfg.dict_size)
    with torch.no_grad():
        for batch in tqdm(cache.iter_sequential(batch_size, fields=("acts", "seq")), desc="behaviours",
                          total=-(-cache.n // batch_size), leave=False):
            seq = np.asarray(batch["seq"].cpu().numpy(), np.int64)
            pos = np.minimum(np.searchsorted(sorted_seqs, seq), len(sorted_seqs) - 1)
            keep = sorted_seqs[pos] == seq
            if not keep.any():
                continue
            f = crosscoder.encode(batch["acts"][torch.from_numpy(keep)].to(param.device, param.dtype)).float().cpu()
            rows = torch.from_numpy(order[pos[keep]]).long()
            out.scatter_reduce_(0, rows[:, None].expand_as(f), f, reduce="amax")
    return out.numpy()


def behaviour_aurocs(max_acts: np.ndarray, behaviour: np.ndarray, table, nu_thresholds) -> dict:
    """Per planted behaviour label: the best single-latent AUROC for telling its conversations from the other
    chat conversations, over all alive latents, over Δnorm chat-only latents, and over robust chat-only
    latents (ν^ε < π and ν^r < π, Fig. 8's criterion) for each π."""
    t = table.sort("latent")
    klass, dead = t["klass"].to_numpy().astype(str), t["dead"].to_numpy().astype(bool)
    nu_eps, nu_r = t["nu_eps"].to_numpy().astype(float), t["nu_r"].to_numpy().astype(float)
    if len(t) != max_acts.shape[1]:
        raise ValueError(f"latent table has {len(t)} rows but the crosscoder has {max_acts.shape[1]} latents")
    behaviour = np.asarray(behaviour, dtype=object)

    def best(scores, mask):
        sel = np.flatnonzero(mask & ~dead & np.isfinite(scores))
        if not len(sel):
            return {"latent": None, "auroc": float("nan"), "n_latents": 0}
        j = int(sel[np.argmax(scores[sel])])
        return {"latent": j, "auroc": float(scores[j]), "klass": str(klass[j]), "nu_eps": float(nu_eps[j]),
                "nu_r": float(nu_r[j]), "n_latents": int(len(sel))}

    chat = klass == "chat_only"
    out = {}
    for label in sorted({b for b in behaviour if b is not None}):
        y = behaviour == label
        if y.all():
            continue
        s = auroc_columns(max_acts, y)
        out[label] = {"n_conversations": int(y.sum()), "n_other": int((~y).sum()),
                      "all_latents": best(s, np.ones_like(dead)), "chat_only": best(s, chat),
                      "robust_chat_only": [{"pi": float(pi), **best(s, chat & (nu_eps < pi) & (nu_r < pi))}
                                           for pi in nu_thresholds]}
    return out


def cached_seqs(cache: ActivationCache) -> np.ndarray:
    """Sequence ids present in the cache (it may hold a prefix of the corpus only)."""
    return np.unique(np.concatenate([b["seq"].cpu().numpy() for b in cache.iter_sequential(1 << 16, fields=("seq",))]))


def run_behaviours(params: Mapping, variants: Sequence[str], crosscoders: str | Path, analysis: str | Path,
                   val: str | Path, corpus: str | Path, out: str | Path, device: str = "auto") -> dict:
    """The validate_behaviours stage: `params` = the {analysis} slice; `crosscoders` / `analysis` hold
    {variant}/model.safetensors / {variant}/latents.parquet; `val` is the val activation cache and `corpus` the
    val corpus parquet (seq, source, behaviour) -> `out` (behaviours.json)."""
    chats = pl.read_parquet(corpus, columns=["seq", "source", "behaviour"]).filter(pl.col("source") == 1)
    if chats.is_empty():
        raise ValueError(f"{corpus} has no chat conversations (source == 1)")
    cache = ActivationCache(val)
    chats = chats.filter(pl.col("seq").is_in(cached_seqs(cache).tolist()))
    seqs = chats["seq"].to_numpy().astype(np.int64)
    behaviour = np.asarray(chats["behaviour"].to_list(), dtype=object)
    ap = params["analysis"]
    result = {"score": "max activation over all cached tokens of a conversation",
              "n_chat_conversations": len(seqs), "variants": {}}
    for variant in variants:
        cc = CrossCoder.load(Path(crosscoders) / variant, device=resolve_device(device)).eval()
        table = pl.read_parquet(Path(analysis) / variant / "latents.parquet")
        acts = conversation_max_acts(cc, cache, seqs, batch_size=ap["batch_size"])
        result["variants"][variant] = behaviour_aurocs(acts, behaviour, table, ap["nu_thresholds"])
    write_json(out, result)
    return result
