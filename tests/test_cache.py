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
from crossdiff.cache import FIELDS, ActivationCache, merge, write_cache
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


KILLER = """
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
write_cache(pair, %d, sys.argv[3], sys.argv[4], **%r)
""" % (LAYER, KW)


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
    assert acts.dtype == torch.float32 and torch.equal(acts[:, 0, 0], torch.arange(250.0)) and torch.equal(acts[:, 1], -acts[:, 0])
    assert got[0]["base"].dtype == torch.float16
    with pytest.raises(KeyError, match="no fields"):
        next(c.iter_sequential(10, fields=("nope",)))
