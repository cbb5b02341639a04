"""The `explain_and_score` stage: explain each latent from its explain split, then detection-score it.

The endpoint is `autointerp.endpoint` when `base_url` is set; otherwise a local `transformers serve`
runs for the duration, of `endpoint.model`: a local dir, `package:NAME` (a packaged instruct LLM, the
default: SmolLM2-135M-Instruct) or empty (the pair's chat model).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl

from . import prompts, scoring, server
from .client import LLMClient, api_key_from_env
from .constrain import Constraint

log = logging.getLogger(__name__)


@contextlib.contextmanager
def open_endpoint(params: dict, cache_dir: str | os.PathLike, serve_model: str | None = None,
                  dtype: str = "auto", backoff_s: float = 1.0, device: str = "auto") -> Iterator[LLMClient]:
    """An LLMClient on the configured endpoint, or on a local server started (and stopped) here."""
    ep = params["endpoint"]
    kw = dict(cache_dir=cache_dir, concurrency=ep["concurrency"], timeout_s=ep["timeout_s"],
              retries=ep["retries"], backoff_s=backoff_s, max_tokens=params["max_tokens"],
              temperature=params["temperature"])
    if ep["base_url"]:
        key = api_key_from_env(ep["api_key_env"], required=False)
        if not os.environ.get(ep["api_key_env"] or ""):
            log.warning("$%s is not set: calling %s without an API key", ep["api_key_env"], ep["base_url"])
        yield LLMClient(ep["base_url"], ep["model"], api_key=key, **kw)
        return
    model = served_model(ep["model"], serve_model)
    with server.serve(model, dtype=serve_dtype(ep, dtype), device=device, log_path=Path(cache_dir) / "server.log") as srv:
        client = LLMClient(srv.base_url, srv.model, **kw)
        client.server = srv  # the local server behind this client (for its request count and log)
        yield client


def serve_dtype(endpoint: dict, runtime_dtype: str) -> str:
    """The local server's weights: `endpoint.dtype`, or `runtime_dtype` (the pipeline's models.dtype) when that
    is auto or unset. bf16 by default: prefill-bound calls (a scorer prompt is ~620 tokens for 10 answer
    tokens) run 1.4x faster on bf16 units, while decoding a token is slower (63 vs 46 ms)."""
    dtype = endpoint.get("dtype", "auto")
    return runtime_dtype if dtype == "auto" else dtype


def served_model(model: str, serve_model: str | None) -> str:
    """What the local server runs: `endpoint.model`, or `serve_model` when that is empty (the pair's chat
    model) or `package:NAME` (a packaged instruct LLM, which the rule exports and passes as `serve_model`)."""
    if model.startswith("package:"):
        if not serve_model:
            raise ValueError(f"autointerp.endpoint.model {model!r}: pass its exported folder as the model to serve "
                             f"(the export_packaged_model rule writes results/models/packaged/{model[8:]})")
        return serve_model
    if not (model or serve_model):
        raise ValueError("autointerp.endpoint: base_url and model are empty and no model to serve was given")
    return model or serve_model


def _rng(seed: int, latent: int) -> np.random.Generator:
    return np.random.default_rng([seed, latent])


def constraint_for(params: dict, client: LLMClient) -> Constraint:
    """`autointerp.constrain` resolved for this client (logit_bias needs the local server's tokenizer)."""
    srv = client.server
    return Constraint.build(params["constrain"], local_server=srv is not None,
                            tokenizer_path=srv.model if srv is not None else None)


def explain(client: LLMClient, examples: pl.DataFrame, seed: int, constraint: Constraint,
            on_result: Callable[[int, str], None] | None = None) -> list[dict]:
    """One explainer call per latent on its explain windows (shuffled, activating tokens marked)."""
    records, requests = [], []
    for (latent,), ex in examples.filter(pl.col("split") == "explain").group_by("latent", maintain_order=True):
        ex = ex[_rng(seed, latent).permutation(ex.height).tolist()]
        messages = prompts.explainer_messages(list(zip(ex["tokens"].to_list(), ex["acts"].to_list())), constraint.style)
        why = ex["why"][0] if "why" in ex.columns else None  # nu / control / behaviour (examples.select_latents)
        records.append({"latent": latent, "klass": ex["klass"][0], "why": why, "prompt_hash": prompts.prompt_hash(messages)})
        requests.append(messages)
    extras = [constraint.explain_extras(client.max_tokens)] * len(requests)
    for rec, response in zip(records, client.complete_many(requests, "explain", on_result, extras)):
        rec["explanation"] = prompts.parse_explanation(response, one_line=constraint.style == "constrained")
        rec["parsed"] = rec["explanation"] is not None
        rec["response"] = response
        rec["model"] = client.model
        rec["constraint"] = constraint.mode
    n_ok = sum(r["parsed"] for r in records)
    log.info("explanations parsed for %d/%d latents", n_ok, len(records))
    return records


def score(client: LLMClient, examples: pl.DataFrame, explanations: list[dict], batch: int, seed: int,
          constraint: Constraint, on_result: Callable[[int, str], None] | None = None
          ) -> tuple[pl.DataFrame, pl.DataFrame, list[bool]]:
    """Detection scoring of every explained latent.

    Returns (per-latent scores, per-excerpt predictions, whether each scorer answer parsed).
    """
    chunks, requests, extras = [], [], []
    for rec in explanations:
        ex = examples.filter(pl.col("latent") == rec["latent"])
        description = rec["explanation"] or ""
        for chunk in scoring.scoring_batches(ex, batch, seed + rec["latent"]):
            chunks.append(chunk)
            requests.append(prompts.scorer_messages(description, chunk["tokens"].to_list(), constraint.style))
            extras.append(constraint.score_extras(chunk.height))
    preds, parsed = [], []
    for chunk, response in zip(chunks, client.complete_many(requests, "score", on_result, extras)):
        labels = prompts.parse_labels(response, chunk.height)
        parsed.append(labels is not None)
        labels = labels or [scoring.UNPARSED] * chunk.height
        preds.append(chunk.select("latent", "klass", "split", "tercile", "window").with_columns(
            pred=pl.Series(labels, dtype=pl.Int8)))
    schema = {"latent": pl.Int64, "klass": pl.Utf8, "split": pl.Utf8, "tercile": pl.Int8, "window": pl.Int64,
              "pred": pl.Int8}
    preds = pl.concat(preds) if preds else pl.DataFrame(schema=schema)
    rows = []
    for rec in explanations:
        mine = preds.filter(pl.col("latent") == rec["latent"])
        rows.append({"latent": rec["latent"], "klass": rec["klass"], "why": rec.get("why"), **scoring.latent_scores(mine)})
    return pl.DataFrame(rows), preds, parsed


def explain_and_score(examples: pl.DataFrame, client: LLMClient, params: dict,
                      on_result: Callable[[int, str], None] | None = None,
                      constraint: Constraint | None = None) -> tuple[list[dict], pl.DataFrame, dict]:
    """(explanations, scores, metrics) for every latent in `examples`."""
    if examples.is_empty():
        raise ValueError("examples table is empty: no latent had activating windows")
    t0 = time.perf_counter()
    constraint = constraint or constraint_for(params, client)
    log.info("constrained outputs: %s", constraint.describe())
    explanations = explain(client, examples, params["seed"], constraint, on_result)
    scores, _, parsed = score(client, examples, explanations, params["score_batch"], params["seed"], constraint,
                              on_result)
    metrics = scoring.summarise(scores)
    n_explained = sum(r["parsed"] for r in explanations)
    n_answers = len(explanations) + len(parsed)
    metrics["parse_rate"] = (n_explained + sum(parsed)) / n_answers if n_answers else math.nan  # all LLM answers
    metrics["parse_rate_explain"] = n_explained / len(explanations) if explanations else math.nan
    metrics["parse_rate_score"] = sum(parsed) / len(parsed) if parsed else math.nan
    metrics["constraint"] = constraint.describe()
    metrics["llm_calls"] = {"cached": client.hits, "new": client.misses, "model": client.model}
    metrics["wall_s"] = time.perf_counter() - t0  # LLM calls only (a cached rerun is fast)
    if metrics["unparsed_fraction"] > 0.5:  # the scores then measure the LLM's format-following, not the latents
        metrics["warning"] = (f"{metrics['unparsed_fraction']:.0%} of scorer answers were unparseable (counted wrong): "
                              f"{client.model} does not follow the autointerp prompts; use a capable instruction-tuned LLM")
        log.warning(metrics["warning"])
    return explanations, scores, metrics
