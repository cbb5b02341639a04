"""Figures have one home (report/figures.py): one palette, one atomic `_save`."""

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from matplotlib.colors import to_rgba

from crossdiff.report import figures

SRC = Path(__file__).resolve().parents[1] / "src" / "crossdiff"


def _latents(n: int = 60, seed: int = 0) -> tuple[pl.DataFrame, np.ndarray]:
    """A latent table with every class, ν defined, and the true kind each latent matches."""
    rng = np.random.default_rng(seed)
    klass = np.array(["chat_only", "shared", "base_only", "other"] * (n // 4))
    kind = np.where(klass == "chat_only", np.array(["chat_only", "shrinkage", "decoupled"] * (n // 3))[:n], klass)
    table = pl.DataFrame({"latent": np.arange(n), "klass": klass, "dead": np.zeros(n, bool),
                          "delta_norm": rng.uniform(0, 1, n), "nu_eps": rng.uniform(0, 1, n),
                          "nu_r": rng.uniform(0, 1, n), "cos_sim": rng.uniform(-1, 1, n),
                          "freq": rng.uniform(1e-4, 1e-1, n), "f_template": rng.uniform(0, 1, n)})
    return table, kind


def _capture(monkeypatch) -> list:
    """Replace `_save` with one that keeps the figure, so its artists can be inspected."""
    figs = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: figs.append(fig) or Path(path))
    return figs


def _scatter_colour(fig, label_start: str) -> tuple:
    for ax in fig.axes:
        for coll in ax.collections:
            if coll.get_label().startswith(label_start):
                return tuple(coll.get_facecolor()[0])
    raise AssertionError(f"no scatter labelled {label_start!r}")


def test_chat_only_has_one_colour_across_figures(monkeypatch, tmp_path):
    table, kind = _latents()
    figs = _capture(monkeypatch)
    figures.nu_scatter(tmp_path / "a.png", table)
    figures.truth_nu_scatter(tmp_path / "b.png", {"v": (table, kind)})
    figures.truth_delta_norm_by_kind(tmp_path / "c.png", {"v": (table, kind)}, {"chat_only": [0.9, 1.0]})
    want = to_rgba(figures.PALETTE["chat_only"])
    assert _scatter_colour(figs[0], "chat-only")[:3] == pytest.approx(want[:3])   # analysis Fig. 1
    assert _scatter_colour(figs[1], "chat_only")[:3] == pytest.approx(want[:3])   # synthetic ground truth
    hist = [p for p in figs[2].axes[0].patches if p.get_label().startswith("chat_only")]
    assert hist and hist[0].get_edgecolor()[:3] == pytest.approx(want[:3])
    colours = [to_rgba(figures.PALETTE[k]) for k in figures.TRUE_KINDS]
    assert len(set(colours)) == len(colours)                                     # kinds stay distinguishable


def test_kl_figure_bars_use_palette(monkeypatch, tmp_path):
    conds = ["none", "all", "template", "delta_norm_best", "delta_norm_worst", "nu_best", "nu_worst"]
    table = pl.DataFrame({"source": "all", "mask": "full", "condition": conds, "n_tokens": 10,
                          "mean": np.linspace(0.1, 0.7, 7), "ci_low": 0.05, "ci_high": 0.8})
    figs = _capture(monkeypatch)
    figures.kl_figure(tmp_path / "kl.png", table)
    bars = figs[0].axes[0].patches
    assert [b.get_facecolor()[:3] for b in bars] == [pytest.approx(to_rgba(figures.PALETTE[c])[:3]) for c in conds]


def test_figures_live_in_one_module():
    """No other module imports matplotlib, defines its own colour map or saves a figure."""
    for path in SRC.rglob("*.py"):
        if path == SRC / "report" / "figures.py":
            continue
        text = path.read_text()
        assert not re.search(r"^\s*(import|from) matplotlib", text, re.M), f"{path} imports matplotlib"
        assert "savefig" not in text, f"{path} saves a figure outside report/figures.py"
    assert (SRC / "report" / "figures.py").read_text().count("savefig(") == 1


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_save_is_atomic(tmp_path, suffix, magic):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    out = figures._save(fig, tmp_path / "sub" / f"fig{suffix}")
    assert out.read_bytes().startswith(magic)
    assert [p.name for p in out.parent.iterdir()] == [out.name]               # no temp file left behind
    assert not plt.fignum_exists(fig.number)                                  # closed


def test_save_failure_leaves_nothing(tmp_path):
    import matplotlib.pyplot as plt
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="suffix"):
        figures._save(fig, tmp_path / "fig.jpg")
    fig.savefig = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full"))
    with pytest.raises(RuntimeError):
        figures._save(fig, tmp_path / "fig.png")
    assert list(tmp_path.iterdir()) == []
