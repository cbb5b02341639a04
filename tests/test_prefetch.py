"""The trainer's read-ahead (crossdiff.prefetch): same batches in the same order, errors where they happen,
and a consumer that stops early leaves no producer behind."""

import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import crossdiff.train
from crossdiff.prefetch import prefetch
from test_train import BTK, caches, one_thread  # noqa: F401  (fixtures)


def source(n, log, fail_at=None):
    """A generator that records what it produced, on which thread, and whether it was closed."""
    try:
        for i in range(n):
            if i == fail_at:
                raise OSError(f"unreadable chunk {i}")
            log["made"].append(i)
            log["thread"] = threading.current_thread().name
            yield i
    finally:
        log["closed"] = True


def new_log():
    return {"made": [], "closed": False, "thread": None}


def test_every_item_in_order_from_another_thread():
    log = new_log()
    assert list(prefetch(source(50, log), depth=3)) == list(range(50))
    assert log["closed"] and log["thread"] == "crossdiff-prefetch"


def test_it_reads_ahead_while_the_consumer_works():
    log = new_log()
    it = prefetch(source(10, log), depth=2)
    assert next(it) == 0
    deadline = time.monotonic() + 5
    while len(log["made"]) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert log["made"] == [0, 1, 2, 3]      # 0 taken, 1 and 2 queued, 3 waiting for room: no further
    it.close()


def test_a_producer_error_is_raised_at_its_item():
    log = new_log()
    got = []
    with pytest.raises(OSError, match="unreadable chunk 4"):
        for x in prefetch(source(10, log, fail_at=4)):
            got.append(x)
    assert got == [0, 1, 2, 3] and log["closed"]


def test_stopping_early_closes_the_source_and_ends_the_thread():
    log = new_log()
    it = prefetch(source(1000, log), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    assert log["closed"] and len(log["made"]) <= 3 + 2 + 1
    assert not any(t.name == "crossdiff-prefetch" for t in threading.enumerate())


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        next(prefetch(range(3), depth=0))


def test_training_with_read_ahead_is_bitwise_the_training_without(caches, tmp_path, monkeypatch):  # noqa: F811
    train_h5, val_h5, _ = caches
    p = dict(BTK, epochs=1.5, lr=3e-3)          # 1.5 epochs: the run's end stops a read-ahead mid-epoch
    monkeypatch.setattr(crossdiff.train, "READ_AHEAD", {"cpu"})          # the CUDA path's loader, here
    crossdiff.train.train(train_h5, val_h5, tmp_path / "ahead", p, device="cpu", progress=False)
    monkeypatch.setattr(crossdiff.train, "READ_AHEAD", set())
    crossdiff.train.train(train_h5, val_h5, tmp_path / "inline", p, device="cpu", progress=False)
    a, b = (load_file(tmp_path / r / "model.safetensors") for r in ("ahead", "inline"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
