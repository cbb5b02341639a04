"""The paired activation cache (DESIGN §3): a streaming, resumable HDF5 writer and the readers.

File layout, one file per split: `base`, `chat` (N, d) chunked by rows, float16 | bfloat16 | float32
(`activations.dtype`; HDF5 has no bfloat16, so it is stored as its raw 16 bits with the dataset attribute
`dtype = "bfloat16"`); `tokens` int32, `seq` int32, `pos` int32, `template` bool, `source` uint8 (all (N,));
attributes `base_model`, `chat_model`, `layer`, `d_model`, `tokenizer`, `created_by`, `norm_base`, `norm_chat`
(mean L2 norm of each model's activations) and `norm_ratio` (r = norm_chat / norm_base).

Attention sinks. Position 0 of every sequence is excluded whether or not it is BOS (a tokenizer without BOS,
like Qwen's, turns its first token into the sink: ~50x the norm of the others), and so is every BOS token;
`sink_rows_excluded` counts them. Rows whose residual norm exceeds `outlier_factor` x the median norm (per
model) are reported (`outlier_rows`, `outlier_examples` as "seq:pos") and, with `drop_outliers`, removed.

Overflow. A non-finite activation is never written: the writer raises naming the sequence and position
(Gemma 3's first token reaches |x| ~ 83,000, beyond float16's 65,504), and the readers refuse non-finite rows.

Writing. The row count is known from the corpus before any compute, so every dataset is created at its final
shape with all chunks allocated up front: committing a chunk then only writes raw bytes into place and bumps
one attribute (`committed_rows`, with the running norm sums) after a flush, so a kill at any point leaves a
`*.partial` whose committed prefix is valid. Forward batches are a pure function of the corpus and the params,
so a restart re-runs the batch holding the first uncommitted row, drops the rows already on disk and goes on:
the finished file is identical to an uninterrupted run. The final rename makes completion atomic.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import h5py
import numpy as np
import polars as pl
import torch
from torch import Tensor
from tqdm import tqdm

from . import __version__

if TYPE_CHECKING:
    from .models import Pair

log = logging.getLogger(__name__)

FIELDS = {"tokens": np.int32, "seq": np.int32, "pos": np.int32, "template": np.bool_, "source": np.uint8}
DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}  # storage type of base/chat
PROGRESS = ("committed_rows", "norm_sum_base", "norm_sum_chat")  # attrs of a *.partial, removed on completion


class CacheError(RuntimeError):
    pass


# ---- planning: which sequences go into which forward batch (no model needed) ------------------------------

@dataclass
class Plan:
    """Forward batches over the corpus rows [start, stop) of one shard, in file order."""

    batches: list[np.ndarray]  # corpus row indices per batch
    rows: np.ndarray  # cached rows (non-BOS tokens) per batch
    windows: list[tuple[int, int]]  # corpus row range each batch is drawn from (what to load together)

    @property
    def n_rows(self) -> int:
        return int(self.rows.sum())


def plan(lengths: np.ndarray, keep: np.ndarray, batch_tokens: int, shard: int = 0, num_shards: int = 1,
         window_batches: int = 16) -> Plan:
    """Group sequences into batches of at most `batch_tokens` padded tokens (B × T_max).

    Windows of consecutive sequences (~`window_batches` batches of tokens) are sorted by length before
    batching, which removes most padding while keeping the file order local (a prefix of the file is still a
    fair sample of the corpus). Shards are contiguous runs of whole windows balanced by tokens, so merging
    the shards in order gives the same batches as one unsharded run.
    """
    if lengths.max(initial=0) > batch_tokens:
        raise CacheError(f"a sequence has {lengths.max()} tokens > activations.batch_tokens={batch_tokens}")
    bounds, acc = [0], 0
    for i, n in enumerate(lengths):
        acc += n
        if acc >= window_batches * batch_tokens:
            bounds.append(i + 1)
            acc = 0
    if bounds[-1] != len(lengths):
        bounds.append(len(lengths))
    windows = list(zip(bounds[:-1], bounds[1:]))
    tokens = np.array([lengths[a:b].sum() for a, b in windows])
    cut = np.searchsorted(np.cumsum(tokens), np.arange(1, num_shards) * tokens.sum() / num_shards, side="right")
    mine = np.split(np.arange(len(windows)), cut)[shard]
    batches, batch_windows = [], []
    for w in mine:
        a, b = windows[w]
        order = a + np.argsort(-lengths[a:b], kind="stable")
        batch, width = [], 0
        for i in order:
            width = max(width, lengths[i])
            if batch and (len(batch) + 1) * width > batch_tokens:
                batches.append(np.array(batch))
                batch, width = [], lengths[i]
            batch.append(i)
        batches.append(np.array(batch))
        batch_windows += [(a, b)] * (len(batches) - len(batch_windows))
    rows = np.array([keep[b].sum() for b in batches], dtype=np.int64)
    return Plan(batches, rows, batch_windows)


def _corpus_stats(corpus: Path, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Tokens per sequence and cached rows per sequence (position 0 and every BOS token excluded)."""
    lf = pl.scan_parquet(corpus)
    n_len = pl.col("input_ids").list.len()
    later_bos = pl.col("input_ids").list.slice(1).list.eval(pl.element() == bos).list.sum() if bos is not None else 0
    drop = pl.min_horizontal(n_len, 1 + later_bos)
    df = lf.select(n_len.alias("n"), (n_len - drop).alias("keep")).collect()
    return df["n"].to_numpy().astype(np.int64), df["keep"].to_numpy().astype(np.int64)


# ---- writer -----------------------------------------------------------------------------------------------

def _create_acts(f: h5py.File, n: int, d: int, chunk: int, dtype: str, **kw) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"activations.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    for name in ("base", "chat"):
        f.create_dataset(name, (n, d), DTYPES[dtype], chunks=(chunk, d), **kw)
        f[name].attrs["dtype"] = dtype


def _create(path: Path, n: int, d: int, chunk_rows: int, attrs: dict, dtype: str) -> h5py.File:
    f = h5py.File(path, "w")
    chunk = max(1, min(chunk_rows, n))
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)  # no chunk-index metadata changes while writing
    _create_acts(f, n, d, chunk, dtype, dcpl=dcpl, fill_time="never")
    for name, dt in FIELDS.items():
        f.create_dataset(name, (n,), dt, chunks=(chunk,), dcpl=dcpl.copy(), fill_time="never")
    f.attrs.update(attrs)
    f.attrs.update(committed_rows=0, norm_sum_base=0.0, norm_sum_chat=0.0)
    f.flush()
    return f


def _open_partial(path: Path, attrs: dict, n: int) -> h5py.File | None:
    """The partial file if it belongs to this exact job (same models, layer, corpus, params), else None."""
    if not path.exists():
        return None
    try:
        f = h5py.File(path, "r+")
        same = all(_eq(f.attrs.get(k), v) for k, v in attrs.items()) and f["base"].shape[0] == n
        if same and all(k in f.attrs for k in PROGRESS):
            return f
        f.close()
        log.warning("%s was written by a different job; starting over", path)
    except OSError as e:  # killed in the middle of a metadata write: the committed work is lost, not corrupted
        log.warning("%s is unreadable (%s); starting over", path, e)
    path.unlink()
    return None


def _eq(a, b) -> bool:
    return bool(np.all(a == b)) if a is not None else False


class _Chunks:
    """Rows waiting for their chunk to fill; a full chunk is written and then committed."""

    def __init__(self, f: h5py.File, start: int, chunk_rows: int):
        self.f, self.start, self.chunk_rows, self.parts, self.commits = f, start, chunk_rows, [], 0

    def add(self, rows: dict[str, np.ndarray]) -> None:
        self.parts.append(rows)
        while sum(len(p["base"]) for p in self.parts) >= self.chunk_rows:
            self._commit(self.chunk_rows)

    def close(self) -> None:
        if self.parts:
            self._commit(sum(len(p["base"]) for p in self.parts))

    def _commit(self, k: int) -> None:
        cat = {name: np.concatenate([p[name] for p in self.parts]) for name in self.parts[0]}
        rows, rest = {n: v[:k] for n, v in cat.items()}, {n: v[k:] for n, v in cat.items()}
        self.parts = [rest] if len(rest["base"]) else []
        a, b = self.start, self.start + k
        for name, v in rows.items():
            self.f[name][a:b] = v
        self.f.flush()  # data on disk before the commit mark that vouches for it
        for name in ("base", "chat"):  # mean L2 norm, accumulated per chunk in float64 (same order on resume)
            self.f.attrs[f"norm_sum_{name}"] += float(_norms(rows[name]).sum(dtype=np.float64))
        self.f.attrs["committed_rows"] = b
        self.f.flush()
        self.start, self.commits = b, self.commits + 1


def to_storage(x: Tensor, dtype: str) -> np.ndarray:
    """float activations -> the stored representation (bfloat16 as its raw 16 bits)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> Tensor:
    """The stored representation -> float32 tensor (inverse of to_storage)."""
    if dtype == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def _norms(a: np.ndarray) -> np.ndarray:
    """Per-row L2 norms (float32) of stored rows of any storage dtype."""
    x = from_storage(a, "bfloat16") if a.dtype == np.uint16 else torch.from_numpy(a).float()
    return torch.linalg.vector_norm(x, dim=-1).numpy()


def _check_finite(h: Tensor, what: str, seq: Tensor, pos: Tensor) -> None:
    bad = ~torch.isfinite(h).all(-1)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise CacheError(
            f"non-finite {what} activation at sequence {int(seq[i])}, position {int(pos[i])} "
            f"({int(bad.sum())} rows in this batch; finite max |x| = {h[torch.isfinite(h)].abs().max().item():.4g}); "
            "set activations.dtype: bfloat16 or float32 (float16 tops out at 65,504), or load the models in float32")


def _batch_rows(pair: Pair, layer: int, df: pl.DataFrame, bos: int | None, device, dtype: str) -> dict[str, np.ndarray]:
    """Forward one batch through both models to layer L; the rows past position 0 that are not BOS, in sequence
    then position order, in the storage dtype. Raises on a non-finite value, before or after the cast."""
    from . import models  # transformers: imported only where models run (3 s that reading a cache never needs)
    seqs = df["input_ids"].to_list()
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    tmpl = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, t) in enumerate(zip(seqs, df["template"].to_list())):
        ids[i, : len(s)], mask[i, : len(s)], tmpl[i, : len(s)] = torch.tensor(s), 1, torch.tensor(t)
    # right padding: positions stay 0..len-1, exactly as for the unpadded sequence
    keep = mask.bool() & (torch.arange(width) > 0)  # position 0 is the attention sink, BOS or not
    if bos is not None:
        keep &= ids != bos
    seq = torch.tensor(df["seq"].to_list(), dtype=torch.int32)[:, None].expand(-1, width)
    src = torch.tensor(df["source"].to_list(), dtype=torch.uint8)[:, None].expand(-1, width)
    pos = torch.arange(width, dtype=torch.int32)[None].expand(len(seqs), -1)
    ids_d, mask_d = ids.to(device), mask.to(device)
    out = {}
    for name, model in (("base", pair.base), ("chat", pair.chat)):
        h = models.hidden_at_layer(model, ids_d, mask_d, layer)[keep.to(device)].float()
        _check_finite(h, name, seq[keep], pos[keep])
        out[name] = to_storage(h, dtype)
        _check_finite(from_storage(out[name], dtype), f"{name} ({dtype}-stored)", seq[keep], pos[keep])
    out.update(tokens=ids[keep].int().numpy(), seq=seq[keep].numpy(), pos=pos[keep].numpy(),
               template=tmpl[keep].numpy(), source=src[keep].numpy())
    return out


@torch.inference_mode()
def write_cache(pair: Pair, layer: int, corpus: str | Path, out: str | Path, batch_tokens: int, chunk_rows: int,
                shard: int = 0, num_shards: int = 1, device="cpu", window_batches: int = 16, dtype: str = "float16",
                outlier_factor: float = 10.0, drop_outliers: bool = False,
                stop_after_chunks: int | None = None) -> Path:
    """Cache layer-L activations of both models on the corpus (or one shard of it) into `out`.

    Resumes a `{out}.partial` left by a killed run. An unsharded file is screened for norm outliers at the end
    (a sharded one when the shards are merged). `stop_after_chunks` (tests) raises after that many chunk
    commits, like a kill between chunks.
    """
    from . import models
    corpus, out = Path(corpus), Path(out)
    partial = out.with_name(out.name + ".partial")
    bos = pair.tokenizer.bos_token_id
    lengths, keep = _corpus_stats(corpus, bos)
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} not in 0..{num_shards - 1}")
    p = plan(lengths, keep, batch_tokens, shard, num_shards, window_batches)
    if p.n_rows == 0:
        raise CacheError(f"{corpus}: shard {shard}/{num_shards} has no tokens to cache")
    d = models.d_model(pair.base)
    attrs = dict(base_model=pair.base_name, chat_model=pair.chat_name, layer=layer, d_model=d,
                 tokenizer=pair.chat_name, created_by=f"crossdiff {__version__}", corpus=str(corpus),
                 batch_tokens=batch_tokens, chunk_rows=chunk_rows, window_batches=window_batches, shard=shard,
                 num_shards=num_shards, dtype=dtype,
                 sink_rows_excluded=int(sum(lengths[b].sum() for b in p.batches)) - p.n_rows)
    f = _open_partial(partial, attrs, p.n_rows) or _create(partial, p.n_rows, d, chunk_rows, attrs, dtype)
    with f:
        done = int(f.attrs["committed_rows"])
        if done:
            log.info("resuming %s at row %d of %d", partial, done, p.n_rows)
        ends = np.cumsum(p.rows)
        first = int(np.searchsorted(ends, done, side="right"))  # the batch holding row `done`
        skip = done - (ends[first - 1] if first else 0)
        chunks = _Chunks(f, done, chunk_rows)
        lf = pl.scan_parquet(corpus).select("seq", "input_ids", "template", "source")
        bar = tqdm(total=p.n_rows, initial=done, desc=f"cache L{layer} {out.name}", unit="tok", unit_scale=True)
        loaded, window = None, None
        for bi in range(first, len(p.batches)):
            if p.windows[bi] != loaded:  # read the corpus one window at a time: RAM does not grow with it
                loaded = p.windows[bi]
                window = lf.slice(loaded[0], loaded[1] - loaded[0]).collect()
            rows = _batch_rows(pair, layer, window[p.batches[bi] - loaded[0]], bos, device, dtype)
            if skip:
                rows, skip = {k: v[skip:] for k, v in rows.items()}, 0
            chunks.add(rows)
            bar.update(len(rows["base"]))
            if stop_after_chunks is not None and chunks.commits >= stop_after_chunks:
                raise RuntimeError(f"stopped after {chunks.commits} chunk commits (test hook)")
        chunks.close()
        bar.close()
        n = p.n_rows
        if int(f.attrs["committed_rows"]) != n:
            raise CacheError(f"wrote {f.attrs['committed_rows']} rows, expected {n}")
        f.attrs["norm_base"] = f.attrs["norm_sum_base"] / n
        f.attrs["norm_chat"] = f.attrs["norm_sum_chat"] / n
        f.attrs["norm_ratio"] = f.attrs["norm_chat"] / f.attrs["norm_base"]
        for k in PROGRESS:
            del f.attrs[k]
    if num_shards == 1:
        partial = screen_outliers(partial, outlier_factor, drop_outliers)
    os.replace(partial, out)
    log.info("wrote %s: %d rows, d=%d", out, n, d)
    return out


def _copy_rows(sources: Sequence[tuple[h5py.File, np.ndarray | None]], dst: Path, attrs: dict,
               block_rows: int = 1 << 16) -> None:
    """Write the rows of each (file, keep mask or None = all) in order into a new cache file `dst`."""
    first = sources[0][0]
    n = sum(f["base"].shape[0] if keep is None else int(keep.sum()) for f, keep in sources)
    d, chunk = first["base"].shape[1], first["base"].chunks[0]
    with h5py.File(dst, "w") as g:
        _create_acts(g, n, d, max(1, min(chunk, n)), _stored_dtype(first))
        for name, dt in FIELDS.items():
            g.create_dataset(name, (n,), dt, chunks=(max(1, min(chunk, n)),))
        g.attrs.update(attrs)
        at = 0
        with tqdm(total=n, desc=f"write {dst.name}", unit="tok", unit_scale=True) as bar:
            for f, keep in sources:
                for a in range(0, f["base"].shape[0], block_rows):
                    b = min(f["base"].shape[0], a + block_rows)
                    sel = slice(None) if keep is None else keep[a:b]
                    k = b - a if keep is None else int(sel.sum())
                    for name in ("base", "chat", *FIELDS):
                        g[name][at: at + k] = f[name][a:b][sel]
                    at += k
                    bar.update(k)


def screen_outliers(path: str | Path, factor: float, drop: bool, block_rows: int = 1 << 16) -> Path:
    """Find rows whose residual norm exceeds `factor` x the median norm of its model (massive activations
    that would dominate training), record them in the file's attrs, and with `drop` write a copy without them.
    Returns the path of the screened file (`path` itself unless rows were dropped)."""
    path = Path(path)
    with h5py.File(path, "r+") as f:
        n = f["base"].shape[0]
        norms = {m: np.concatenate([_norms(f[m][a: a + block_rows]) for a in range(0, n, block_rows)])
                 for m in ("base", "chat")}
        median = {m: float(np.median(v)) for m, v in norms.items()}
        ratio = np.maximum(norms["base"] / max(median["base"], 1e-12), norms["chat"] / max(median["chat"], 1e-12))
        idx = np.flatnonzero(ratio > factor)
        examples = [f"{s}:{p}" for s, p in zip(f["seq"][idx[:20]], f["pos"][idx[:20]])] if len(idx) else []
        f.attrs.update(outlier_factor=factor, outlier_rows=len(idx), outlier_examples=", ".join(examples),
                       outlier_max_ratio=float(ratio.max(initial=0.0)), outliers_dropped=bool(drop and len(idx)),
                       median_norm_base=median["base"], median_norm_chat=median["chat"])
        if len(idx):
            log.warning("%s: %d rows (%.3g%%) have a residual norm > %g x the median (max %.1f x), e.g. seq:pos %s%s",
                        path.name, len(idx), 100 * len(idx) / n, factor, ratio.max(), ", ".join(examples[:5]),
                        "; dropped" if drop else "; kept (activations.drop_outliers: true removes them)")
        if not (drop and len(idx)):
            return path
        keep = ratio <= factor
        attrs = dict(f.attrs)
        for m in ("base", "chat"):  # the mean norms of what remains
            attrs[f"norm_{m}"] = float(norms[m][keep].mean(dtype=np.float64))
        attrs["norm_ratio"] = attrs["norm_chat"] / attrs["norm_base"]
        dst = path.with_name(path.name + ".screened")
        _copy_rows([(f, keep)], dst, attrs, block_rows)
    path.unlink()
    return dst


def merge(shards: Sequence[str | Path], out: str | Path, outlier_factor: float = 10.0, drop_outliers: bool = False,
          block_rows: int = 1 << 16) -> Path:
    """Concatenate shard files in order into one cache (streamed; norms re-weighted by row counts), then
    screen it for norm outliers."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    files = [h5py.File(s, "r") for s in shards]
    try:
        first = files[0]
        for s, f in zip(shards, files):
            for k in ("base_model", "chat_model", "layer", "d_model", "corpus", "num_shards", "dtype"):
                if not _eq(f.attrs.get(k), first.attrs.get(k)):
                    raise CacheError(f"{s}: attribute {k} = {f.attrs.get(k)!r} differs from {shards[0]}'s {first.attrs.get(k)!r}")
        if sorted(int(f.attrs["shard"]) for f in files) != list(range(int(first.attrs["num_shards"]))):
            got = [int(f.attrs["shard"]) for f in files]
            raise CacheError(f"expected shards 0..{int(first.attrs['num_shards']) - 1}, got {got}")
        files.sort(key=lambda f: int(f.attrs["shard"]))
        sizes = [f["base"].shape[0] for f in files]
        n = sum(sizes)
        attrs = {k: v for k, v in first.attrs.items() if k not in ("shard", "norm_base", "norm_chat")}
        attrs.update(num_shards=1, shard=0, sink_rows_excluded=sum(int(f.attrs.get("sink_rows_excluded", 0)) for f in files))
        for name in ("base", "chat"):  # weighted mean of the shards' mean norms
            attrs[f"norm_{name}"] = sum(float(f.attrs[f"norm_{name}"]) * s for f, s in zip(files, sizes)) / n
        attrs["norm_ratio"] = attrs["norm_chat"] / attrs["norm_base"]
        _copy_rows([(f, None) for f in files], partial, attrs, block_rows)
    finally:
        for f in files:
            f.close()
    os.replace(screen_outliers(partial, outlier_factor, drop_outliers), out)
    return out


def _stored_dtype(f: h5py.File) -> str:
    """The storage dtype of a cache file (files without the attribute are float16 or float32 by HDF5 type)."""
    dt = f["base"].attrs.get("dtype")
    if dt is not None:
        return dt.decode() if isinstance(dt, bytes) else str(dt)
    return {np.dtype(np.float16): "float16", np.dtype(np.float32): "float32"}.get(f["base"].dtype, "float32")


def summary(path: str | Path) -> dict:
    """What a metrics.json should say about a cache: its size, what was excluded, and the norms."""
    c = ActivationCache(path)
    keys = ("sink_rows_excluded", "outlier_factor", "outlier_rows", "outlier_max_ratio", "outliers_dropped",
            "norm_base", "norm_chat", "norm_ratio")
    return {"rows": c.n, "dtype": c.dtype, **{k: c.attrs[k] for k in keys if k in c.attrs}}


# ---- readers ----------------------------------------------------------------------------------------------

class ActivationCache:
    """Reader over one file in the public format (any writer's, not only ours)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            missing = [k for k in ("base", "chat") if k not in f]
            if missing:
                raise CacheError(f"{path}: not an activation cache (missing datasets {missing})")
            self.n, self.d_model = f["base"].shape
            if f["chat"].shape != (self.n, self.d_model):
                raise CacheError(f"{path}: base {f['base'].shape} and chat {f['chat'].shape} differ in shape")
            self.chunk_rows = (f["base"].chunks or (min(self.n, 4096),))[0]
            self.dtype = _stored_dtype(f)
            self._np_dtype = f["base"].dtype
            self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            self.fields = [k for k in f if isinstance(f[k], h5py.Dataset)]

    def __len__(self) -> int:
        return self.n

    def _read_rows(self, f: h5py.File, a: int, b: int) -> np.ndarray:
        buf = np.empty((b - a, 2, self.d_model), self._np_dtype)
        buf[:, 0], buf[:, 1] = f["base"][a:b], f["chat"][a:b]
        return buf

    def _tensor(self, buf: np.ndarray, rows: np.ndarray, device) -> Tensor:
        """Stored rows -> (B, 2, d) float32; a non-finite row is an error naming it (never trained on)."""
        x = from_storage(buf, self.dtype)
        if torch.isfinite(x.sum()):  # one pass (0.5 of a 1.7 ms batch went to the row check); an overflowed sum
            return x.to(device)      # of finite rows falls through to the exact check, which then passes
        bad = ~torch.isfinite(x).all(-1).all(-1)
        if bad.any():
            raise CacheError(f"{self.path}: non-finite activations in {int(bad.sum())} rows, first at row "
                             f"{int(rows[int(bad.nonzero()[0, 0])])}; rewrite the cache with activations.dtype: "
                             "bfloat16 or float32")
        return x.to(device)

    def _epoch_plan(self, batch_size: int, seed: int, epoch: int, buffer_rows: int):
        """Per group of chunks: (chunk ids, batches as global row indices). A pure function of the arguments,
        so a resumed trainer can skip batches without reading their data."""
        rng = np.random.default_rng([seed, epoch])
        n_chunks = -(-self.n // self.chunk_rows)
        order = rng.permutation(n_chunks)
        per_group = max(1, buffer_rows // self.chunk_rows)
        carry = np.empty(0, np.int64)
        for g in range(0, n_chunks, per_group):
            ids = order[g: g + per_group]
            rows = np.concatenate([np.arange(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n)) for c in ids])
            pool = np.concatenate([carry, rows])
            pool = pool[rng.permutation(len(pool))]
            last = g + per_group >= n_chunks
            k = len(pool) if last else len(pool) // batch_size * batch_size
            yield ids, [pool[i: i + batch_size] for i in range(0, k, batch_size)]
            carry = pool[k:]

    def iter_shuffled(self, batch_size: int, seed: int, epoch: int = 0, skip_batches: int = 0, device="cpu",
                      buffer_rows: int = 1 << 16) -> Iterator[Tensor]:
        """(B, 2, d) float32 batches covering every row exactly once per epoch (the last batch may be short).

        HDF5 chunks are read in a random order, `buffer_rows` rows at a time, and shuffled in memory (rows
        left over from one buffer join the next). Deterministic for (seed, epoch); `skip_batches` continues
        exactly where a run with the same arguments stopped, without reading the skipped data.
        """
        seen = 0
        held_idx, held = np.empty(0, np.int64), np.empty((0, 2, self.d_model), self._np_dtype)
        with h5py.File(self.path, "r") as f:
            for ids, batches in self._epoch_plan(batch_size, seed, epoch, buffer_rows):
                if seen + len(batches) <= skip_batches:
                    seen += len(batches)
                    continue
                need = np.sort(np.concatenate(batches)) if batches else np.empty(0, np.int64)
                spans = [(c * self.chunk_rows, min((c + 1) * self.chunk_rows, self.n)) for c in ids]
                idx = np.concatenate([held_idx] + [np.arange(a, b) for a, b in spans])
                data = np.concatenate([held] + [self._read_rows(f, a, b) for a, b in spans])
                missing = np.setdiff1d(need, idx)  # rows carried over from a buffer we skipped
                if len(missing):
                    idx = np.concatenate([idx, missing])
                    data = np.concatenate([data, np.stack([f["base"][missing], f["chat"][missing]], 1)])
                sorter = np.argsort(idx)
                for batch in batches:
                    if seen >= skip_batches:
                        local = sorter[np.searchsorted(idx, batch, sorter=sorter)]
                        yield self._tensor(data[local], batch, device)
                    seen += 1
                used = np.zeros(len(idx), bool)
                used[sorter[np.searchsorted(idx, need, sorter=sorter)]] = True
                held_idx, held = idx[~used], data[~used]

    def iter_sequential(self, batch_size: int, fields: Sequence[str] = ("base", "chat"), limit: int | None = None,
                        device="cpu") -> Iterator[dict[str, Tensor]]:
        """Rows in file order. Field "acts" is the stacked (B, 2, d) float32 tensor; others as stored."""
        unknown = [k for k in fields if k != "acts" and k not in self.fields]
        if unknown:
            raise KeyError(f"{self.path}: no fields {unknown}; available: {self.fields + ['acts']}")
        n = self.n if limit is None else min(self.n, limit)
        with h5py.File(self.path, "r") as f:
            for a in range(0, n, batch_size):
                b = min(n, a + batch_size)
                out = {}
                for k in fields:
                    if k == "acts":
                        out[k] = self._tensor(self._read_rows(f, a, b), np.arange(a, b), device)
                    else:
                        out[k] = torch.from_numpy(f[k][a:b]).to(device)
                yield out
