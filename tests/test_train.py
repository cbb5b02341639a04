"""Trainer end to end on small synthetic caches in the public HDF5 format (DESIGN §3)."""

import json

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from crossdiff.cache import CacheError
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.train import NonFiniteLoss, adam, l1_loss, recon_per_token, train

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These sizes are far below where OpenMP pays off; on a shared busy machine each parallel op would
    cost a fork/join wait of ~15 ms."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_cache(path, base, chat, chunk=256, norms=True):
    """A cache file exactly as a user would bring it: float16 base/chat + per-token fields + attrs."""
    n, d = base.shape
    with h5py.File(path, "w") as f:
        f.create_dataset("base", data=base.astype(np.float16), chunks=(min(chunk, n), d))
        f.create_dataset("chat", data=chat.astype(np.float16), chunks=(min(chunk, n), d))
        for name, dt in (("tokens", np.int32), ("seq", np.int32), ("pos", np.int32), ("template", bool), ("source", np.uint8)):
            f.create_dataset(name, data=np.zeros(n, dt))
        f.attrs.update(base_model="b", chat_model="c", layer=0, d_model=d, tokenizer="t", created_by="test")
        if norms:
            f.attrs.update(norm_base=float(np.linalg.norm(base, axis=1).mean()),
                           norm_chat=float(np.linalg.norm(chat, axis=1).mean()))
    return path


def synthetic(n, d=16, n_feat=24, rate=0.08, seed=0, dir_seed=0):
    """Activations built from known sparse directions: shared features (same direction in both models),
    chat-only and base-only ones. Returns base, chat and the true stacked directions (F, 2d)."""
    dirs = np.random.default_rng(dir_seed).standard_normal((n_feat, 2, d))
    rng = np.random.default_rng([dir_seed, seed])
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
    dirs[: n_feat // 2, 1] = dirs[: n_feat // 2, 0]                 # shared
    dirs[n_feat // 2: 3 * n_feat // 4, 0] = 0                       # chat-only
    dirs[3 * n_feat // 4:, 1] = 0                                   # base-only
    acts = (rng.random((n, n_feat)) < rate) * rng.uniform(0.5, 2.0, (n, n_feat))
    h = np.einsum("nf,fmd->nmd", acts, dirs) + 0.01 * rng.standard_normal((n, 2, d))
    return h[:, 0], h[:, 1], dirs.reshape(n_feat, -1)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    b, c, dirs = synthetic(6144)
    vb, vc, _ = synthetic(1024, seed=1)
    return write_cache(tmp / "train.h5", b, c), write_cache(tmp / "val.h5", vb, vc), dirs


BTK = dict(type="batchtopk", expansion=4, k=2, k_aux=8, dead_tokens=2048, theta_momentum=0.9, lr=1e-2,
           lr_warmup=0.05, lr_decay=0.2, batch_size=256, epochs=8, val_every=20, checkpoint_every=10,
           init_norm=0.1)


def test_batchtopk_recovers_known_directions(caches, tmp_path):
    train_h5, val_h5, dirs = caches
    m = train(train_h5, val_h5, tmp_path / "out", BTK, progress=False)
    cc = CrossCoder.load(tmp_path / "out")
    W = cc.decoder_raw().permute(1, 0, 2).reshape(cc.cfg.dict_size, -1)
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = torch.from_numpy(dirs).float() @ W.T / torch.from_numpy(np.linalg.norm(dirs, axis=1)).float()[:, None]
    assert cos.max(1).values.mean() > 0.9
    assert m["train"]["k_used"] == BTK["k"] and m["k"] == BTK["k"]   # the k used is the k configured
    assert m["val"]["fve"] > 0.7 and 0 < m["val"]["l0"] < 4 * BTK["k"]
    assert m["threshold"] > 0
    assert not m["centered"] and m["mean_share"] < 0.5               # center: auto leaves zero-mean data alone
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert set(saved) >= {"train", "val"} and saved["val"]["fve_base"] is not None
    assert (tmp_path / "out" / "dvclive" / "plots" / "metrics" / "val" / "fve.tsv").exists()


def test_k_is_capped_at_its_share_of_d_model(caches, tmp_path):
    """k_max_per_dim: d = 16, so 0.125 caps k = 4 at 2; training, metrics and the saved config all use the cap."""
    train_h5, val_h5, _ = caches
    m = train(train_h5, val_h5, tmp_path / "out", {**BTK, "k": 4, "k_max_per_dim": 0.125, "epochs": 1}, progress=False)
    assert m["k"] == 2 and m["k_requested"] == 4 and m["target_l0"] == 2 and m["train"]["k_used"] == 2
    assert CrossCoder.load(tmp_path / "out").cfg.k == 2
    m = train(train_h5, val_h5, tmp_path / "free", {**BTK, "k": 4, "k_max_per_dim": None, "epochs": 1}, progress=False)
    assert m["k"] == 4 and m["train"]["k_used"] == 4


def test_a_dominant_mean_is_centred_and_folded_into_the_saved_model(tmp_path):
    """center: auto trains on x − E[x] when the mean carries most of E‖x‖² (as a real LM's massive
    activations do); the saved crosscoder, biases folded, gives on raw val data the FVE and L0 the run
    measured while centred, and still finds the planted directions."""
    from crossdiff.cache import ActivationCache
    from crossdiff.train import evaluate
    b, c, dirs = synthetic(6144)
    vb, vc, _ = synthetic(1024, seed=1)
    off = np.random.default_rng(5).standard_normal((2, 16))
    off *= 3 / np.linalg.norm(off, axis=1, keepdims=True)
    tr, va = write_cache(tmp_path / "t.h5", b + off[0], c + off[1]), write_cache(tmp_path / "v.h5", vb + off[0], vc + off[1])
    m = train(tr, va, tmp_path / "out", BTK, progress=False)
    assert m["centered"] and m["mean_share"] > 0.5
    cc = CrossCoder.load(tmp_path / "out")
    again = evaluate(cc, ActivationCache(va))
    assert again["fve"] == pytest.approx(m["val"]["fve"], abs=1e-4) and again["l0"] == pytest.approx(m["val"]["l0"], rel=1e-3)
    W = cc.decoder_raw().permute(1, 0, 2).reshape(cc.cfg.dict_size, -1)
    W = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = torch.from_numpy(dirs).float() @ W.T / torch.from_numpy(np.linalg.norm(dirs, axis=1)).float()[:, None]
    assert cos.max(1).values.mean() > 0.9
    assert not train(tr, va, tmp_path / "plain", dict(BTK, epochs=1, center=False), progress=False)["centered"]


@pytest.mark.parametrize("kind", ["batchtopk", "l1"])
def test_resume_is_bitwise_identical(caches, tmp_path, kind):
    train_h5, val_h5, _ = caches
    p = dict(BTK, epochs=1.5, lr=3e-3) if kind == "batchtopk" else dict(type="l1", expansion=4, mu=0.05, mu_warmup=0.1,
                                                                lr=3e-3, batch_size=256, epochs=1.5,
                                                                val_every=20, checkpoint_every=10)
    train(train_h5, val_h5, tmp_path / "full", p, progress=False)
    ck = tmp_path / "ck"
    r = train(train_h5, val_h5, tmp_path / "part", p, checkpoints=ck, stop_after=25, progress=False)
    assert r == {"stopped_at": 25} and (ck / "step_00000020" / "state.safetensors").exists()
    train(train_h5, val_h5, tmp_path / "part", p, checkpoints=ck, progress=False)   # resumes from step 20
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nonfinite_loss_names_the_step(tmp_path):
    b, c, _ = synthetic(1024)
    b[700:] = np.inf
    h5 = write_cache(tmp_path / "bad.h5", b, c, norms=False)
    with pytest.raises((NonFiniteLoss, ValueError, CacheError), match="step|norm|non-finite activations"):
        train(h5, None, tmp_path / "o", dict(BTK, epochs=1), progress=False)
    b[700:] = 1e30  # overflows to inf in float16 storage, but norms given: the loss becomes non-finite
    h5 = write_cache(tmp_path / "bad2.h5", np.nan_to_num(b, posinf=1e4), c)
    with h5py.File(h5, "a") as f:
        f["base"][700:] = np.inf
    with pytest.raises((NonFiniteLoss, CacheError), match=r"at step \d+|first at row \d+"):
        train(h5, None, tmp_path / "o2", dict(BTK, epochs=1), progress=False)


def test_an_exactly_reconstructed_zero_row_keeps_the_gradient_finite():
    """‖ε‖ is not differentiable at 0: a zero activation row with zero biases gave a NaN loss at step 1."""
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(8, 32, "l1"))
    x = torch.randn(4, 2, 8)
    x[0] = 0.0
    out = l1_loss(cc, x, mu=0.1)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in cc.parameters() if p.grad is not None)
    eps = torch.randn(3, 2, 8)
    assert torch.allclose(recon_per_token(eps, "norm"), 0.5 * eps.norm(dim=-1).sum(-1))  # unchanged elsewhere


def test_fused_adam_follows_the_multi_tensor_adam():
    """The trainer's fused Adam takes the steps torch's default Adam takes, to float rounding."""
    torch.manual_seed(0)
    w0 = torch.randn(64, 32)
    ws = [w0.clone().requires_grad_(True) for _ in range(2)]
    opts = [adam([ws[0]], 1e-2), torch.optim.Adam([ws[1]], lr=1e-2, betas=(0.9, 0.999))]
    for step in range(20):
        g = torch.randn(64, 32, generator=torch.Generator().manual_seed(step))
        for w, opt in zip(ws, opts):
            w.grad = g.clone()
            opt.step()
    assert not torch.equal(ws[0].detach(), w0)
    torch.testing.assert_close(ws[0].detach(), ws[1].detach(), rtol=1e-5, atol=1e-6)
