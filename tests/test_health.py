"""Training health checks, `mu: auto` and `lr: auto`: each check fails on a run made to fail it and passes on
a normal one; μ calibration reaches its target L0 on a planted set from crossdiff.synthetic."""

import json
import math

import pytest
import torch

from crossdiff import health
from crossdiff.calibrate import MuController, auto_lr
from crossdiff.synthetic import SyntheticSpec, make_features, write_synthetic_cache
from crossdiff.train import TrainConfig, total_steps, train
from helpers import script

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
TOL = 0.25  # μ calibration: final val L0 within ±25% of target_l0
FVE_TOL = 0.05  # μ calibration toward target_fve: final val FVE within ±0.05


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: OpenMP fork/join costs more than it saves
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """d = 16, 40 planted features (every kind), ~2 active per token: the validate generator, small."""
    tmp = tmp_path_factory.mktemp("planted")
    spec = SyntheticSpec(d_model=16, n_tokens=8192, feature_rate=0.05, shrinkage_ratio=0.1, decoupled_share=0.5,
                         noise=0.01, n_features=dict(shared=24, chat_only=4, base_only=4, shrinkage=4, decoupled=4))
    gt = make_features(spec)
    return write_synthetic_cache(tmp / "train.h5", gt, "train", 8192), write_synthetic_cache(tmp / "val.h5", gt, "val", 2048)


L1 = dict(type="l1", expansion=4, lr=3e-3, batch_size=256, epochs=1, min_steps=1500, val_every=250,
          checkpoint_every=10**6, log_every=50)
BTK = dict(L1, type="batchtopk", k=2, k_aux=16, dead_tokens=4096, theta_momentum=0.99, theta_start=0.05, min_steps=600)


def reasons(m, check):
    return [r for r in m["health_reasons"] if r.startswith(check + ":")]


# -- pure checks ---------------------------------------------------------------------------------
GOOD = {"val": {"fve": 0.85, "dead": 0.1, "l0": 20.0}, "train": {"fve": 0.8}, "target_l0": 20,
        "loss_trend": {"early": 10.0, "final": 4.0}, "opposed_decoders": 0.01}


@pytest.mark.parametrize("change, check", [
    ({"val": {"fve": 0.2, "dead": 0.1, "l0": 20.0}}, "fve"),
    ({"val": {"fve": 0.85, "dead": 0.9, "l0": 20.0}}, "dead"),
    ({"val": {"fve": 0.85, "dead": 0.1, "l0": 0.5}}, "l0"),
    ({"val": {"fve": 0.85, "dead": 0.1, "l0": 41.0}}, "l0"),
    ({"loss_trend": {"early": 10.0, "final": 9.9}}, "loss_trend"),
    ({"loss_trend": {"early": 10.0, "final": math.nan}}, "loss_trend"),
    ({"val": {"fve": math.nan, "dead": 0.1, "l0": 20.0}}, "fve"),
    ({"opposed_decoders": 0.2}, "opposed"),
])
def test_each_check_fails_alone(change, check):
    assert health.assess(GOOD) == {"health": "pass", "health_reasons": []}
    r = health.assess({**GOOD, **change})
    assert r["health"] == "fail" and [x.split(":")[0] for x in r["health_reasons"]] == [check]


def test_thresholds_are_params_and_fallbacks():
    m = {**GOOD, "val": {"fve": 0.6, "dead": 0.1, "l0": 20.0}}
    assert health.assess(m)["health"] == "pass" and health.assess(m, {"min_fve": 0.7})["health"] == "fail"
    assert health.assess({**GOOD, "val": None, "train": {"fve": 0.3}})["health_reasons"][0].startswith("fve: train")
    assert health.assess({**GOOD, "target_l0": None, "val": {"fve": 0.9, "l0": 900.0}})["health"] == "pass"
    with pytest.raises(ValueError, match="min_fev"):
        health.thresholds({"min_fev": 0.5})
    with pytest.raises(ValueError, match="min_fev"):
        TrainConfig.from_params(dict(type="l1", mu=0.1, health={"min_fev": 0.5}))


def test_opposed_share_counts_opposite_halves_neither_negligible():
    """Brute force over hand-made latents: aligned, one half ~0, opposed at several norm ratios."""
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    base = torch.stack([u[0], 0.01 * u[1], -0.5 * u[2], -0.1 * u[3], -3.0 * u[4], torch.zeros(8)])
    chat = torch.stack([u[0], u[1], u[2], u[3], u[4], u[5]])
    # shared (aligned), chat-only, opposed at 0.5, opposed at 0.1 (Δnorm 0.95: chat-only), opposed at 1/3, chat-only
    expect = [False, False, True, False, True, False]
    W = torch.stack([base, chat])
    assert health.opposed_share(W) == pytest.approx(sum(expect) / 6)
    for j, e in enumerate(expect):                                    # each latent alone, by definition
        nb, nc = base[j].norm(), chat[j].norm()
        cos = float(base[j] @ chat[j] / (nb * nc)) if nb * nc > 0 else 0.0
        ratio = float(min(nb, nc) / max(nb, nc))
        assert (cos < health.OPPOSED_COS and ratio >= health.OPPOSED_RATIO) == e
        assert health.opposed_share(W[:, j:j + 1]) == float(e)


def test_banner_and_strict(caplog):
    bad = health.assess({**GOOD, "val": {"fve": 0.1, "dead": 0.1, "l0": 20.0}})
    health.report("runs/l1", bad)                                     # warns, no error
    assert "CROSSCODER HEALTH CHECK FAILED: runs/l1" in caplog.text and "fve: val FVE 0.100" in caplog.text
    with pytest.raises(health.HealthError, match="fve: val FVE 0.100"):
        health.report("runs/l1", bad, {"strict": True})
    health.report("runs/l1", health.assess(GOOD), {"strict": True})  # a pass never raises


# -- real runs made to fail ------------------------------------------------------------------------
def test_normal_runs_pass_and_record_what_they_used(planted, tmp_path):
    tr, va = planted
    m = train(tr, va, tmp_path / "btk", BTK, progress=False)
    assert m["health"] == "pass", m["health_reasons"]
    assert m["target_l0"] == 2 and m["loss_trend"]["final"] < 0.5 * m["loss_trend"]["early"]
    saved = json.loads((tmp_path / "btk" / "metrics.json").read_text())
    assert saved["health"] == "pass" and saved["health_reasons"] == []


def test_mu_far_too_high_fails_fve_dead_and_l0(planted, tmp_path):
    tr, va = planted
    m = train(tr, va, tmp_path / "o", dict(L1, mu=50.0, target_l0=8, min_steps=300), progress=False)
    assert m["health"] == "fail" and m["val"]["l0"] < 1
    for check in ("fve", "dead", "l0"):
        assert reasons(m, check), (check, m["health_reasons"])
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["health"] == "fail"


def test_k_far_above_a_crowded_sets_l0_fails_opposed(tmp_path):
    """16 features per dimension, L0 ≈ 2.6, k = 32: the latents become mixtures whose base and chat halves
    point opposite ways (13% of them here; the planted set's normal run above has ~2%)."""
    n = dict(shared=168, chat_only=22, base_only=22, shrinkage=22, decoupled=22)
    spec = SyntheticSpec(d_model=16, n_tokens=32768, feature_rate=0.01, shrinkage_ratio=0.1, decoupled_share=0.5,
                         noise=0.05, n_features=n)
    gt = make_features(spec)
    tr = write_synthetic_cache(tmp_path / "train.h5", gt, "train", 32768)
    va = write_synthetic_cache(tmp_path / "val.h5", gt, "val", 8192)
    m = train(tr, va, tmp_path / "o", dict(BTK, k=32, dict_size=256, min_steps=1000), progress=False)
    assert m["opposed_decoders"] > 2 * health.DEFAULTS["max_opposed"], m["opposed_decoders"]
    assert reasons(m, "opposed"), m["health_reasons"]


def test_no_learning_fails_the_loss_trend(planted, tmp_path):
    tr, va = planted
    m = train(tr, va, tmp_path / "o", dict(L1, mu=0.05, lr=1e-12, min_steps=100, val_every=50), progress=False)
    assert reasons(m, "loss_trend"), m["health_reasons"]
    assert abs(m["loss_trend"]["final"] / m["loss_trend"]["early"] - 1) < 0.05   # nothing moved


def test_strict_fails_the_rule_with_reasons(planted, tmp_path):
    tr, va = planted
    p = dict(L1, mu=50.0, min_steps=100, val_every=50, health={"strict": True})
    params = json.dumps({"crosscoders": {"bad": p}, "seed": 0})
    with pytest.raises(SystemExit, match="failed its health checks(.|\n)*fve: val FVE"):
        script("train_crosscoder").main(["--params", params, "--variant", "bad", "--train", str(tr), "--val", str(va),
                                         "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["health"] == "fail"


# -- mu: auto, lr: auto, min_steps ----------------------------------------------------------------
def test_mu_auto_reaches_target_l0(planted, tmp_path):
    tr, va = planted
    target = 8
    m = train(tr, va, tmp_path / "o", dict(L1, mu="auto", target_l0=target, lr="auto"), progress=False)
    assert abs(m["val"]["l0"] / target - 1) <= TOL, m["val"]
    assert m["health"] == "pass", m["health_reasons"]
    assert m["lr"] == pytest.approx(2e-4 / math.sqrt(64 / 2 ** 14)) and 0.01 < m["mu"] < 10
    assert (tmp_path / "o" / "dvclive" / "plots" / "metrics" / "train" / "mu.tsv").exists()
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())["extra"]["train"]
    assert cfg["mu"] == m["mu"] and cfg["lr"] == m["lr"] and cfg["auto"] == ["lr", "mu"]


def test_mu_auto_reaches_target_fve(planted, tmp_path):
    """The same controller on 1 / (1 − FVE): a run aimed at an FVE ends there, whatever L0 that takes.
    3000 steps: from μ = 0.01 the ramp (≤ 0.3% per step) needs ~2000 to reach this set's μ ≈ 0.3."""
    tr, va = planted
    runs = {t: train(tr, va, tmp_path / str(t), dict(L1, mu="auto", target_fve=t, lr="auto", min_steps=3000),
                     progress=False) for t in (0.8, 0.95)}
    for target, m in runs.items():
        assert abs(m["val"]["fve"] - target) <= FVE_TOL, (target, m["val"])
        assert m["target_fve"] == target and m["target_l0"] is None and m["health"] == "pass", m["health_reasons"]
    low, high = runs[0.8], runs[0.95]
    assert high["mu"] < low["mu"] and high["val"]["l0"] > low["val"]["l0"]      # more FVE costs sparsity


def test_mu_controller_moves_toward_target_and_freezes():
    c = MuController(10.0, until=5, device="cpu", init=0.1)
    for step in range(5):
        c.update(step, torch.tensor(1000.0))                        # L0 far too high: μ rises, at most gain/step
    assert 0.1 < float(c.mu()) <= 0.1 * math.exp(5 * 0.003) + 1e-7
    before = float(c.mu())
    c.update(5, torch.tensor(1000.0))                               # past `until`: frozen
    assert float(c.mu()) == before
    low = MuController(10.0, until=5, device="cpu", init=0.1)
    for step in range(5):
        low.update(step, torch.tensor(1.0))
    assert float(low.mu()) < 0.1


def test_auto_lr_min_steps_and_bad_values():
    assert auto_lr(2 ** 14) == pytest.approx(2e-4) and auto_lr(73728) == pytest.approx(9.43e-5, rel=1e-3)
    cfg = TrainConfig.from_params(dict(type="l1", mu=0.1, epochs=2, min_steps=1500))
    assert total_steps(cfg, 100) == 1500 and total_steps(cfg, 1000) == 2000
    assert total_steps(TrainConfig.from_params(dict(type="l1", mu=0.1, max_steps=7, min_steps=1500)), 100) == 7
    per_latent = TrainConfig.from_params(dict(type="l1", mu=0.1, epochs=2, min_steps=10, batch_size=512,
                                              min_tokens_per_latent=1000))
    assert total_steps(per_latent, 100, 2048) == 4000 and total_steps(per_latent, 100, 64) == 200
    with pytest.raises(ValueError, match="target_l0"):
        TrainConfig.from_params(dict(type="l1", mu="auto"))
    with pytest.raises(ValueError, match="one of target_l0"):
        TrainConfig.from_params(dict(type="l1", mu="auto", target_l0=10, target_fve=0.9))
    with pytest.raises(ValueError, match="target_fve must lie in"):
        TrainConfig.from_params(dict(type="l1", mu="auto", target_fve=1.5))
    with pytest.raises(ValueError, match="lr must be a number or 'auto'"):
        TrainConfig.from_params(dict(type="l1", mu=0.1, lr="fast"))


def test_report_shows_a_red_banner_per_failed_variant(tmp_path):
    from _report_fixtures import PARAMS, build_run
    from crossdiff.io import read_json, write_json
    from crossdiff.report.collect import collect
    from crossdiff.report.html import render_report

    build_run(tmp_path)
    cc = tmp_path / "results/crosscoders/toy/L1/l1/metrics.json"
    write_json(cc, {**read_json(cc), "health": "fail", "health_reasons": ["fve: val FVE 0.090 < min_fve 0.5"]})
    bt = tmp_path / "results/crosscoders/toy/L1/batchtopk/metrics.json"
    write_json(bt, {**read_json(bt), "health": "pass", "health_reasons": []})
    run = collect(tmp_path, "toy", 1, ["l1", "batchtopk"], PARAMS)
    text = render_report(run, tmp_path / "report", max_latents=5, examples_per_latent=2).read_text()
    assert text.count('class="warning fail health"') == 1
    assert "<b>l1 failed its training health checks</b>" in text and "<li>fve: val FVE 0.090 &lt; min_fve 0.5</li>" in text
    assert "batchtopk failed" not in text
    assert text.index("failed its training health checks") < text.index('id="training"')   # at the top
