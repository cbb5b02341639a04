"""Activating and non-activating context windows per latent, from one streaming pass over the val cache.

A *window* is a run of at most `window` consecutive tokens of one sequence (sequences are cut into
non-overlapping windows from their first cached token; BOS is not cached). A window activates a latent
when the latent fires on any of its tokens; its activation is the max over its tokens. Following
Paulo et al. (2024) and paper A.10, a latent's activating windows are ranked by activation and split
into terciles of equal count (tercile 0 = strongest); from each tercile, `examples_per_tercile` go to
the explainer and `score_per_tercile` different ones to the scorer. The scorer's negatives are as many
non-activating windows: the most MiniLM-similar to the joined scoring examples, and random ones.

The pass keeps only the selected latents' non-zero activations (sparse) and the token/sequence ids,
never the dense activations, so memory grows with the latents' firing counts, not with D or d.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from tqdm import tqdm

from . import negatives

log = logging.getLogger(__name__)

N_TERCILES = 3
SPLITS = ("explain", "score", "negative_similar", "negative_random")


def select_latents(latents: pl.DataFrame, n_chat_only: int, n_shared: int, seed: int,
                   behaviour_latents: Sequence[int] = ()) -> pl.DataFrame:
    """Chat-only latents ranked by ν (rank_nu ascending = most chat-specific), plus a seeded sample of
    shared latents as a control, plus `behaviour_latents` (those that best detect a planted behaviour,
    whatever their class: the ground truth that explanations are checked against). Dead latents are
    never selected. Columns: latent, klass, why ("nu", "control" or "behaviour"; a latent selected
    twice keeps its first reason)."""
    missing = {"latent", "klass", "rank_nu", "dead"} - set(latents.columns)
    if missing:
        raise ValueError(f"latents table lacks columns {sorted(missing)}")
    alive = latents.filter(~pl.col("dead"))
    chat = (alive.filter(pl.col("klass") == "chat_only")
            .sort(["rank_nu", "latent"], nulls_last=True).head(n_chat_only))
    shared = alive.filter(pl.col("klass") == "shared").sort("latent")
    pick = np.random.default_rng(seed).permutation(shared.height)[: min(n_shared, shared.height)]
    shared = shared[np.sort(pick).tolist()] if len(pick) else shared.head(0)
    if chat.height < n_chat_only or shared.height < n_shared:
        log.warning("selected %d/%d chat-only and %d/%d shared latents (not enough alive)",
                    chat.height, n_chat_only, shared.height, n_shared)
    picked = pl.concat([chat.with_columns(why=pl.lit("nu")), shared.with_columns(why=pl.lit("control"))])
    extra = alive.filter(pl.col("latent").is_in(list(behaviour_latents)) & ~pl.col("latent").is_in(picked["latent"].to_list()))
    picked = pl.concat([picked, extra.sort("latent").with_columns(why=pl.lit("behaviour"))])
    return picked.select("latent", "klass", "why")


@dataclass
class SparseActs:
    """What the streaming pass keeps: ids of every cached token, and the selected latents' non-zeros."""

    tokens: np.ndarray  # (N,) token ids
    seq: np.ndarray  # (N,) sequence ids
    pos: np.ndarray  # (N,) positions in the sequence
    rows: np.ndarray  # (nnz,) row of each non-zero activation
    cols: np.ndarray  # (nnz,) index into the selected latents
    vals: np.ndarray  # (nnz,) activation


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class LatentEncoder:
    """`crosscoder.encode(h)[:, latents]` computing only those K latents' columns, not all D (eq. 1, 10).

    With K = 30 of D = 73k latents (the paper's size) this is the whole cost of the pass, D/K times less.
    """

    def __init__(self, crosscoder, latents: Sequence[int]):
        idx = torch.as_tensor(list(latents), dtype=torch.long, device=crosscoder.b_enc.device)
        self.crosscoder = crosscoder
        self.W = crosscoder.W_enc.reshape(-1, crosscoder.cfg.dict_size)[:, idx]  # (2d, K)
        self.b = crosscoder.b_enc[idx]
        self.topk = crosscoder.kind == "batchtopk"
        if self.topk:
            if crosscoder.threshold < 0:
                raise RuntimeError("BatchTopK crosscoder has no inference threshold θ yet (train it first)")
            self.weights = crosscoder.latent_weights()[idx]  # ‖d_j^base‖ + ‖d_j^chat‖

    @torch.no_grad()
    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        x = self.crosscoder.normalize(h)
        f = torch.relu(torch.addmm(self.b, x.reshape(len(x), -1), self.W))  # eq. 1
        if self.topk:
            f = f * (f * self.weights > self.crosscoder.threshold)  # eq. 10: v(x, j) > θ
        return f


@torch.no_grad()
def stream_activations(crosscoder, cache, latents: Sequence[int], batch_size: int = 4096,
                       device: str | torch.device = "cpu") -> SparseActs:
    """Encode the whole cache once; keep the non-zero activations of `latents` only."""
    encode = LatentEncoder(crosscoder, latents)
    tokens, seq, pos, rows, cols, vals = [], [], [], [], [], []
    offset = 0
    batches = cache.iter_sequential(batch_size, fields=("acts", "tokens", "seq", "pos"), device=device)
    for batch in tqdm(batches, total=-(-cache.n // batch_size), desc="encode val cache"):
        f = encode(batch["acts"].float())
        r, c = torch.nonzero(f, as_tuple=True)
        rows.append(_np(r) + offset)
        cols.append(_np(c))
        vals.append(_np(f[r, c]).astype(np.float32))
        tokens.append(_np(batch["tokens"]))
        seq.append(_np(batch["seq"]))
        pos.append(_np(batch["pos"]))
        offset += len(f)
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.empty(0, dt)
    return SparseActs(cat(tokens, np.int64), cat(seq, np.int64), cat(pos, np.int64),
                      cat(rows, np.int64), cat(cols, np.int64), cat(vals, np.float32))


def window_starts(seq: np.ndarray, window: int) -> np.ndarray:
    """First row of each window: a new sequence, or every `window` tokens into a sequence."""
    if window < 1:
        raise ValueError("window must be >= 1")
    n = len(seq)
    new_seq = np.r_[True, seq[1:] != seq[:-1]] if n else np.zeros(0, bool)
    run_start = np.maximum.accumulate(np.where(new_seq, np.arange(n), 0))
    return np.flatnonzero((np.arange(n) - run_start) % window == 0)


def window_texts(tokens: np.ndarray, seq: np.ndarray, tokenizer, window: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """First row, end row and decoded text of every window of a cached token stream."""
    starts = window_starts(seq, window)
    ends = np.r_[starts[1:], len(seq)]
    return starts, ends, [tokenizer.decode(tokens[a:b].tolist()) for a, b in zip(starts, ends)]


def embed_windows(val_path, tokenizer_path, window: int, device: str = "cpu", batch_rows: int = 1 << 16) -> np.ndarray:
    """MiniLM embeddings (n_windows, 384) of every window of the val cache, in window order.

    They depend on the cache and `window` only, not on a crosscoder, so one pass serves the negatives of
    every variant (`collect`): the toy demo embedded the same ~3,400 windows once per variant, 25 s each.
    """
    from transformers import AutoTokenizer

    from ..cache import ActivationCache

    parts = list(ActivationCache(val_path).iter_sequential(batch_rows, fields=("tokens", "seq")))
    tokens = np.concatenate([_np(b["tokens"]) for b in parts]) if parts else np.empty(0, np.int64)
    seq = np.concatenate([_np(b["seq"]) for b in parts]) if parts else np.empty(0, np.int64)
    _, _, texts = window_texts(tokens, seq, AutoTokenizer.from_pretrained(tokenizer_path), window)
    log.info("embedding %d windows with all-MiniLM-L6-v2", len(texts))
    return negatives.embed(texts, device=device)


def window_max(acts: SparseActs, starts: np.ndarray, n_latents: int) -> np.ndarray:
    """(n_windows, n_latents) max activation of each latent in each window (0 = not activating)."""
    out = np.zeros((len(starts), n_latents), np.float32)
    wid = np.searchsorted(starts, acts.rows, side="right") - 1
    np.maximum.at(out, (wid, acts.cols), acts.vals)
    return out


def split_terciles(wmax: np.ndarray) -> list[np.ndarray]:
    """Activating windows (wmax > 0) ranked by activation, strongest first, in 3 equal-count terciles."""
    active = np.flatnonzero(wmax > 0)
    order = active[np.lexsort((active, -wmax[active]))]
    return np.array_split(order, N_TERCILES)


def split_counts(m: int, n_explain: int, n_score: int) -> tuple[int, int]:
    """How many of a tercile's `m` windows explain and score: all requested if there are enough,
    else the scorer gets up to half and the explainer the rest (both sides stay populated)."""
    if m >= n_explain + n_score:
        return n_explain, n_score
    score = min(n_score, m // 2)
    return min(n_explain, m - score), score


def choose_windows(wmax: np.ndarray, n_explain: int, n_score: int, rng: np.random.Generator):
    """(window, tercile, split) triples of one latent's activating examples, sampled within terciles."""
    out = []
    for t, members in enumerate(split_terciles(wmax)):
        members = rng.permutation(members)
        e, s = split_counts(len(members), n_explain, n_score)
        out += [(int(w), t, "explain") for w in members[:e]]
        out += [(int(w), t, "score") for w in members[e:e + s]]
    return out


def interleave_terciles(windows: Sequence[int], terciles: Sequence[int]) -> list[int]:
    """Round-robin over terciles, so a joined string truncated by MiniLM still covers all of them."""
    seen = [0] * N_TERCILES
    keyed = []
    for w, t in zip(windows, terciles):
        keyed.append((seen[t], t, w))
        seen[t] += 1
    return [w for _, _, w in sorted(keyed)]


def collect(acts: SparseActs, selected: pl.DataFrame, tokenizer, window: int, n_explain: int, n_score: int,
            seed: int, embed_device: str = "cpu", window_emb: np.ndarray | None = None) -> pl.DataFrame:
    """The examples table: one row per (latent, window, split); see SPLITS. Per-token activations included.

    `window_emb`: every window's MiniLM embedding (`embed_windows`), else they are computed here."""
    latents = selected["latent"].to_list()
    klass = dict(zip(latents, selected["klass"].to_list()))
    why = dict(zip(latents, selected["why"].to_list())) if "why" in selected.columns else {}
    starts, ends, texts = window_texts(acts.tokens, acts.seq, tokenizer, window)
    if window_emb is not None and window_emb.shape != (len(starts), 384):
        raise ValueError(f"window embeddings of shape {window_emb.shape}, but the val cache has {len(starts)} windows "
                         f"of {window} tokens: rebuild them (embed_windows) from this cache and window")
    wmax = window_max(acts, starts, len(latents))
    rng = np.random.default_rng(seed)
    token_str = {int(t): tokenizer.decode([int(t)]) for t in np.unique(acts.tokens)}

    chosen: dict[int, list[tuple[int, int | None, str]]] = {}
    queries = []
    for k, latent in enumerate(latents):
        chosen[latent] = choose_windows(wmax[:, k], n_explain, n_score, rng)
        score = [(w, t) for w, t, s in chosen[latent] if s == "score"]
        joined = interleave_terciles([w for w, _ in score], [t for _, t in score])
        queries.append(" ".join(texts[w] for w in joined))  # paper A.10: all activating examples in one string

    # Every window's embedding (the negatives are drawn from them) and each latent's query.
    if window_emb is None:
        log.info("embedding %d windows with all-MiniLM-L6-v2", len(texts))
        window_emb = negatives.embed(texts, device=embed_device)
    emb = window_emb
    log.info("embedding %d queries with all-MiniLM-L6-v2", len(queries))
    q_emb = negatives.embed(queries, device=embed_device) if queries else np.zeros((0, 384), np.float32)

    for k, latent in enumerate(latents):
        n_pos = sum(s == "score" for _, _, s in chosen[latent])
        cand = np.flatnonzero(wmax[:, k] == 0)
        if n_pos == 0 or len(cand) == 0:
            continue
        sim = cand[negatives.similar_negatives(q_emb[k], emb[cand], n_pos)]
        rest = np.setdiff1d(cand, sim)
        rand = rest[negatives.random_negatives(len(rest), n_pos, rng)]
        chosen[latent] += [(int(w), None, "negative_similar") for w in sim]
        chosen[latent] += [(int(w), None, "negative_random") for w in rand]

    rows = []
    order = np.argsort(acts.rows, kind="stable")
    rows_sorted, cols_sorted, vals_sorted = acts.rows[order], acts.cols[order], acts.vals[order]
    for k, latent in enumerate(latents):
        for w, tercile, split in chosen[latent]:
            a, b = int(starts[w]), int(ends[w])
            lo, hi = np.searchsorted(rows_sorted, [a, b])
            per_tok = np.zeros(b - a, np.float32)
            mine = cols_sorted[lo:hi] == k
            per_tok[rows_sorted[lo:hi][mine] - a] = vals_sorted[lo:hi][mine]
            ids = acts.tokens[a:b]
            rows.append(dict(latent=latent, klass=klass[latent], why=why.get(latent), split=split, tercile=tercile, window=w,
                             seq=int(acts.seq[a]), pos=int(acts.pos[a]), max_act=float(wmax[w, k]),
                             token_ids=ids.tolist(), acts=per_tok.tolist(),
                             tokens=[token_str[int(t)] for t in ids], text=texts[w]))
    schema = {"latent": pl.Int64, "klass": pl.Utf8, "why": pl.Utf8, "split": pl.Utf8, "tercile": pl.Int8,
              "window": pl.Int64, "seq": pl.Int64, "pos": pl.Int64, "max_act": pl.Float32, "token_ids": pl.List(pl.Int32),
              "acts": pl.List(pl.Float32), "tokens": pl.List(pl.Utf8), "text": pl.Utf8}
    return pl.DataFrame(rows, schema=schema)


def collect_examples(crosscoder_dir, latents_path, val_path, tokenizer_path, params: dict,
                     device: str | torch.device = "cpu", behaviour_latents: Sequence[int] = (),
                     window_emb: np.ndarray | None = None) -> pl.DataFrame:
    """The `collect_examples` stage: select latents, stream the val cache, pick windows and negatives."""
    from transformers import AutoTokenizer

    from ..cache import ActivationCache
    from ..crosscoder import CrossCoder

    selected = select_latents(pl.read_parquet(latents_path), params["n_chat_only"], params["n_shared"],
                              params["seed"], behaviour_latents)
    log.info("selected %d latents: %s", selected.height, selected.group_by("klass").len().rows())
    crosscoder = CrossCoder.load(crosscoder_dir, device=device).eval()
    acts = stream_activations(crosscoder, ActivationCache(val_path), selected["latent"].to_list(),
                              params["batch_size"], device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return collect(acts, selected, tokenizer, params["window"], params["examples_per_tercile"],
                   params["score_per_tercile"], params["seed"], window_emb=window_emb)
