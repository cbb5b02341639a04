"""Report: tables against brute force, robustness to missing stages, size bound, and the rendered
pages driven in a real headless Chromium over the DevTools protocol (sort, filter, highlighting)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import polars as pl
import pytest

from _report_fixtures import BANDS, CACHE, NASTY, PARAMS, SPACE, WARNING, build_run
from crossdiff.report import tables
from crossdiff.report.collect import VariantRun, collect
from crossdiff.report.html import render_report
from crossdiff.report.tokens import highlight

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["l1", "batchtopk"]
ARTIFACTS = Path(os.environ.get("CROSSDIFF_TEST_OUTPUT", ROOT / "results" / "test-output")) / "report"


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    truth = build_run(root)
    run = collect(root, "toy", 1, VARIANTS, PARAMS)
    index = render_report(run, root / "results/report/toy", max_latents=50, examples_per_latent=10)
    return root, truth, run, index


# ------------------------------------------------------------------------------- tables

def test_ranks_match_brute_force(full):
    _, truth, _, _ = full
    for v in VARIANTS:
        lat = truth["latents"][v]
        got = tables.add_ranks(lat)
        chat = [r for r in lat.iter_rows(named=True) if r["klass"] == "chat_only"]
        for col, key, reverse in (("r_nu_eps", lambda r: abs(r["nu_eps"]), False),
                                  ("r_nu_r", lambda r: abs(r["nu_r"]), False),
                                  ("r_delta_norm", lambda r: r["delta_norm"], True)):
            live = [r for r in chat if r["nu_eps"] is not None] if col != "r_delta_norm" else chat
            vals = sorted(key(r) for r in live)[:: -1 if reverse else 1]
            want = {r["latent"]: vals.index(key(r)) + 1 for r in live}
            have = dict(zip(got["latent"].to_list(), got[col].to_list()))
            assert {k: have[k] for k in want} == want, col
            assert all(have[k] is None for k in have if k not in want), col


def test_training_classes_template_kl(full):
    _, truth, run, _ = full
    rows = [r for v in run.variants for r in tables.training_rows(v, PARAMS)]
    assert [(r["variant"], r["split"]) for r in rows] == [(v, s) for v in VARIANTS for s in ("train", "val")]
    for r in rows:
        t = truth["training"][r["variant"]][r["split"]]
        assert (r["fve_base"], r["fve_chat"], r["fve_total"], r["l0"], r["dead"]) == (
            t["fve_base"], t["fve_chat"], t["fve"], t["l0"], t["dead"])
    assert rows[0]["mu"] == 0.041 and rows[2]["k"] == 8 and rows[0]["D"] == 96  # params, then config.json
    assert rows[0]["k"] is None and rows[2]["mu"] is None  # each type shows only its own sparsity knob

    counts = tables.class_counts(run.variants, BANDS)
    for i, v in enumerate(VARIANTS):
        lat = truth["latents"][v]
        live = [r["klass"] for r in lat.iter_rows(named=True) if not r["dead"]]
        assert [c["counts"][i] for c in counts[:4]] == [live.count(k) for k in tables.CLASSES]
        assert counts[4]["counts"][i] == lat.height - len(live) > 0 and counts[5]["counts"][i] == lat.height

        live = [r for r in truth["latents"][v].iter_rows(named=True) if r["klass"] == "chat_only" and not r["dead"]]
        st = tables.template_stats(truth["latents"][v])
        assert st["n_chat_only"] == len(live)
        assert st["above_half"] == pytest.approx(sum(r["f_template"] > 0.5 for r in live) / len(live))
        assert st["above_third"] == pytest.approx(sum(r["f_template"] > 1 / 3 for r in live) / len(live))

    kls = tables.kl_tables(run.variants, [2, 10])
    assert [k["source"] for k in kls] == ["all", "generated", "heldout"]
    for kl in kls:
        assert kl["masks"] == ["full", "first"] and kl["mask_labels"] == ["full response", "tokens 2–10"]
        assert kl["variants"] == VARIANTS and len(kl["rows"]) == 7
    for v in run.variants:
        for r in v.kl.iter_rows(named=True):
            kl = kls[[k["source"] for k in kls].index(r["source"])]
            row = next(x for x in kl["rows"] if x["condition"] == r["condition"])
            cell = row["cells"][kl["masks"].index(r["mask"]) * len(VARIANTS) + VARIANTS.index(v.name)]
            assert cell == r


def _table_html(html: str, table_id: str) -> str:
    m = re.search(rf'<table[^>]*id="{table_id}".*?</table>\s*(<p class="note">.*?</p>)?', html, re.S)
    assert m, f"no table #{table_id} in the report"
    return m.group(0)


def test_causal_pool_and_cache_summary_render(full):
    """The causal pool (which one, both sizes) sits by the KL tables; the cache summary in the run section."""
    _, truth, run, index = full
    pools = tables.causal_pools(run.variants)
    assert [p["variant"] for p in pools] == VARIANTS
    for p in pools:
        want = truth["pool"][p["variant"]]
        assert (p["used"], p["candidates"]) == (want["used"], want["sizes"]["candidates"])
        assert p["pools"] == {k: want["sizes"][k] for k in ("authors", "legacy")}
    html = index.read_text()
    causal = html[html.index('<section id="causal">'):html.index('<section id="autointerp">')]
    t = _table_html(causal, "causal-pools")
    cells = re.findall(r"<td[^>]*>(.*?)</td>", t)
    for v in VARIANTS:  # variant, used, ν range, candidates, authors Δnorm/ν, legacy Δnorm/ν
        sz = truth["pool"][v]["sizes"]
        i = cells.index(v)
        assert cells[i + 1:i + 8] == [truth["pool"][v]["used"], "[-0.1, 2]", str(sz["candidates"]),
                                      str(sz["authors"]["delta_norm"]), str(sz["authors"]["nu"]),
                                      str(sz["legacy"]["delta_norm"]), str(sz["legacy"]["nu"])]
    assert "authors pool" in t and "legacy pool" in t

    rows = tables.cache_rows(run.variants)
    assert [r["split"] for r in rows] == ["train", "val"]
    assert rows[0]["norm_ratio"] == 1.25 and rows[1]["norm_ratio"] == pytest.approx(16.2 / 12.0)  # val: r from norms
    section = html[html.index('<section id="run">'):]
    t = _table_html(section, "cache-table")
    cells = re.findall(r"<td[^>]*>(.*?)</td>", t)
    for split, c in CACHE.items():
        i = cells.index(split)
        assert cells[i + 1:i + 9] == [tables.fmt(c["rows"]), "float16", tables.fmt(c["sink_rows_excluded"]),
                                      str(c["outlier_rows"]), "10", tables.fmt(c["norm_base"]),
                                      tables.fmt(c["norm_chat"]), tables.fmt(c["norm_chat"] / c["norm_base"])]
    assert "attention sinks" in t and "factor × median" in t

    note = re.search(r'<p class="note" id="space-note">(.*?)</p>', html, re.S).group(1)  # Δnorm/ν space
    for v, sp in SPACE.items():
        assert f"<b>{v}</b>: {sp['normalisation']}, {sp['meaning']}" in note
    assert "ν<sub>raw</sub> = 0.8 · ν" in note and "ν<sub>raw</sub> = 1 · ν" in note

    bare = [VariantRun("x", analysis={"counts": {}}, causal={"kl": {}})]  # older metrics: no tables, no error
    assert tables.cache_rows(bare) == [] and tables.causal_pools(bare) == []


def test_pair_evaluation_joins_the_training_metrics(tmp_path):
    """evaluation.json's rows lead and win over an older metrics.json that still held them; times merge."""
    models = tmp_path / "results/models/toy"
    models.mkdir(parents=True)
    (models / "metrics.json").write_text(json.dumps({"behaviours": {"joke": {"base": 0.0, "chat": 0.5}},
                                                     "n_params": 7, "time_s": {"total": 60.0}}))
    (models / "evaluation.json").write_text(json.dumps({"behaviours": {"joke": {"base": 0.0, "chat": 0.9}},
                                                        "time_s": {"total": 5.0}}))
    run = collect(tmp_path, "toy", 1, [])
    assert next(iter(run.models)) == "behaviours" and run.models["n_params"] == 7
    assert run.models["behaviours"]["joke"]["chat"] == 0.9
    assert run.models["time_s"] == {"total": 60.0, "evaluate": 5.0}
    (models / "evaluation.json").unlink()
    run = collect(tmp_path, "toy", 1, [])
    assert run.models["behaviours"]["joke"]["chat"] == 0.5 and "evaluation" in run.missing


def test_base_vs_chat_pivot():
    rows, rest = tables.base_vs_chat({"loss": {"web": {"base": 1.0, "chat": 2.0}},
                                      "behaviours": {"refusal": {"n": 5, "base": 0.1, "chat_answer": 0.9}},
                                      "chat_base_ratio": 3.0, "chat_loss": {"base": 4.0}})
    assert ("loss/web", 1.0, 2.0) in rows and ("chat_loss", 4.0, None) in rows
    assert ("behaviours/refusal", 0.1, None) in rows and ("behaviours/refusal/answer", None, 0.9) in rows
    assert ("behaviours/refusal/n", 5) in rest and ("chat_base_ratio", 3.0) in rest  # both models named: not a pair


def test_highlight_alpha_and_escaping():
    html = str(highlight(["<b>", "x\n", "y"], [2.0, 4.0, 0.0], scale=8.0))
    assert "&lt;b&gt;" in html and "<b>" not in html
    assert "rgba(220, 38, 38, 0.250)" in html and "rgba(220, 38, 38, 0.500)" in html
    assert html.count('class="tok on"') == 2 and "x\\n" in html


def test_page_order_and_size_bound(tmp_path, full):
    _, truth, run, _ = full
    out = tmp_path / "report"
    render_report(run, out, max_latents=5, examples_per_latent=2)
    for v in run.variants:
        files = sorted(int(p.stem) for p in (out / "latents" / v.name).glob("*.html"))
        assert len(files) == 5
        assert set(truth["chosen"][v.name]) == set(files)  # the 5 explained latents come first
        order = tables.page_order(tables.latent_table(v), v.examples, 8)
        lat = truth["latents"][v.name]
        rest = lat.filter((pl.col("klass") == "chat_only") & ~pl.col("dead")
                          & ~pl.col("latent").is_in(truth["chosen"][v.name])).sort(
            ["rank_nu", "freq"], descending=[False, True])["latent"].to_list()  # ties: more frequent first
        assert order[5:] == rest[:3]
        page = (out / "latents" / v.name / f"{truth['chosen'][v.name][0]}.html").read_text()
        assert page.count('class="example"') == 3 * 2 + 2 + 2  # 2 per tercile, 2 similar, 2 random
        heads = re.findall(r"<h3>(tercile [^<]*)</h3>", page)
        assert heads == ["tercile 0 (highest activations)", "tercile 1", "tercile 2 (lowest)"]  # 0 = strongest
    data = json.loads(_embedded(out / "index.html"))
    assert len(data["rows"]) == sum(t.height for t in truth["latents"].values())
    assert sum(r[-1] is not None for r in data["rows"]) == 10


def _embedded(index: Path) -> str:
    text = index.read_text()
    start = text.index('id="latent-data">') + len('id="latent-data">')
    return text[start:text.index("</script>", start)]


def test_validation_summary_and_behaviours(full):
    _, truth, run, index = full
    names, rows = tables.validation_rows(run.validate)
    assert names == list(VARIANTS)
    row = dict(rows)
    for i, v in enumerate(VARIANTS):
        t = truth["validate"][v]
        assert row["recall of true chat-only features (Δnorm chat-only set)"][i] == t["chat_only_set"]["recall"]
        assert row["… of which shrinkage bait"][i] == t["chat_only_set"]["composition"]["shrinkage"]
        assert row["AUROC ν^r: decoupling artefacts vs true chat-only"][i] is None  # none planted: no number
        r = t["robust_by_threshold"][0]
        assert row["robust at π = 0.1: true chat-only / bait"][i] == f"{r['true_chat_only']} / {r['bait']}"
    names, rows = tables.behaviour_rows(run.behaviours)
    assert names == [f"{v}: {pool}" for v in VARIANTS for pool in ("all", "chat-only")]
    for b, values in rows:
        t = [truth["behaviours"][v][b][pool] for v in VARIANTS for pool in ("all_latents", "chat_only")]
        assert values == [f"{x['auroc']:.2f} (#{x['latent']})" for x in t]
    text = index.read_text()
    assert "Planted behaviours of the embedded pair" in text and 'alt="nu_scatter.png"' in text


def test_autointerp_warning_is_a_banner_not_a_table_row(full):
    text = full[3].read_text()
    assert f'<p class="warning"><b>l1:</b> {WARNING}</p>' in text and text.count(WARNING) == 1


def test_summary_leads_with_the_answer(full):
    """The first section answers the question (KL with CIs, robust chat-only latents with explanations,
    scores and planted behaviours, ground-truth accuracy vs chance); versions and params come last."""
    root, truth, run, index = full
    text = index.read_text()
    body = text[text.index("<main>"):]
    assert body.index('id="summary"') < body.index('id="models"') < body.index('id="latents"') < body.index('id="run"')
    assert body.index(WARNING) < body.index('id="models"')  # banners are on the first screen

    for v in run.variants:
        kl = pl.read_parquet(root / f"results/causal/toy/L1/{v.name}/kl.parquet").filter(
            (pl.col("source") == "generated") & (pl.col("mask") == "full"))
        mean = dict(zip(kl["condition"].to_list(), kl["mean"].to_list()))
        row = tables.summary_row(v)
        assert row["kl"]["source"] == tables.SOURCE_LABELS["generated"] and row["kl"]["nu_best"]["mean"] == mean["nu_best"]
        assert row["kl"]["nu_best_share"] == pytest.approx((mean["none"] - mean["nu_best"]) / (mean["none"] - mean["all"]))
        assert (row["score"], row["parse_rate"], row["gt_accuracy"], row["gt_chance"]) == (0.7, 0.96, 1.0, 0.125)

        lat = truth["latents"][v.name]
        want = lat.filter((pl.col("klass") == "chat_only") & ~pl.col("dead")).sort("rank_nu")["latent"].head(8).to_list()
        rows = tables.robust_latents(tables.latent_table(v), v, run.behaviours, 0.9, 8)
        assert [r["latent"] for r in rows] == want
        first = truth["chosen"][v.name][0]  # detects refusal at AUROC 0.95; the second detects joke at 0.85 only
        by = {r["latent"]: r for r in rows}
        assert (by[first]["behaviour"], by[first]["named"]) == ("refusal", True)
        assert all(r["behaviour"] is None for r in rows if r["latent"] != first)
        assert by[first]["explanation"].startswith(f"latent {first} ")
    summary = body[body.index('id="summary"'):body.index('id="models"')]
    assert "refusal (0.95) ✓ named" in summary and "1/1 = 100% <span class=\"ci\">(chance 12%)</span>" in summary
    assert "ground-truth" in body and 'id="summary-table"' in summary


def test_escaping_and_missing_pieces(tmp_path, full):
    _, _, _, index = full
    text = index.read_text()
    assert NASTY not in text and "&lt;b&gt;false&lt;/b&gt;" in text  # explanation escaped in HTML
    assert json.loads(_embedded(index))  # and the JSON block is not cut by its </script>

    root = tmp_path / "partial"
    build_run(root, skip=frozenset({"models", "validate", "comparison", "l1:causal", "l1:autointerp",
                                    "batchtopk:training", "batchtopk:latents"}))
    run = collect(root, "toy", 1, VARIANTS, PARAMS)
    out = render_report(run, root / "report", max_latents=3, examples_per_latent=3)
    text = out.read_text()
    for path in ("results/models/toy/metrics.json", "results/causal/toy/L1/l1/kl.parquet",
                 "results/crosscoders/toy/L1/batchtopk/metrics.json", "results/analysis/toy/L1/batchtopk/latents.parquet",
                 "results/validate/metrics.json", "results/autointerp/toy/L1/l1/scores.parquet"):
        assert f"{root / path}</code> not found" in text, path
    pages = sorted((root / "report/latents/l1").glob("*.html"))
    assert len(pages) == 3
    assert all("Not run: autointerp example collection" in p.read_text() for p in pages)


def test_corrupt_input_is_an_error(tmp_path):
    build_run(tmp_path, variants=("l1",), d=16)
    (tmp_path / "results/crosscoders/toy/L1/l1/metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="crosscoders/toy/L1/l1/metrics.json"):
        collect(tmp_path, "toy", 1, ["l1"], PARAMS)


def test_workflow_script(tmp_path):
    import importlib.util

    build_run(tmp_path, variants=("l1",), d=24)
    spec = importlib.util.spec_from_file_location("render_report", ROOT / "workflow_scripts/render_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--params", json.dumps(PARAMS), "--pair", "toy", "--layer", "1", "--variants", "l1",
              "--out", str(tmp_path / "results/report/toy"), "--root", str(tmp_path)])
    assert (tmp_path / "results/report/toy/index.html").is_file()
    assert len(list((tmp_path / "results/report/toy/latents/l1").glob("*.html"))) == 24 - 4  # dead latents get none


# ------------------------------------------------------------------------------- browser

def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        if path := shutil.which(name):
            return path
    return None


class Browser:
    """Headless Chromium driven over the DevTools protocol; records console errors and exceptions."""

    def __init__(self, exe: str, profile: Path):
        import websocket

        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
             "--window-size=1400,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30))
        target = next(p for p in pages if p["type"] == "page")
        self.ws = websocket.create_connection(target["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.events, self.errors = 0, [], []
        for domain in ("Page", "Runtime", "Log"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)

    def _record(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.exceptionThrown":
            self.errors.append(json.dumps(p["exceptionDetails"])[:500])
        elif method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            self.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(p["entry"]["text"])
        self.events.append(msg)

    def call(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self._record(msg)

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            assert time.monotonic() < deadline, f"{url} did not load"
            self._record(json.loads(self.ws.recv()))

    def js(self, expr: str):
        # a block scope per call, so `const` names can be reused; its completion value is the result
        r = self.call("Runtime.evaluate", expression="{" + expr + "}", returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise AssertionError(f"JS failed: {expr}\n{r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path: Path, full_page: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        r = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=full_page)
        path.write_bytes(base64.b64decode(r["data"]))

    def close(self) -> None:
        if getattr(self, "ws", None):
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = chromium_path()
    if exe is None:
        pytest.skip("NO BROWSER: the report's browser test needs Chromium (Debian: `apt-get install -y chromium`); "
                    "the rendered pages were NOT checked in a browser")
    b = Browser(exe, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


COLUMN = """Array.from(document.querySelectorAll('#latent-table tbody tr')).map(tr => {
  const i = Array.from(document.querySelectorAll('#latent-table thead th')).findIndex(th => th.dataset.key === '%s');
  return tr.cells[i].textContent; })"""


def _num(s: str) -> float | None:
    return None if s == "–" else float(s.rstrip("%"))


def test_in_browser(full, browser):
    root, truth, _, index = full
    b = browser
    b.open(index.as_uri())
    assert b.js("document.title").startswith("crossdiff report")
    assert b.errors == [], b.errors
    assert b.js("Array.from(document.querySelectorAll('.kl-table')).map(t => t.tBodies[0].rows.length)") == [7, 7, 7]
    assert b.js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    b.screenshot(ARTIFACTS / "overview.png", full_page=True)
    b.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
    b.screenshot(ARTIFACTS / "first_screen.png")  # what a reader sees on opening the report
    top = b.js("document.getElementById('summary-table').getBoundingClientRect().bottom")
    assert top < 900  # the headline numbers are on the first screen
    b.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)

    # filter: chat-only latents of one variant, dead hidden by default
    b.js("const s = document.getElementById('f-variant'); s.value = 'batchtopk'; s.dispatchEvent(new Event('change'))")
    b.js("const s = document.getElementById('f-class'); s.value = 'chat_only'; s.dispatchEvent(new Event('change'))")
    lat = truth["latents"]["batchtopk"]
    want = lat.filter((pl.col("klass") == "chat_only") & ~pl.col("dead"))
    assert set(b.js(COLUMN % "klass")) == {"chat-only"}
    assert sorted(int(x) for x in b.js(COLUMN % "latent")) == sorted(want["latent"].to_list())
    assert b.js("document.getElementById('t-status').textContent").startswith(f"{want.height} of {2 * 96} ")

    # sort by nu_eps: ascending, then descending, nulls last both ways
    b.js("document.querySelector('#latent-table th[data-key=nu_eps]').click()")
    vals = [_num(x) for x in b.js(COLUMN % "nu_eps")]
    want_vals = sorted(want["nu_eps"].to_list())
    assert vals == pytest.approx([float(f"{x:.4g}") for x in want_vals], rel=1e-3)
    assert b.js("document.querySelector('#latent-table th[data-key=nu_eps]').getAttribute('aria-sort')") == "ascending"
    b.js("document.querySelector('#latent-table th[data-key=nu_eps]').click()")
    assert [_num(x) for x in b.js(COLUMN % "nu_eps")] == vals[::-1]
    b.js("document.getElementById('f-dead').click()")  # show dead latents too: null ν sorts last
    n_dead = (lat.filter(pl.col("klass") == "chat_only")["nu_eps"].null_count())
    with_dead = [_num(x) for x in b.js(COLUMN % "nu_eps")]
    assert n_dead > 0 and with_dead == vals[::-1] + [None] * n_dead
    b.js("document.getElementById('f-dead').click()")

    # range filter + text search
    b.js("const c = document.getElementById('f-col'); c.value = 'f_template'; c.dispatchEvent(new Event('change'));"
         "const m = document.getElementById('f-min'); m.value = '0.5'; m.dispatchEvent(new Event('input'))")
    shown = [_num(x) for x in b.js(COLUMN % "f_template")]
    assert len(shown) == (want["f_template"] >= 0.5).sum() and all(x >= 50 for x in shown)
    b.js("const m = document.getElementById('f-min'); m.value = ''; m.dispatchEvent(new Event('input'));"
         "const t = document.getElementById('f-text'); t.value = 'CORRECTIONS'; t.dispatchEvent(new Event('input'))")
    chosen_chat = [j for j in truth["chosen"]["batchtopk"] if j in want["latent"].to_list()]
    assert sorted(int(x) for x in b.js(COLUMN % "latent")) == sorted(chosen_chat)
    b.js("document.getElementById('f-text').value = ''; document.getElementById('f-text').dispatchEvent(new Event('input'))")
    b.js("document.querySelector('#latent-table th[data-key=rank_nu]').click()")
    b.js("document.getElementById('latents').scrollIntoView()")
    b.screenshot(ARTIFACTS / "latent_table.png")
    assert b.errors == [], b.errors

    # a latent page: follow the first link, highlighted tokens with a real red background
    href = b.js("document.querySelector('#latent-table tbody a').href")
    latent = int(Path(href).stem)
    assert latent in truth["chosen"]["batchtopk"]
    b.open(href)
    assert b.errors == [], b.errors
    on = b.js("Array.from(document.querySelectorAll('.example .tok.on')).map(s => getComputedStyle(s).backgroundColor)")
    assert len(on) == 2 * 6 * 3  # two highlighted tokens in each of the 6 examples of each tercile
    assert all(c.startswith(("rgba(220, 38, 38, ", "rgb(220, 38, 38)")) for c in on)
    off = b.js("Array.from(document.querySelectorAll('.example .tok:not(.on)')).slice(0, 20)"
               ".map(s => getComputedStyle(s).backgroundColor)")
    assert set(off) == {"rgba(0, 0, 0, 0)"}
    alphas = b.js("Array.from(document.querySelectorAll('.example .tok.on')).map(s => [Number(s.dataset.act),"
                  " getComputedStyle(s).backgroundColor])")  # rgb(...) when alpha is 1
    alphas = [(a, float(c.split(",")[3].rstrip(")")) if c.startswith("rgba") else 1.0) for a, c in alphas]
    scale = max(a for a, _ in alphas)
    assert max(abs(alpha - min(a / scale, 1)) for a, alpha in alphas) < 1 / 255, alphas  # 8-bit alpha
    row = truth["latents"]["batchtopk"].filter(pl.col("latent") == latent).row(0, named=True)
    assert b.js("document.querySelector('#nu-table td').textContent") == tables.fmt(row["nu_eps"], 3)
    b.screenshot(ARTIFACTS / "latent_page.png", full_page=True)
