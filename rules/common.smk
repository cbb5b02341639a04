# Paths and the params each rule reads (declared once).
# workflow_scripts/sync_dvc.py reads STAGES to write dvc.yaml, so Snakemake and DVC agree.

import sys
from pathlib import Path

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from crossdiff import config as cfg
from crossdiff.guard import refuse_if_dvc_running

refuse_if_dvc_running(workflow.basedir)

PAIR = config["pair"]
LAYER = config["layer"]
TOY = config["models"]["base"] == "toy"
VARIANTS = list(config["crosscoders"])
SPLITS = ["train", "val"]

MODELS = f"results/models/{PAIR}"
CORPUS = f"results/corpus/{PAIR}"
ACTS = f"results/activations/{PAIR}/L{LAYER}"
CC = f"results/crosscoders/{PAIR}/L{LAYER}"
ANALYSIS = f"results/analysis/{PAIR}/L{LAYER}"
CAUSAL = f"results/causal/{PAIR}/L{LAYER}"
AUTOINTERP = f"results/autointerp/{PAIR}/L{LAYER}"
REPORT = f"results/report/{PAIR}"
LOGS = "results/logs"
ENV = "../envs/crossdiff.yaml"

# Model weights: built by `models` for the toy pair, otherwise HF ids / local dirs.
BASE_MODEL = f"{MODELS}/base" if TOY else config["models"]["base"]
CHAT_MODEL = f"{MODELS}/chat" if TOY else config["models"]["chat"]
MODEL_INPUTS = [f"{MODELS}/base", f"{MODELS}/chat", f"{MODELS}/data"] if TOY else []

# rule -> params keys it reads ("{variant}" filled per job). The library code each rule runs is not listed
# here: sync_dvc.py derives it from the import closure of the rule's workflow script.
STAGES = {
    "build_toy_pair": ["toy"],
    "build_corpus": ["models", "corpus", "seed", "toy.seed"] if TOY else ["models", "corpus", "seed"],
    "cache_activations": ["models", "layer", "activations", "device"],
    "merge_activations": ["activations"],
    "train_crosscoder": ["crosscoders.{variant}", "seed", "device"],
    "analyse_latents": ["analysis"],
    "compare_variants": ["analysis"],
    "generate_eval_set": ["models", "causal"],
    "causal_kl": ["models", "layer", "causal"],
    "collect_examples": ["autointerp"],
    "explain_and_score": ["autointerp", "models"],
    "validate_synthetic": ["validate", "crosscoders", "analysis"],
    "validate_behaviours": ["analysis"],
    # the report prints the run's params, so it declares every key the pipeline's outputs depend on
    "render_report": ["report", "pair", "layer", "seed", "models", "corpus", "activations", "crosscoders",
                      "analysis", "causal", "autointerp"] + (["toy"] if TOY else []),
}


# params_of(rule): the params slice the rule reads, as JSON (Snakemake reruns a job when it changes).
params_of = cfg.params_factory(config, STAGES)
log_of = cfg.log_factory(LOGS)
