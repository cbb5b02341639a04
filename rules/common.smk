# Paths and the params each rule reads (declared once).
# workflow_scripts/sync_dvc.py reads STAGES to write dvc.yaml, so Snakemake and DVC agree.

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from crossdiff import config as cfg
from crossdiff import packaged, seeds
from crossdiff.guard import refuse_if_dvc_running

refuse_if_dvc_running(workflow.basedir)

PAIR = config["pair"]
LAYER = config["layer"]
TOY = config["models"]["base"] == "toy"
# models.base "package:NAME": real weights that ship in a package (crossdiff.packaged), exported by a rule;
# models.chat "finetune": a chat model the pipeline fine-tunes from the base on the embedded chat corpus.
PACKAGED = config["models"]["base"].removeprefix("package:") if config["models"]["base"].startswith("package:") else None
FINETUNED = config["models"]["chat"] == "finetune"
BUILT = TOY or FINETUNED  # the pipeline builds the pair, so it has the planted behaviours' labels
VARIANTS = list(config["crosscoders"])  # primary runs (seed = params `seed`): autointerp and the report use these
RUNS = VARIANTS + seeds.replicates(VARIANTS, config["seed"], config["seeds"])  # + NAME-seedN replicates

wildcard_constraints:
    variant=r"[A-Za-z0-9_-]+",
SPLITS = ["train", "val"]

MODELS = f"results/models/{PAIR}"
CORPUS = f"results/corpus/{PAIR}"
ACTS = f"results/activations/{PAIR}/L{LAYER}"
CC = f"results/crosscoders/{PAIR}/L{LAYER}"
ANALYSIS = f"results/analysis/{PAIR}/L{LAYER}"
CAUSAL = f"results/causal/{PAIR}/L{LAYER}"
AUTOINTERP = f"results/autointerp/{PAIR}/L{LAYER}"
REPORT = f"results/report/{PAIR}"
LOGS = f"results/logs/{PAIR}"
BENCHMARKS = f"results/benchmarks/{PAIR}"  # Snakemake's per-job wall time and peak RSS (the report's stage table)
ENV = "../envs/crossdiff.yaml"
# Crosscoder trainings take half the cores, so two run side by side: half of a step is sparse work on one
# thread (crossdiff.crosscoder.serial), and two 1-thread runs on 2 cores train 1.31x as many tokens per
# second as two 2-thread runs in turn (measured, issue 19). Snakemake sets OMP_NUM_THREADS to `threads`.
TRAIN_THREADS = max(1, workflow.cores // 2)
# So do the light per-crosscoder jobs (latent analysis, causal KL, autointerp and its server, the pair's
# evals): on 2 cores they used 0.8-1.7 CPU-seconds per second of wall (Snakemake benchmarks, issue 19),
# mostly start-up and small ops that a second thread barely speeds up. Pipeline builds, caching and the
# synthetic validation scale (1.4-1.9) and keep all cores.
LIGHT_THREADS = TRAIN_THREADS

# Model weights: built by `models` for a built pair, otherwise HF ids / local dirs.
PACKAGED_DIR = f"results/models/packaged/{PACKAGED}" if PACKAGED else None
BASE_MODEL = f"{MODELS}/base" if BUILT else (PACKAGED_DIR or config["models"]["base"])
CHAT_MODEL = f"{MODELS}/chat" if BUILT else config["models"]["chat"]
MODEL_INPUTS = [f"{MODELS}/base", f"{MODELS}/chat", f"{MODELS}/data"] if BUILT else ([PACKAGED_DIR] if PACKAGED else [])

# The autointerp explainer/scorer served locally (endpoint.base_url empty): endpoint.model "package:NAME" is
# an instruct LLM shipped in a package, exported like a packaged base; "" serves the pair's chat model.
_ep = config["autointerp"]["endpoint"]
EXPLAINER_PACKAGED = _ep["model"].removeprefix("package:") if _ep["model"].startswith("package:") else None
if EXPLAINER_PACKAGED and _ep["base_url"]:
    raise ValueError(f"params key `autointerp.endpoint.model`: {_ep['model']!r} is served locally, so "
                     f"autointerp.endpoint.base_url must be empty (got {_ep['base_url']!r})")
if EXPLAINER_PACKAGED and EXPLAINER_PACKAGED not in packaged.MODELS:
    raise ValueError(f"params key `autointerp.endpoint.model`: unknown packaged model {EXPLAINER_PACKAGED!r}; "
                     f"known: {sorted(packaged.MODELS)}")
EXPLAINER_DIR = f"results/models/packaged/{EXPLAINER_PACKAGED}" if EXPLAINER_PACKAGED else None
SERVE_MODEL = EXPLAINER_DIR or CHAT_MODEL  # what explain_and_score serves when no endpoint is configured

# rule -> params keys it reads ("{variant}" filled per job). Stages that load a language model declare
# `models` and `device` and read them through cfg.Runtime. The library code each rule runs is not listed
# here: sync_dvc.py derives it from the import closure of the rule's workflow script.
STAGES = {
    "build_toy_pair": ["toy"],
    "export_packaged_model": ["models"],
    "finetune_chat": ["finetune"],
    "evaluate_pair": ["pair_eval", "models", "device"],
    "build_corpus": ["models", "corpus", "seed", "toy.seed"] if TOY else ["models", "corpus", "seed"],
    "cache_activations": ["models", "layer", "activations", "device"],
    "merge_activations": ["activations"],
    "train_crosscoder": ["crosscoders.{variant}", "seed", "device"],
    "analyse_latents": ["analysis", "device"],
    "compare_variants": ["analysis"],
    "generate_eval_set": ["models", "causal", "device"],
    "causal_kl": ["models", "layer", "causal", "device"],
    "embed_windows": ["autointerp.window", "device"],
    "collect_examples": ["autointerp", "device"],
    "explain_and_score": ["autointerp", "models", "device"],
    "validate_synthetic": ["validate", "crosscoders", "analysis", "device"],
    "validate_behaviours": ["analysis", "device"],
    "summarise_seeds": ["seed", "seeds"],
    # the report prints the run's params, so it declares every key the pipeline's outputs depend on
    "render_report": ["report", "pair", "layer", "seed", "seeds", "models", "corpus", "activations", "crosscoders",
                      "analysis", "causal", "autointerp"] + (["toy"] if TOY else []) + (["finetune"] if FINETUNED else []) + (["pair_eval"] if BUILT else []),
}


# params_of(rule): the params slice the rule reads, as JSON (Snakemake reruns a job when it changes).
params_of = cfg.params_factory(config, STAGES)
log_of = cfg.log_factory(LOGS)
benchmark_of = cfg.log_factory(BENCHMARKS, ".tsv")
