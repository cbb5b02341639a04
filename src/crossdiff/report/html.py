"""Render the report: an overview page (the paper's tables and figures from this run, variants side
by side), a sortable/filterable latent table, and one page per selected latent with its examples.

Self-contained by construction: CSS, JS, data and figures are inlined (figures as base64 data URIs),
so `index.html` works from file:// with no network and can be copied anywhere with `latents/`.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import jinja2
import polars as pl
import yaml
from tqdm import tqdm

from crossdiff import stage_times
from crossdiff.io import atomic_path
from crossdiff.report import tables
from crossdiff.report.collect import Run
from crossdiff.report.tokens import examples_for, group_examples, highlight

log = logging.getLogger(__name__)
HERE = Path(__file__).parent


def _datauri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _script_json(obj) -> str:
    """JSON safe inside <script type="application/json"> (no `</script>` can close it early)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(fmt=tables.fmt, pct=tables.pct, datauri=_datauri, highlight=highlight)
    env.globals.update(css=(HERE / "static" / "report.css").read_text(),
                       js=(HERE / "static" / "latent_table.js").read_text(),
                       class_names=tables.CLASS_NAMES)
    return env


def _figure_grid(per_variant: dict[str, list[Path]]) -> list[tuple[str, list[Path | None]]]:
    """Rows = figure file names (aligned across variants), columns = variants."""
    names = list(dict.fromkeys(p.name for paths in per_variant.values() for p in paths))
    by_name = {v: {p.name: p for p in paths} for v, paths in per_variant.items()}
    return [(n, [by_name[v].get(n) for v in per_variant]) for n in names]


SUMMARY_LATENTS = 8  # robust chat-only latents per variant on the first screen


def _autointerp_metrics(metrics: dict) -> dict:
    """metrics.json for the generic table: the warning is a banner, per-latent ground truth has its own table."""
    out = {k: x for k, x in metrics.items() if k != "warning"}
    if isinstance(out.get("ground_truth"), dict):
        out["ground_truth"] = {k: x for k, x in out["ground_truth"].items() if k != "latents"}
    return out


def render_report(run: Run, out_dir: str | os.PathLike, max_latents: int, examples_per_latent: int) -> Path:
    """Write `out_dir/index.html` and `out_dir/latents/{variant}/{latent}.html`; returns index path.

    At most `max_latents` pages per variant (explained latents first, then chat-only by rank_nu);
    the latent table on the overview lists every latent. The latents folder is built aside and
    swapped in, and index.html is written last, so an interrupted render leaves no mixed report.
    """
    if max_latents < 0 or examples_per_latent < 1:
        raise ValueError("report.max_latents must be >= 0 and report.examples_per_latent >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    names = [v.name for v in run.variants]
    latent_tables = {v.name: t for v in run.variants if (t := tables.latent_table(v)) is not None}
    pages = {name: tables.page_order(t, next(v.examples for v in run.variants if v.name == name), max_latents)
             for name, t in latent_tables.items()}

    tmp = Path(tempfile.mkdtemp(prefix=".latents.", dir=out_dir))
    tmp.chmod(0o755)  # mkdtemp makes it private; the report is meant to be shared
    try:
        for v in run.variants:
            if v.name in latent_tables:
                _render_latent_pages(env, run, v, latent_tables[v.name], pages[v.name], tmp / v.name,
                                     examples_per_latent)
        final = out_dir / "latents"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)

    params = run.params
    min_auroc = params.get("autointerp", {}).get("behaviour_auroc", 0.9)
    ctx = dict(
        run=run, names=names, title=f"crossdiff report: {run.pair}, layer {run.layer}",
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        params_yaml=yaml.safe_dump(params, sort_keys=False) if params else "",
        model_rows=tables.base_vs_chat(run.models) if run.models else None,
        training=[r for v in run.variants for r in tables.training_rows(v, params)],
        training_missing=[v.name for v in run.variants if v.training is None],
        health_failures={v.name: v.training.get("health_reasons") or [] for v in run.variants
                         if v.training and v.training.get("health") == "fail"},
        classes=tables.class_counts(run.variants, params.get("analysis", {}).get("classes")),
        template=[tables.template_stats(v.latents) for v in run.variants],
        analysis_rows=tables.side_by_side({v.name: v.analysis for v in run.variants}),
        analysis_figures=_figure_grid({v.name: v.analysis_figures for v in run.variants}),
        spaces=[{"variant": v.name, **v.analysis["space"]} for v in run.variants
                if v.analysis and v.analysis.get("space")],
        kl_tables=tables.kl_tables(run.variants, params.get("causal", {}).get("first_tokens")),
        causal_rows=tables.side_by_side({v.name: v.causal for v in run.variants}),
        causal_pools=tables.causal_pools(run.variants),
        cache_rows=tables.cache_rows(run.variants),
        stage_rows=run.stage_times.to_dicts() if run.stage_times is not None else None,
        stage_total=stage_times.totals(run.stage_times) if run.stage_times is not None else None,
        causal_figures=_figure_grid({v.name: v.causal_figures for v in run.variants}),
        autointerp_rows=tables.side_by_side({v.name: v.autointerp and _autointerp_metrics(v.autointerp)
                                             for v in run.variants}),
        ground_truth={v.name: ((v.autointerp or {}).get("ground_truth") or {}).get("latents") for v in run.variants},
        summary=[tables.summary_row(v) for v in run.variants],
        seed_rows=tables.seed_rows(run.seeds),
        robust={v.name: tables.robust_latents(latent_tables.get(v.name), v, run.behaviours, min_auroc, SUMMARY_LATENTS)
                for v in run.variants},
        min_auroc=min_auroc,
        autointerp_warnings={v.name: v.autointerp["warning"] for v in run.variants
                             if v.autointerp and v.autointerp.get("warning")},
        explained={v.name: tables.explained_rows(latent_tables.get(v.name)) for v in run.variants},
        comparison_rows=tables.side_by_side({"comparison": run.comparison}) if run.comparison else None,
        validate_rows=tables.side_by_side({"validate": run.validate}) if run.validate else None,
        validate_summary=tables.validation_rows(run.validate) if run.validate else None,
        behaviour_table=tables.behaviour_rows(run.behaviours) if run.behaviours else None,
        table_data=_script_json(tables.table_json(latent_tables, {k: set(p) for k, p in pages.items()})),
        n_pages={k: len(p) for k, p in pages.items()},
        run_pages={k: set(p) for k, p in pages.items()},
        max_latents=max_latents,
    )
    index = out_dir / "index.html"
    with atomic_path(index, suffix=".html") as t:
        t.write_text(env.get_template("index.html.j2").render(**ctx))
        t.chmod(0o644)
    log.info("report written to %s (%s latent pages)", index, sum(len(p) for p in pages.values()))
    return index


def _render_latent_pages(env, run: Run, variant, table: pl.DataFrame, latents: list[int], out: Path,
                         per_group: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    template = env.get_template("latent.html.j2")
    rows = {r["latent"]: r for r in table.filter(pl.col("latent").is_in(latents)).iter_rows(named=True)}
    n_chat = int((table["klass"] == "chat_only").sum())
    scores = tables.autointerp_scores(variant.scores)
    score_rows = {r["latent"]: r for r in scores.iter_rows(named=True)} if scores is not None else {}
    for i, latent in enumerate(tqdm(latents, desc=f"latent pages {variant.name}", leave=False)):
        ex = examples_for(variant.examples, latent) if variant.examples is not None else []
        page = template.render(
            title=f"{variant.name} latent {latent}", run=run, variant=variant.name, row=rows[latent],
            n_chat_only=n_chat, groups=group_examples(ex, per_group) if ex else None,
            examples_run=variant.examples is not None,
            explanation=(variant.explanations or {}).get(latent),
            score_row=score_rows.get(latent),
            prev=latents[i - 1] if i > 0 else None, next=latents[i + 1] if i + 1 < len(latents) else None,
        )
        (out / f"{latent}.html").write_text(page)
