"""Normalisation modes (the space of Δnorm and ν), the authors' init and aux loss as options (issue 18)."""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from crossdiff.cache import ActivationCache
from crossdiff.crosscoder import CrossCoder, CrossCoderConfig, geometric_median, scale_from_norms
from crossdiff.latents import delta_norm, normalisation_space
from crossdiff.scaling import latent_scaling
from crossdiff.train import TrainConfig, authors_aux_loss, mean_norms, train

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

D_MODEL, DICT = 8, 12


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_cache(path, h: np.ndarray):
    """A public-format cache of raw activations h (N, 2, d) with the mean-norm attrs the trainer reads."""
    n, _, d = h.shape
    with h5py.File(path, "w") as f:
        f.create_dataset("base", data=h[:, 0].astype(np.float16), chunks=(min(256, n), d))
        f.create_dataset("chat", data=h[:, 1].astype(np.float16), chunks=(min(256, n), d))
        for name, dt in (("tokens", np.int32), ("seq", np.int32), ("pos", np.int32), ("template", bool),
                         ("source", np.uint8)):
            f.create_dataset(name, data=np.zeros(n, dt))
        norms = np.linalg.norm(h.astype(np.float16).astype(np.float64), axis=-1).mean(0)
        f.attrs.update(base_model="b", chat_model="c", layer=0, d_model=d, tokenizer="t", created_by="test",
                       norm_base=float(norms[0]), norm_chat=float(norms[1]))
    return path


def raw_acts(n=512, d=D_MODEL, r=1.25, seed=0):
    """Raw activations whose chat norms are r times the base norms on average."""
    g = torch.Generator().manual_seed(seed)
    base = 3.0 * torch.randn(n, d, generator=g) + 1.0
    chat = r * (base + 0.3 * torch.randn(n, d, generator=g))
    return torch.stack([base, chat], 1)


# ----------------------------------------------------------------------------------------- scales

@pytest.mark.parametrize("mode", ["per_model", "shared", "none"])
def test_each_mode_scales_a_tiny_cache_as_defined(tmp_path, mode):
    h = raw_acts()
    cache = ActivationCache(write_cache(tmp_path / "c.h5", h.numpy()))
    nb, nc = mean_norms(cache)
    s = scale_from_norms(D_MODEL, nb, nc, mode)
    x = torch.from_numpy(np.stack([cache_h5(cache, "base"), cache_h5(cache, "chat")], 1)).double() * s.double()[:, None]
    mean = x.norm(dim=-1).mean(0)
    if mode == "per_model":      # each model at mean norm √d
        assert mean.tolist() == pytest.approx([math.sqrt(D_MODEL)] * 2, rel=1e-4)
    elif mode == "shared":       # one scalar: the mean of both means is √d, the ratio r is kept
        assert s[0] == s[1]
        assert float(mean.mean()) == pytest.approx(math.sqrt(D_MODEL), rel=1e-4)
        assert float(mean[1] / mean[0]) == pytest.approx(nc / nb, rel=1e-5)
    else:                        # raw
        assert s.tolist() == [1.0, 1.0]
    assert nc / nb == pytest.approx(1.25, rel=0.05)


def cache_h5(cache, name):
    with h5py.File(cache.path) as f:
        return f[name][:].astype(np.float64)


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="normalisation"):
        scale_from_norms(4, 1.0, 1.0, "per-model")
    with pytest.raises(ValueError, match="normalisation"):
        TrainConfig.from_params({"type": "l1", "normalisation": "raw"})
    with pytest.raises(ValueError, match="aux_loss"):
        TrainConfig.from_params({"type": "batchtopk", "k": 2, "aux_loss": "openai"})


# ---------------------------------------------------------------------------- Δnorm and ν by space

def same_raw_crosscoder(scale: torch.Tensor, seed=0) -> tuple[CrossCoder, CrossCoder]:
    """Two L1 crosscoders computing the same raw function: one on raw inputs (`none`), one in the space of
    `scale` (encoder divided by s_m, decoder and bias times s_m)."""
    torch.manual_seed(seed)
    raw = CrossCoder(CrossCoderConfig(D_MODEL, DICT, "l1", normalisation="none"))
    with torch.no_grad():
        raw.W_enc.normal_(0, 0.3)
        raw.W_dec.normal_(0, 0.3)
        raw.b_enc.normal_(0, 0.5)
        raw.b_dec.normal_(0, 0.2)
    scaled = CrossCoder(CrossCoderConfig(D_MODEL, DICT, "l1"), scale=scale)
    with torch.no_grad():
        scaled.W_enc.copy_(raw.W_enc / scale[:, None, None])
        scaled.W_dec.copy_(raw.W_dec * scale[:, None, None])
        scaled.b_enc.copy_(raw.b_enc)
        scaled.b_dec.copy_(raw.b_dec * scale[:, None])
    return raw, scaled


def test_equal_raw_decoder_norms_give_half_in_raw_and_shared_space_not_per_model():
    """The issue's example: r = 1.25, equal raw decoder norms -> Δnorm 0.5 raw/shared, 0.4 per model."""
    nb, nc = 10.0, 12.5
    for mode, want in (("none", 0.5), ("shared", 0.5), ("per_model", 0.4)):
        s = scale_from_norms(D_MODEL, nb, nc, mode)
        cc = CrossCoder(CrossCoderConfig(D_MODEL, DICT, "l1", normalisation=mode), scale=s)
        with torch.no_grad():
            cc.W_dec[1].copy_(cc.W_dec[0])                   # equal directions and norms in raw space ...
            cc.W_dec.mul_(s[:, None, None])                  # ... stored in the crosscoder's space
        raw = cc.decoder_raw().norm(dim=-1)
        assert torch.allclose(raw[0], raw[1])
        n = cc.decoder_norms().detach().numpy()
        assert delta_norm(n[0], n[1]) == pytest.approx(np.full(DICT, want), abs=1e-6)


def brute_nu_raw(cc_raw: CrossCoder, h: torch.Tensor) -> dict[str, np.ndarray]:
    """ν^ε and ν^r in raw space by torch.linalg.lstsq per latent (eq. 5, targets A.6)."""
    h = h.double()
    W, b = cc_raw.W_dec.detach().double(), cc_raw.b_dec.detach().double()
    f = cc_raw.encode(h.float()).detach().double()
    rec = torch.einsum("nD,mDd->nmd", f, W) + b
    out = {"nu_eps": np.full(DICT, np.nan), "nu_r": np.full(DICT, np.nan)}
    for j in range(DICT):
        if not (f[:, j] > 0).any():
            continue
        A = (f[:, j, None] * W[1, j]).reshape(-1, 1)          # f_j d_j^chat, flattened over tokens
        betas = {}
        for name, y in (("eps", h - rec + f[:, j, None, None] * W[:, j]), ("r", rec)):
            betas[name] = [float(torch.linalg.lstsq(A, y[:, m].reshape(-1, 1)).solution) for m in range(2)]
        out["nu_eps"][j] = betas["eps"][0] / betas["eps"][1]
        out["nu_r"][j] = betas["r"][0] / betas["r"][1]
    return out


def test_nu_per_model_is_raw_nu_times_r_and_none_is_raw():
    h = raw_acts(n=400, r=1.25, seed=3)
    nb, nc = (float(v) for v in h.norm(dim=-1).mean(0))
    r = nc / nb
    brute = brute_nu_raw(*same_raw_crosscoder(torch.ones(2))[:1], h)
    ok = np.isfinite(brute["nu_eps"]) & np.isfinite(brute["nu_r"])
    assert ok.sum() >= DICT // 2
    for mode, factor in (("none", 1.0), ("shared", 1.0), ("per_model", r)):
        raw, cc = same_raw_crosscoder(scale_from_norms(D_MODEL, nb, nc, mode))
        assert torch.allclose(cc.encode(h), raw.encode(h), atol=1e-4)        # the same raw function
        got = latent_scaling(cc, [h], progress=False).betas(cc.W_dec)
        for c in ("nu_eps", "nu_r"):
            assert got[c][ok] == pytest.approx(brute[c][ok] * factor, rel=1e-4, abs=1e-6), (mode, c)


def test_normalisation_space_names_the_space(tmp_path):
    for mode, nu_to_raw in (("per_model", 1 / 1.25), ("shared", 1.0), ("none", 1.0)):
        cc = CrossCoder(CrossCoderConfig(D_MODEL, DICT, "l1", normalisation=mode,
                                         extra={"cache": {"norm_base": 10.0, "norm_chat": 12.5}}),
                        scale=scale_from_norms(D_MODEL, 10.0, 12.5, mode))
        cc.save(tmp_path / mode)
        sp = normalisation_space(tmp_path / mode)
        assert sp["normalisation"] == mode and sp["norm_ratio"] == pytest.approx(1.25)
        assert sp["nu_to_raw"] == pytest.approx(nu_to_raw, rel=1e-6)
        assert sp["scale"] == pytest.approx(scale_from_norms(D_MODEL, 10.0, 12.5, mode).tolist())
    cfg = json.loads((tmp_path / "per_model" / "config.json").read_text())
    del cfg["normalisation"]                                  # a checkpoint from before the option
    (tmp_path / "per_model" / "config.json").write_text(json.dumps(cfg))
    assert normalisation_space(tmp_path / "per_model")["normalisation"] == "per_model"


# ------------------------------------------------------------------------------ the authors' choices

@pytest.mark.parametrize("kind,init,init_norm,want", [
    ("l1", "crossdiff", None, 0.1), ("batchtopk", "crossdiff", None, 0.1),
    ("l1", "authors", None, 0.005), ("batchtopk", "authors", None, 1.0), ("batchtopk", "authors", 0.3, 0.3)])
def test_init_gives_the_stated_decoder_norms(kind, init, init_norm, want):
    params = {"type": kind, "init": init, **({"k": 2} if kind == "batchtopk" else {}),
              **({"init_norm": init_norm} if init_norm else {})}
    cfg = TrainConfig.from_params(params)
    cc = CrossCoder(CrossCoderConfig(D_MODEL, DICT, kind, k=cfg.k, init_norm=cfg.resolved_init_norm()))
    assert torch.allclose(cc.decoder_norms(), torch.full((2, DICT), want), rtol=1e-5)
    assert torch.equal(cc.W_dec[0], cc.W_dec[1]) and torch.equal(cc.W_dec, cc.W_enc.transpose(1, 2))  # A.12


def test_geometric_median_minimises_the_sum_of_distances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, 3, generator=g, dtype=torch.float64)
    x[:5, 0] += 20.0                                           # outliers pull the mean, not the median
    gm = geometric_median(x, max_iter=1000, tol=1e-12)
    for m in range(2):
        pts = x[:, m].numpy()
        res = minimize(lambda c, p=pts: np.linalg.norm(p - c, axis=1).sum(), pts.mean(0), method="Nelder-Mead",
                       options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000})
        assert gm[m].numpy() == pytest.approx(res.x, abs=1e-4)
        cost = lambda c, p=pts: np.linalg.norm(p - c, axis=1).sum()
        assert cost(gm[m].numpy()) <= cost(res.x) + 1e-9
        assert cost(gm[m].numpy()) < cost(pts.mean(0))


def test_authors_aux_loss_matches_the_direct_formula():
    g = torch.Generator().manual_seed(1)
    eps, eps_hat = torch.randn(6, 2, 4, generator=g), torch.randn(6, 2, 4, generator=g)
    e, eh = eps.reshape(6, -1).numpy().astype(np.float64), eps_hat.reshape(6, -1).numpy().astype(np.float64)
    num = np.mean([np.sum((e[n] - eh[n]) ** 2) for n in range(6)])          # squared norm, concatenated
    den = np.mean([np.sum((e[n] - e.mean(0)) ** 2) for n in range(6)])      # variance of the residual
    assert float(authors_aux_loss(eps, eps_hat)) == pytest.approx(num / den, rel=1e-5)
    assert float(authors_aux_loss(torch.ones(3, 2, 4), torch.zeros(3, 2, 4))) == 0.0  # constant ε: no term


def test_authors_k_aux_is_half_d_unless_set():
    cfg = TrainConfig.from_params({"type": "batchtopk", "k": 2, "aux_loss": "authors"})
    assert cfg.resolved_k_aux(128) == 64
    assert TrainConfig.from_params({"type": "batchtopk", "k": 2}).resolved_k_aux(128) == 256
    assert TrainConfig.from_params({"type": "batchtopk", "k": 2, "aux_loss": "authors",
                                    "k_aux": 10}).resolved_k_aux(128) == 10


def test_training_records_the_space_and_starts_b_dec_at_the_geometric_median(tmp_path):
    h = raw_acts(n=1024, r=1.25, seed=5)
    path = write_cache(tmp_path / "train.h5", h.numpy())
    params = dict(type="batchtopk", expansion=2, k=2, lr=1e-9, lr_warmup=0.0, lr_decay=0.0, batch_size=256,
                  max_steps=1, val_every=1, init="authors", aux_loss="authors", normalisation="shared")
    m = train(path, None, tmp_path / "out", params, progress=False)
    cc = CrossCoder.load(tmp_path / "out")
    assert cc.cfg.normalisation == "shared" and cc.cfg.init_norm == 1.0
    assert m["normalisation"] == "shared" and m["norm_ratio"] == pytest.approx(1.25, rel=0.05)
    assert m["scale"] == pytest.approx(cc.scale.tolist()) and m["k_aux"] == D_MODEL // 2
    first = next(ActivationCache(path).iter_shuffled(256, seed=0, epoch=0))
    want = geometric_median(cc.normalize(first))
    assert torch.allclose(cc.b_dec, want, atol=1e-5)           # one step at lr 1e-9 moves it by ~1e-9
    assert not torch.allclose(want, cc.normalize(first).mean(0), atol=1e-3)
