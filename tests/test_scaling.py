"""Latent Scaling: the one-pass sufficient statistics against per-latent least squares on materialised targets."""

import numpy as np
import pytest
import torch

from crossdiff.crosscoder import CrossCoder, CrossCoderConfig
from crossdiff.scaling import ScalingStats, latent_scaling

D_MODEL, DICT = 6, 12


def random_crosscoder(kind="l1", seed=0, dead=(3,)) -> CrossCoder:
    """float64 crosscoder with unrelated base/chat decoders, a non-trivial scale and b_dec, and `dead` latents
    that can never fire."""
    torch.manual_seed(seed)
    cc = CrossCoder(CrossCoderConfig(D_MODEL, DICT, kind, k=3 if kind == "batchtopk" else None)).double()
    with torch.no_grad():
        cc.W_enc.normal_()
        cc.W_dec.normal_()
        cc.b_enc.fill_(-1.0)
        cc.b_dec.normal_()
        cc.scale.copy_(torch.tensor([0.7, 1.9]))
        for j in dead:
            cc.W_enc[:, :, j] = 0
            cc.b_enc[j] = -1.0
        if kind == "batchtopk":
            cc.threshold.fill_(1.5)
    return cc


def lstsq_betas(cc: CrossCoder, h: torch.Tensor) -> dict[str, np.ndarray]:
    """Reference: for each latent, materialise the four targets (eq. 31-34) and solve eq. 5 with lstsq."""
    x = cc.normalize(h)
    f = cc.encode(h)
    recon = cc.decode_normalized(f)
    W = cc.W_dec.detach()
    out = {k: np.full(DICT, np.nan) for k in ("beta_err_base", "beta_err_chat", "beta_rec_base", "beta_rec_chat")}
    for j in range(DICT):
        if not (f[:, j] > 0).any():
            continue
        A = (f[:, j, None] * W[1, j]).reshape(-1, 1)                     # β f_j(x) d_j^chat, stacked
        for m, name in enumerate(("base", "chat")):
            err = x[:, m] - (recon[:, m] - f[:, j, None] * W[m, j])     # reconstruction without latent j
            for kind, y in (("err", err), ("rec", recon[:, m])):
                out[f"beta_{kind}_{name}"][j] = torch.linalg.lstsq(A, y.reshape(-1, 1)).solution.item()
    return out


@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
@pytest.mark.parametrize("sparse", [True, False, None])
def test_streaming_betas_equal_lstsq(kind, sparse):
    cc = random_crosscoder(kind)
    h = torch.randn(300, 2, D_MODEL, dtype=torch.float64) * 3
    with torch.no_grad():
        stats = latent_scaling(cc, h.split(37), sparse=sparse, progress=False)  # uneven batches
        ref = lstsq_betas(cc, h)
        f = cc.encode(h)
    got = stats.betas(cc.W_dec)
    assert stats.n_tokens == 300
    assert torch.equal(stats.fired.cpu(), (f > 0).sum(0))
    assert (stats.fired > 0).sum() >= DICT - 2, "test data should make most latents fire"
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(got["nu_eps"], ref["beta_err_base"] / ref["beta_err_chat"], rtol=1e-9)
    np.testing.assert_allclose(got["nu_r"], ref["beta_rec_base"] / ref["beta_rec_chat"], rtol=1e-9)
    assert np.isnan(got["beta_err_base"][3]) and np.isnan(got["nu_r"][3])   # never fires -> undefined, not noise


def test_sparse_and_dense_paths_agree_float32():
    cc = random_crosscoder().float()
    h = torch.randn(500, 2, D_MODEL) * 3
    with torch.no_grad():
        a = latent_scaling(cc, h.split(100), sparse=True, progress=False).betas(cc.W_dec)
        b = latent_scaling(cc, h.split(100), sparse=False, progress=False).betas(cc.W_dec)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.parametrize("s", [0.0, 0.3, -0.8])
def test_planted_shrinkage_recovers_scale(s):
    """Complete Shrinkage planted exactly: latent j has d_j^base = 0 but its chat direction is in the base
    activations at scale s, so the base error target is s f_j d_j^chat and β^{ε,base}_j = s."""
    j = 5
    cc = random_crosscoder(dead=())
    with torch.no_grad():
        cc.W_enc[0] = 0                                              # f depends on the chat half only
        cc.W_dec[0, j] = 0
        torch.manual_seed(1)
        xc = torch.randn(400, D_MODEL, dtype=torch.float64) * 3
        f = torch.relu(xc @ cc.W_enc[1] + cc.b_enc)
        xb = f @ cc.W_dec[0] + cc.b_dec[0] + s * f[:, j, None] * cc.W_dec[1, j]
        h = torch.stack([xb, xc], 1) / cc.scale[:, None]              # raw units: the pass normalises
        assert torch.allclose(cc.encode(h), f)
        betas = latent_scaling(cc, h.split(64), progress=False).betas(cc.W_dec)
    assert (f[:, j] > 0).sum() > 20
    assert betas["beta_err_base"][j] == pytest.approx(s, abs=1e-10)
    assert betas["nu_eps"][j] == pytest.approx(s / betas["beta_err_chat"][j], rel=1e-10)


def test_planted_decoupling_shows_in_reconstruction_ratio():
    """Latent Decoupling planted exactly: another latent k reconstructs j's chat direction in the base model
    whenever j fires (f_k = f_j, d_k^base = d_j^chat, d_k^chat = 0), and d_j^base = 0. The base error
    target has no trace of j (ν^ε ≈ 0 is wrong-footed), but the base reconstruction does: β^{r,base} = 1 +
    the part of the other latents' reconstruction along d_j^chat, which we compute directly."""
    j, k = 5, 7
    cc = random_crosscoder(dead=())
    with torch.no_grad():
        cc.W_enc[0] = 0
        cc.W_enc[1, :, k] = cc.W_enc[1, :, j]
        cc.b_enc[k] = cc.b_enc[j]                                      # f_k == f_j exactly
        cc.W_dec[0, j] = 0
        cc.W_dec[0, k] = cc.W_dec[1, j]
        cc.W_dec[1, k] = 0
        torch.manual_seed(2)
        xc = torch.randn(400, D_MODEL, dtype=torch.float64) * 3
        f = torch.relu(xc @ cc.W_enc[1] + cc.b_enc)
        xb = f @ cc.W_dec[0] + cc.b_dec[0]                              # base error is exactly 0
        h = torch.stack([xb, xc], 1) / cc.scale[:, None]
        betas = latent_scaling(cc, h.split(64), progress=False).betas(cc.W_dec)
        d = cc.W_dec[1, j]
        rest = f @ cc.W_dec[0] + cc.b_dec[0] - f[:, k, None] * cc.W_dec[0, k]
        expected = 1 + (f[:, j] * (rest @ d)).sum() / ((f[:, j] ** 2).sum() * (d @ d))
    assert betas["beta_err_base"][j] == pytest.approx(0.0, abs=1e-10)
    assert betas["beta_rec_base"][j] == pytest.approx(expected.item(), rel=1e-10)


def test_shape_errors_are_clear():
    s = ScalingStats.zeros(DICT)
    with pytest.raises(ValueError, match="shape mismatch"):
        s.update(torch.zeros(4, DICT), torch.zeros(5, 2, D_MODEL), torch.zeros(2, DICT, D_MODEL), torch.zeros(2, D_MODEL))


def test_non_finite_input_is_refused():
    D, d = 6, 4
    stats = ScalingStats.zeros(D)
    x = torch.randn(5, 2, d)
    x[3, 1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite activations in 1 rows .*first at batch row 3"):
        stats.update(torch.rand(5, D), x, torch.randn(2, D, d), torch.zeros(2, d))
