"""CrossCoder module and losses against brute-force dense references (paper eq. 1-3, 6-11)."""

import math

import pytest
import torch

from crossdiff import train as train_module
from crossdiff.crosscoder import (
    CrossCoder,
    CrossCoderConfig,
    Selection,
    batch_topk_indices,
    batchtopk_v,
    indices_ge,
    scale_from_norms,
    scratch,
    selected_acts,
    sparse_decode,
)
from crossdiff.train import TrainConfig, aux_selection, batchtopk_loss, l1_loss, update_threshold

D_MODEL, DICT, N = 6, 40, 12
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")


def make(kind="batchtopk", k=3, seed=0):
    torch.manual_seed(seed)
    cc = CrossCoder(CrossCoderConfig(D_MODEL, DICT, kind, k=k if kind == "batchtopk" else None),
                    scale=torch.tensor([0.5, 2.0]))
    with torch.no_grad():  # break the symmetric init so base/chat paths differ
        cc.b_enc.normal_(0, 0.1)
        cc.W_dec.mul_(torch.rand(2, DICT, 1) + 0.2)
        cc.W_enc.add_(0.05 * torch.randn_like(cc.W_enc))
        cc.b_dec.normal_()
    return cc


def grads(cc):
    return [None if p.grad is None else p.grad.clone() for p in (cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec)]


def ref_f(cc, x):
    """Eq. 1 written out per model, no fusion."""
    return torch.relu(x[:, 0] @ cc.W_enc[0] + x[:, 1] @ cc.W_enc[1] + cc.b_enc)


def ref_decode(cc, f):
    return torch.stack([f @ cc.W_dec[0] + cc.b_dec[0], f @ cc.W_dec[1] + cc.b_dec[1]], 1)  # eq. 2


def test_init_a12_and_normalisation_roundtrip(tmp_path):
    cc = CrossCoder(CrossCoderConfig(D_MODEL, DICT, "l1"), scale=scale_from_norms(D_MODEL, 3.0, 7.0))
    assert torch.equal(cc.W_enc[0], cc.W_enc[1]) and torch.equal(cc.W_dec[0], cc.W_dec[1])
    assert torch.equal(cc.W_dec[0], cc.W_enc[0].T)
    assert torch.allclose(cc.W_enc[0].norm(dim=0), torch.full((DICT,), 0.1))
    assert torch.allclose(cc.scale, torch.tensor([math.sqrt(D_MODEL) / 3, math.sqrt(D_MODEL) / 7]))
    h = torch.randn(5, 2, D_MODEL) * 4
    f = cc.encode(h)
    # decode undoes the normalisation: raw-unit reconstruction == normalised reconstruction / scale
    assert torch.allclose(cc.decode(f), ref_decode(cc, f) / cc.scale[:, None])
    assert torch.allclose(cc.decoder_raw()[1], cc.W_dec[1] / cc.scale[1])
    cc.save(tmp_path)
    back = CrossCoder.load(tmp_path)
    assert torch.equal(back.encode(h), f) and back.cfg == cc.cfg
    with pytest.raises(ValueError, match=r"\(N, 2, 6\)"):
        cc.encode(torch.randn(5, D_MODEL))


def test_l1_loss_matches_eq3_and_grads():
    cc = make("l1")
    x = torch.randn(N, 2, D_MODEL)
    mu = 0.3
    for recon in ("norm", "squared"):
        cc.zero_grad()
        r = l1_loss(cc, x, mu, recon)
        r["loss"].backward()
        g = grads(cc)
        cc.zero_grad()
        f = ref_f(cc, x)
        e = x - ref_decode(cc, f)
        nrm = e.norm(dim=-1) if recon == "norm" else e.norm(dim=-1) ** 2
        wsum = cc.W_dec[0].norm(dim=1) + cc.W_dec[1].norm(dim=1)
        ref = (0.5 * (nrm[:, 0] + nrm[:, 1]) + mu * (f * wsum).sum(1)).mean()  # eq. 3
        ref.backward()
        assert torch.allclose(r["loss"], ref, atol=1e-5)
        for a, b in zip(g, grads(cc)):
            assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("b_enc", [0.0, -0.6])   # half the latents active, then a sparse few
def test_l1_loss_sparse_equals_dense(b_enc):
    """The ReLU-support path (issue 19) gives eq. 3's loss, metrics and every gradient of the dense path."""
    torch.manual_seed(3)
    cc = make("l1")
    with torch.no_grad():
        cc.b_enc.fill_(b_enc)
        cc.b_dec.normal_()
    x = torch.randn(N, 2, D_MODEL)
    out = {}
    for sparse in (False, True):
        cc.zero_grad()
        r = l1_loss(cc, x, 0.3, "norm", sparse=sparse)
        r["loss"].backward()
        out[sparse] = r, grads(cc)
    (rd, gd), (rs, gs) = out[False], out[True]
    assert 0 < float(rs["l0"]) < cc.cfg.dict_size
    for key in ("loss", "recon", "sparsity", "l0"):
        assert torch.allclose(rs[key], rd[key], rtol=1e-5, atol=1e-6), key
    assert torch.equal(rs["fired"], rd["fired"]) and torch.allclose(rs["eps"], rd["eps"], atol=1e-5)
    for a, b in zip(gs, gd):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_decode_support_equals_dense_decode():
    """The CSR decode over f's nonzeros (validation, inference) reconstructs what the dense eq. 2 does."""
    torch.manual_seed(4)
    cc = make("l1")
    with torch.no_grad():
        cc.b_dec.normal_()
    for density in (0.05, 0.5):   # sparse: the CSR path; dense: falls back to the dense product
        f = torch.relu(torch.randn(N, DICT)) * (torch.rand(N, DICT) < density)
        assert torch.allclose(cc.decode_support(f), cc.decode_normalized(f), atol=1e-5)
        assert torch.allclose(cc.decode_support(f, f > 0), cc.decode_normalized(f), atol=1e-5)


def test_batch_topk_indices_exact():
    torch.manual_seed(1)
    for n, d, k in ((64, 512, 5), (7, 33, 2), (300, 1000, 40)):
        v = torch.relu(torch.randn(n, d))
        got = batch_topk_indices(v, n * k)
        assert got.numel() == n * k and torch.equal(got, got.sort().values)
        assert torch.equal(got, v.flatten().topk(n * k).indices.sort().values)
    v = torch.zeros(4, 10)  # fewer positives than n*k: still exactly n*k entries
    assert batch_topk_indices(v, 8).numel() == 8


def brute_batchtopk(cc, x, k, dead, k_aux, alpha, recon="norm"):
    """Eq. 6-9 with dense f^train and a dense aux reconstruction."""
    n, DICT = x.shape[0], cc.cfg.dict_size
    f = ref_f(cc, x)
    wsum = cc.W_dec[0].norm(dim=1) + cc.W_dec[1].norm(dim=1)
    v = f * wsum.detach()
    keep = torch.zeros(n * DICT)
    keep[v.flatten().topk(n * k).indices] = 1
    ftrain = f * keep.view(n, DICT)                                                  # eq. 6
    e = x - ref_decode(cc, ftrain)                                                   # eq. 7, 8

    def rec(t):
        nn = t.norm(dim=-1)
        return nn if recon == "norm" else nn ** 2
    loss = 0.5 * rec(e).sum(1).mean()
    n_dead = int(dead.sum())
    if n_dead:
        kk = min(k_aux, n_dead)
        vd = torch.where(dead, v, -torch.inf)
        idx = vd.topk(kk, dim=1).indices
        m = torch.zeros(n, DICT).scatter(1, idx, 1.0)
        fa = f * m
        ehat = torch.stack([fa @ cc.W_dec[0], fa @ cc.W_dec[1]], 1)
        loss = loss + alpha * rec(e.detach() - ehat).sum(1).mean()                  # eq. 9 aux
    vmin = v.flatten()[(ftrain > 0).flatten()].min()
    return loss, vmin


@pytest.mark.parametrize("aux_path", ["dense", "sparse"])
@pytest.mark.parametrize("n_dead,k_aux", [(0, 4), (10, 4), (10, 10), (10, 25), (DICT, 8)])
def test_batchtopk_loss_matches_brute_force(n_dead, k_aux, aux_path, monkeypatch):
    """Both ways of computing the aux term (dense on the dead columns, sparse per entry) against eq. 6-9."""
    monkeypatch.setattr(train_module, "AUX_DENSE_SHARE", 0.0 if aux_path == "dense" else math.inf)
    cc = make("batchtopk", k=3)
    x = torch.randn(N, 2, D_MODEL)
    tsf = torch.zeros(DICT, dtype=torch.long)
    dead_ids = torch.randperm(DICT, generator=torch.Generator().manual_seed(n_dead))[:n_dead]
    tsf[dead_ids] = 10**9                               # dead before this step; stays dead unless fired
    cfg = TrainConfig(type="batchtopk", k=3, k_aux=k_aux, aux_alpha=0.25, dead_tokens=10**8)
    r = batchtopk_loss(cc, x, 3, tsf, cfg)
    r["loss"].backward()
    g = grads(cc)
    assert r["k_used"] == 3 and float(r["l0"]) == 3     # the k used is the k configured
    cc.zero_grad()
    dead = tsf >= cfg.dead_tokens                       # the dead set the step used (after its own firing)
    ref, vmin = brute_batchtopk(cc, x, 3, dead, k_aux, 0.25)
    ref.backward()
    assert torch.allclose(r["loss"], ref, atol=1e-5)
    assert torch.allclose(r["min_v"], vmin)
    for a, b in zip(g, grads(cc)):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    if n_dead == 0:
        assert float(r["aux"].detach()) == 0


def test_sparse_decode_grads_equal_dense():
    cc = make()
    x = torch.randn(N, 2, D_MODEL)
    with torch.no_grad():
        f = cc.pre_acts(x)
    flat = batch_topk_indices(f * cc.latent_weights(), N * 4)
    sel = Selection.from_flat(flat, N, DICT)
    y = torch.randn(N, 2, D_MODEL)
    (sparse_decode(cc, selected_acts(cc, x, f, sel), sel) * y).sum().backward()
    g = grads(cc)[:3]
    cc.zero_grad()
    mask = torch.zeros(N * DICT)
    mask[flat] = 1
    fd = ref_f(cc, x) * mask.view(N, DICT)
    (torch.stack([fd @ cc.W_dec[0], fd @ cc.W_dec[1]], 1) * y).sum().backward()
    for a, b in zip(g, grads(cc)[:3]):
        assert torch.allclose(a, b, atol=1e-5)


def test_aux_selection_is_each_tokens_top_dead_latents():
    """Row by row: the selected columns are the k_aux largest v among the dead latents (all of them when
    fewer are dead), in CSR order."""
    torch.manual_seed(3)
    v = torch.relu(torch.randn(N, DICT))
    dead = torch.rand(DICT) < 0.3
    n_dead = int(dead.sum())
    for k_aux in (1, n_dead, 100):
        sel = aux_selection(v, dead, k_aux)
        assert torch.equal(sel.flat, sel.flat.sort().values)
        for i in range(N):
            got = sel.cols[sel.crow[i]:sel.crow[i + 1]]
            ranked = sorted(dead.nonzero().squeeze(1).tolist(), key=lambda j: -float(v[i, j]))
            assert set(got.tolist()) == set(ranked[:min(k_aux, n_dead)])


def test_threshold_ema_and_inference_encode():
    cc = make("batchtopk", k=3)
    update_threshold(cc, torch.tensor(2.0), 0.9)
    assert float(cc.threshold) == 2.0                   # first estimate initialises θ
    update_threshold(cc, torch.tensor(1.0), 0.9)
    assert math.isclose(float(cc.threshold), 0.9 * 2.0 + 0.1 * 1.0, rel_tol=1e-6)  # eq. 11 EMA
    update_threshold(cc, torch.tensor(float("inf")), 0.9)  # nothing selected: θ unchanged
    assert math.isclose(float(cc.threshold), 1.9, rel_tol=1e-6)
    h = torch.randn(50, 2, D_MODEL) * 3
    f = cc.pre_acts(cc.normalize(h))                    # eq. 1 itself is checked against ref_f above
    v = f * (cc.W_dec[0].norm(dim=1) + cc.W_dec[1].norm(dim=1))
    cc.threshold.fill_(float(v[v > 0].median()))
    got = cc.encode(h)
    assert torch.equal(got, f * (v > cc.threshold))     # eq. 10
    assert 0 < int((got > 0).sum()) < int((f > 0).sum())
    fresh = make("batchtopk")
    with pytest.raises(RuntimeError, match="threshold"):
        fresh.encode(h)


def test_indices_ge_and_batch_topk_with_any_cut_exact():
    """The running-threshold selection is exact whatever the cut guess: too high (fallback), too low, none."""
    torch.manual_seed(4)
    for n, d in ((64, 256), (7, 33)):                        # 7·33 is not a multiple of 8: plain nonzero path
        v = torch.randn(n, d)
        flat = v.flatten()
        for c in (-10.0, 0.0, 1.5, 10.0):
            assert torch.equal(indices_ge(flat, c), (flat >= c).nonzero().squeeze(1))
        for n_keep in (1, n * 3, n * d):
            want = flat.topk(n_keep).indices.sort().values
            kth = float(flat[want].min())
            for cut in (None, kth, kth * 0.5 if kth > 0 else kth * 2, kth + 1.0, -100.0, 100.0):
                assert torch.equal(batch_topk_indices(v, n_keep, cut), want), (n, d, n_keep, cut)


def test_batchtopk_v_is_f_times_w_in_a_reused_buffer():
    cc = make("batchtopk", k=3)
    x = torch.randn(N, 2, D_MODEL)
    v, w = batchtopk_v(cc, x)
    wsum = cc.W_dec[0].norm(dim=1) + cc.W_dec[1].norm(dim=1)
    assert torch.allclose(w, wsum)
    assert torch.allclose(v.relu(), ref_f(cc, x) * wsum, atol=1e-6)   # A.1 v = f·w, ReLU deferred
    assert (v < 0).any()                                               # pre-ReLU: negatives are kept
    v2, _ = batchtopk_v(cc, 2 * x)
    assert v2.data_ptr() == v.data_ptr()                               # same scratch buffer, step after step
    assert set(cc.state_dict()) == {"W_enc", "b_enc", "W_dec", "b_dec", "threshold", "scale"}


def test_scratch_reuses_its_buffer_and_serves_shorter_batches_from_it():
    cc = make()
    a = scratch(cc, "_t", (8, 5), torch.float32, torch.device("cpu"))
    assert scratch(cc, "_t", (8, 5), torch.float32, torch.device("cpu")).data_ptr() == a.data_ptr()
    short = scratch(cc, "_t", (3, 5), torch.float32, torch.device("cpu"))   # a last, partial batch
    assert short.shape == (3, 5) and short.is_contiguous() and short.data_ptr() == a.data_ptr()
    assert scratch(cc, "_t", (8, 6), torch.float32, torch.device("cpu")).data_ptr() != a.data_ptr()
    assert scratch(cc, "_t", (9, 6), torch.float32, torch.device("cpu")).shape == (9, 6)   # longer: a new one
    assert "_t" not in cc.state_dict()


def test_optimised_steps_match_dense_reference():
    """Several optimiser steps of the fast BatchTopK step (reused buffer, running threshold, sparse decode and
    backward, aux, θ EMA) against the dense reference at the same weights: loss, min v, all gradients, θ.

    Large SGD steps and a k change move the cut between steps, so the running-threshold guess is sometimes
    too high (fallback) and sometimes low (more candidates); both must give the exact selection.
    """
    torch.manual_seed(5)
    d, D, n = 8, 128, 64
    cc = CrossCoder(CrossCoderConfig(d, D, "batchtopk", k=4))
    with torch.no_grad():
        cc.b_enc.normal_(0, 0.1)
        cc.W_dec.mul_(torch.rand(2, D, 1) + 0.2)
        cc.W_enc.add_(0.05 * torch.randn_like(cc.W_enc))
    opt = torch.optim.SGD(cc.parameters(), lr=0.5)
    cfg = TrainConfig(type="batchtopk", k=4, k_aux=6, aux_alpha=0.25, dead_tokens=10**8)
    tsf = torch.zeros(D, dtype=torch.long)
    tsf[torch.randperm(D)[:40]] = 10**9                      # dead latents: the aux term is on
    theta_ref = None
    for step, (k, scale) in enumerate(zip((4, 4, 6, 3, 3, 4), (1.0, 3.0, 0.5, 2.0, 1.0, 0.7))):
        x = torch.randn(n, 2, d) * scale
        r = batchtopk_loss(cc, x, k, tsf, cfg)
        opt.zero_grad()
        r["loss"].backward()
        g = grads(cc)
        opt.zero_grad()
        dead = tsf >= cfg.dead_tokens
        ref, vmin = brute_batchtopk(cc, x, k, dead, cfg.k_aux, cfg.aux_alpha)
        ref.backward()
        assert r["k_used"] == k
        assert torch.allclose(r["loss"], ref, rtol=1e-5, atol=1e-5), step
        assert torch.allclose(r["min_v"], vmin, rtol=1e-5), step
        for a, b in zip(g, grads(cc)):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (step, (a - b).abs().max())
        update_threshold(cc, r["min_v"], 0.9)
        theta_ref = float(vmin) if theta_ref is None else 0.9 * theta_ref + 0.1 * float(vmin)   # eq. 11
        assert math.isclose(float(cc.threshold), theta_ref, rel_tol=1e-5), step
        for p, gp in zip((cc.W_enc, cc.b_enc, cc.W_dec, cc.b_dec), g):
            p.grad = gp
        opt.step()
    assert bool(dead.any()) and float(r["aux"]) > 0


@pytest.mark.parametrize("kind", ["l1", "batchtopk"])
def test_fold_center_gives_the_centred_crosscoder_on_uncentred_input(kind):
    """A crosscoder trained on x − c, with c folded into b_enc and b_dec, computes the same f and the same
    reconstruction on x (eq. 1-2), so the saved model needs no centre."""
    torch.manual_seed(0)
    cc = CrossCoder(CrossCoderConfig(8, 32, kind, k=4))
    with torch.no_grad():
        for p in cc.parameters():
            p.add_(0.1 * torch.randn_like(p))
        cc.threshold.fill_(0.01)
    c = 3 * torch.randn(2, 8)
    x = torch.randn(50, 2, 8) + c
    f_centred = cc.encode_normalized(x - c)
    recon_centred = cc.decode_normalized(f_centred) + c
    assert (f_centred > 0).any()
    cc.fold_center(c)
    torch.testing.assert_close(cc.encode_normalized(x), f_centred, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cc.decode_normalized(cc.encode_normalized(x)), recon_centred, rtol=1e-5, atol=1e-5)
