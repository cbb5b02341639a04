"""Activation cache: rows equal the models' hidden states, BOS excluded, kill-and-resume is exact, shards merge
to the unsharded file, and the shuffled reader is deterministic and covers every row once per epoch."""

import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import torch

from crossdiff import io, testing
from crossdiff.cache import FIELDS, ActivationCache, CacheError, screen_outliers, summary, write_cache
from crossdiff.data import CorpusConfig, build_corpus
from crossdiff.models import load_pair
from helpers import script

LAYER = 1
KW = dict(batch_tokens=96, chunk_rows=48, window_batches=2)


@pytest.fixture(scope="module")
def corpus(tiny_tokenizer, toy_data, tmp_path_factory):
    cfg = CorpusConfig(web="toy", chat="toy", chat_fraction=0.5, max_len=32, train_tokens=500, val_tokens=50)
    path = tmp_path_factory.mktemp("corpus") / "train.parquet"
    io.write_parquet(path, build_corpus(tiny_tokenizer, cfg, toy_data)["train"])
    return path


def _cached(arch, tiny_pair, corpus, tmp_path_factory):
    base, chat = tiny_pair(arch)
    pair = load_pair(str(base), str(chat), layer=LAYER)
    return pair, write_cache(pair, LAYER, corpus, tmp_path_factory.mktemp(f"acts-{arch}") / "train.h5", **KW)


@pytest.fixture(scope="module", params=testing.ARCHS)
def cached(request, tiny_pair, corpus, tmp_path_factory):
    return _cached(request.param, tiny_pair, corpus, tmp_path_factory)


@pytest.fixture(scope="module")
def cached_gemma(tiny_pair, corpus, tmp_path_factory):
    """Resume and sharding logic does not depend on the architecture: one is enough (and keeps tests fast)."""
    return _cached("gemma2", tiny_pair, corpus, tmp_path_factory)


def _read(path):
    with h5py.File(path, "r") as f:
        return {k: f[k][:] for k in f}, dict(f.attrs)


def test_rows_equal_hidden_states(cached, corpus):
    pair, path = cached
    data, attrs = _read(path)
    df = pl.read_parquet(corpus)
    bos = pair.tokenizer.bos_token_id
    assert attrs["layer"] == LAYER and attrs["d_model"] == pair.base.config.hidden_size
    assert attrs["base_model"] == pair.base_name and attrs["chat_model"] == pair.chat_name and "committed_rows" not in attrs
    assert len(data["base"]) == sum(len(s) - 1 for s in df["input_ids"].to_list())  # every token but the BOS
    assert not (data["tokens"] == bos).any() and data["pos"].min() == 1
    for s in range(len(df)):  # each sequence alone, unpadded, through the full HF forward
        rows = np.flatnonzero(data["seq"] == s)
        row = df.row(s, named=True)
        ids = torch.tensor(row["input_ids"])[None]
        pos = data["pos"][rows]
        assert np.array_equal(pos, np.arange(1, ids.shape[1]))
        assert np.array_equal(data["tokens"][rows], ids[0, 1:].numpy())
        assert np.array_equal(data["template"][rows], np.array(row["template"][1:]))
        assert (data["source"][rows] == row["source"]).all()
        for name, model in (("base", pair.base), ("chat", pair.chat)):
            with torch.inference_mode():
                ref = model(input_ids=ids, output_hidden_states=True).hidden_states[LAYER + 1][0, pos]
            torch.testing.assert_close(torch.from_numpy(data[name][rows]).float(), ref, rtol=2e-3, atol=2e-3)
    for name in ("base", "chat"):  # attrs carry the mean L2 norm of what is stored
        assert attrs[f"norm_{name}"] == pytest.approx(np.linalg.norm(data[name].astype(np.float64), axis=1).mean(), rel=1e-5)
    assert attrs["norm_ratio"] == pytest.approx(attrs["norm_chat"] / attrs["norm_base"])
    assert attrs["sink_rows_excluded"] == len(df) and attrs["outlier_rows"] == 0 and attrs["outlier_factor"] == 10.0
    assert summary(path) == {"rows": len(data["base"]), "dtype": "float16", "sink_rows_excluded": len(df),
                             "outlier_factor": 10.0, "outlier_rows": 0, "outlier_max_ratio": attrs["outlier_max_ratio"],
                             "outliers_dropped": False, "norm_base": attrs["norm_base"],
                             "norm_chat": attrs["norm_chat"], "norm_ratio": attrs["norm_ratio"]}


def test_interrupted_run_resumes_to_identical_file(cached_gemma, corpus, tmp_path):
    pair, path = cached_gemma
    out = tmp_path / "train.h5"
    with pytest.raises(RuntimeError, match="test hook"):
        write_cache(pair, LAYER, corpus, out, stop_after_chunks=3, **KW)
    assert not out.exists() and Path(f"{out}.partial").exists()
    with h5py.File(f"{out}.partial") as f:
        assert f.attrs["committed_rows"] == 3 * KW["chunk_rows"]
    write_cache(pair, LAYER, corpus, out, **KW)
    assert not Path(f"{out}.partial").exists()
    (a, attrs_a), (b, attrs_b) = _read(path), _read(out)
    assert attrs_a == attrs_b and a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k


KILLER = f"""
import os, signal, sys, h5py
from crossdiff.cache import write_cache
from crossdiff.models import load_pair
n, calls, flush = int(sys.argv[5]), [0], h5py.File.flush
def dying_flush(self):
    calls[0] += 1
    if calls[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
    flush(self)
h5py.File.flush = dying_flush
pair = load_pair(sys.argv[1], sys.argv[2])
write_cache(pair, {LAYER}, sys.argv[3], sys.argv[4], **{KW!r})
"""


def test_sigkill_mid_commit_then_resume_is_identical(cached_gemma, tiny_pair, corpus, tmp_path):
    """A real kill (no clean close of the HDF5 file) in the middle of a commit, in a separate process."""
    pair, path = cached_gemma
    out = tmp_path / "train.h5"
    # flush 1 follows file creation, then each commit flushes its data (even) and its commit mark (odd):
    # the 6th flush is chunk 3's data, its mark not yet written
    r = subprocess.run([sys.executable, "-c", KILLER, *map(str, tiny_pair("gemma2")), str(corpus), str(out), "6"],
                       capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    with h5py.File(f"{out}.partial") as f:
        assert f.attrs["committed_rows"] == 2 * KW["chunk_rows"]
    write_cache(pair, LAYER, corpus, out, **KW)
    (a, attrs_a), (b, attrs_b) = _read(path), _read(out)
    assert attrs_a == attrs_b
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_shards_merge_to_the_unsharded_file(cached_gemma, corpus, tmp_path):
    pair, path = cached_gemma
    shards = [write_cache(pair, LAYER, corpus, tmp_path / f"train-{i}.h5", shard=i, num_shards=2, **KW) for i in (1, 0)]
    assert all(len(ActivationCache(s)) > 0 for s in shards)
    script("merge_activations").main(["--params", "{}", "--out", str(tmp_path / "train.h5"), *map(str, shards)])
    (a, attrs_a), (b, attrs_b) = _read(path), _read(tmp_path / "train.h5")
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    for k in ("norm_base", "norm_chat"):
        assert attrs_b[k] == pytest.approx(attrs_a[k], rel=1e-9)


def test_position_zero_is_excluded_without_bos(cached_gemma, corpus, tmp_path):
    """A tokenizer without BOS (Qwen) makes its first token the attention sink: position 0 goes whatever it is,
    and a BOS inside a sequence goes too."""
    pair, _ = cached_gemma
    bos = pair.tokenizer.bos_token_id
    df = pl.read_parquet(corpus)
    ids = [s[1:] if i % 2 else s[1:3] + [bos] + s[3:] for i, s in enumerate(df["input_ids"].to_list())]
    tmpl = [t[1:] if i % 2 else t[1:3] + [True] + t[3:] for i, t in enumerate(df["template"].to_list())]
    no_bos = tmp_path / "no_bos.parquet"
    df.with_columns(pl.Series("input_ids", ids, dtype=df["input_ids"].dtype), pl.Series("template", tmpl)).write_parquet(no_bos)
    data, attrs = _read(write_cache(pair, LAYER, no_bos, tmp_path / "acts.h5", **KW))
    assert data["pos"].min() == 1 and not (data["tokens"] == bos).any()
    assert len(data["base"]) == sum(len(s) - 1 for s in ids) - len(ids[::2])
    assert attrs["sink_rows_excluded"] == len(ids) + len(ids[::2])
    for s in (0, 1):
        rows = data["seq"] == df["seq"][s]
        assert data["tokens"][rows][0] == ids[s][1]


@pytest.fixture(scope="module")
def loud_pair(tiny_pair):
    """The tiny Gemma with embeddings scaled so its residual stream exceeds float16's range (as Gemma 3's
    first token does at |x| ~ 83,000)."""
    pair = load_pair(*map(str, tiny_pair("gemma2")), layer=LAYER)
    for m in (pair.base, pair.chat):
        m.get_input_embeddings().weight.data *= 1e6
    return pair


def test_float16_overflow_is_an_error_naming_the_token(loud_pair, corpus, tmp_path):
    out = tmp_path / "acts.h5"
    with pytest.raises(CacheError, match=r"non-finite base \(float16-stored\) activation at sequence \d+, position \d+.*"
                                         r"activations.dtype: bfloat16 or float32"):
        write_cache(loud_pair, LAYER, corpus, out, **KW)
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_wide_dtypes_hold_large_activations(loud_pair, corpus, tmp_path, dtype):
    path = write_cache(loud_pair, LAYER, corpus, tmp_path / "acts.h5", dtype=dtype, **KW)
    c = ActivationCache(path)
    assert c.dtype == dtype
    x = torch.cat([b["acts"] for b in c.iter_sequential(64, fields=("acts",))])
    assert x.abs().max() > 65504 and torch.isfinite(x).all()
    with h5py.File(path) as f:  # the stored values are the model's, to the storage precision
        row = int(np.flatnonzero(f["seq"][:] == 0)[0])
        seq0 = pl.read_parquet(corpus)["input_ids"][0].to_list()
        with torch.inference_mode():
            ref = loud_pair.base(input_ids=torch.tensor([seq0]), output_hidden_states=True).hidden_states[LAYER + 1][0, 1]
        rtol = 1e-2 if dtype == "bfloat16" else 1e-5
        torch.testing.assert_close(x[row, 0], ref, rtol=rtol, atol=rtol * ref.abs().max().item())


def _hand_written(path, base, chat=None, chunk=16):
    n, d = base.shape
    with h5py.File(path, "w") as f:
        f.create_dataset("base", data=base, chunks=(chunk, d))
        f.create_dataset("chat", data=-base if chat is None else chat, chunks=(chunk, d))
        for k, dt in FIELDS.items():
            f.create_dataset(k, data=np.arange(n).astype(dt), chunks=(chunk,))
        f.attrs.update(layer=0, d_model=d, norm_base=1.0, norm_chat=1.0)
    return path


@pytest.mark.parametrize("drop", [False, True])
def test_norm_outliers_are_reported_and_optionally_dropped(tmp_path, drop):
    rng = np.random.default_rng(0)
    base = rng.normal(size=(200, 8)).astype(np.float32)
    base[[7, 150]] *= 100  # two massive activations
    path = _hand_written(tmp_path / "acts.h5", base)
    out = screen_outliers(path, factor=10, drop=drop)
    data, attrs = _read(out)
    assert attrs["outlier_rows"] == 2 and attrs["outlier_examples"] == "7:7, 150:150" and attrs["outlier_max_ratio"] > 50
    if drop:
        assert len(data["base"]) == 198 and 7 not in data["seq"] and 150 not in data["seq"]
        assert attrs["norm_base"] == pytest.approx(np.linalg.norm(np.delete(base, [7, 150], 0), axis=1).mean(), rel=1e-5)
        assert not path.exists()
    else:
        assert out == path and len(data["base"]) == 200


def test_reader_refuses_non_finite_rows(tmp_path):
    base = np.ones((100, 4), np.float16)
    base[42, 1] = np.inf
    c = ActivationCache(_hand_written(tmp_path / "acts.h5", base))
    with pytest.raises(CacheError, match=r"non-finite activations in 1 rows, first at row 42"):
        list(c.iter_sequential(32, fields=("acts",)))
    with pytest.raises(CacheError, match=r"first at row 42"):
        list(c.iter_shuffled(batch_size=10, seed=0))


def test_reader_accepts_finite_rows_whose_sum_overflows(tmp_path):
    """The reader's one-pass check sums a batch; a float32 cache of huge finite values overflows that sum and
    must fall through to the exact row check, which passes them."""
    base = np.full((40, 4), 3e37, np.float32)
    c = ActivationCache(_hand_written(tmp_path / "acts.h5", base, chat=base))
    (x,) = [b["acts"] for b in c.iter_sequential(40, fields=("acts",))]
    assert not torch.isfinite(x.sum()) and torch.isfinite(x).all() and x.shape == (40, 2, 4)
    assert sum(b.shape[0] for b in c.iter_shuffled(batch_size=10, seed=0)) == 40


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A cache in the public format written by hand: row i holds i in base and -i in chat (exact in float16)."""
    path = tmp_path_factory.mktemp("synthetic") / "acts.h5"
    n, d = 1001, 3
    with h5py.File(path, "w") as f:
        f.create_dataset("base", data=np.repeat(np.arange(n, dtype=np.float16)[:, None], d, 1), chunks=(16, d))
        f.create_dataset("chat", data=-f["base"][:], chunks=(16, d))
        for k, dt in FIELDS.items():
            f.create_dataset(k, data=np.arange(n).astype(dt), chunks=(16,))
        f.attrs.update(layer=0, d_model=d, norm_base=1.0, norm_chat=1.0)
    return path


def _ids(batches):
    return [b[:, 0, 0].long().tolist() for b in batches]


def test_shuffled_reader_is_deterministic_and_exact(synthetic):
    c = ActivationCache(synthetic)
    kw = dict(batch_size=37, buffer_rows=64)
    epoch0 = list(c.iter_shuffled(seed=3, epoch=0, **kw))
    assert all(b.dtype == torch.float32 and b.shape[1:] == (2, 3) for b in epoch0)
    assert all(torch.equal(b[:, 1], -b[:, 0]) for b in epoch0)  # base and chat of the same row stay paired
    ids = _ids(epoch0)
    flat = sum(ids, [])
    assert sorted(flat) == list(range(c.n))  # every row exactly once
    assert [len(b) for b in ids[:-1]] == [37] * (len(ids) - 1) and 0 < len(ids[-1]) <= 37
    assert flat != sorted(flat)
    assert _ids(c.iter_shuffled(seed=3, epoch=0, **kw)) == ids
    other = sum(_ids(c.iter_shuffled(seed=3, epoch=1, **kw)), [])
    assert sorted(other) == list(range(c.n)) and other != flat
    for skip in (1, 5, 13, len(ids) - 1):  # a resumed trainer continues exactly, wherever it stopped
        assert _ids(c.iter_shuffled(seed=3, epoch=0, skip_batches=skip, **kw)) == ids[skip:]


def test_sequential_reader(synthetic):
    c = ActivationCache(synthetic)
    got = list(c.iter_sequential(100, fields=("acts", "seq", "base"), limit=250))
    assert [len(b["seq"]) for b in got] == [100, 100, 50]
    assert torch.equal(torch.cat([b["seq"] for b in got]), torch.arange(250, dtype=torch.int32))
    acts = torch.cat([b["acts"] for b in got])
    assert acts.dtype == torch.float32 and torch.equal(acts[:, 0, 0], torch.arange(250.0))
    assert torch.equal(acts[:, 1], -acts[:, 0])
    assert got[0]["base"].dtype == torch.float16
    with pytest.raises(KeyError, match="no fields"):
        next(c.iter_sequential(10, fields=("nope",)))
