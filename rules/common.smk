# Paths, the params each rule reads (declared once), and the library code each rule runs.
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

# rule -> params keys it reads ("{variant}" filled per job) and library modules it runs.
STAGES = {
    "build_toy_pair": dict(params=["toy"], code=["toy", "models.py"]),
    "build_corpus": dict(params=["models", "corpus", "seed", "toy.seed"] if TOY else ["models", "corpus", "seed"], code=["data.py", "models.py", "toy"]),
    "cache_activations": dict(params=["models", "layer", "activations", "device"], code=["models.py", "cache.py"]),
    "merge_activations": dict(params=[], code=["cache.py"]),
    "train_crosscoder": dict(params=["crosscoders.{variant}", "seed", "device"], code=["crosscoder.py", "train.py", "cache.py"]),
    "analyse_latents": dict(params=["analysis"], code=["latents.py", "scaling.py", "crosscoder.py", "cache.py", "report/figures.py"]),
    "compare_variants": dict(params=["analysis"], code=["latents.py", "report/figures.py"]),
    "generate_eval_set": dict(params=["models", "causal"], code=["causal.py", "models.py", "data.py"]),
    "causal_kl": dict(params=["models", "layer", "causal"], code=["causal.py", "models.py", "crosscoder.py"]),
    "collect_examples": dict(params=["autointerp"], code=["autointerp", "crosscoder.py", "cache.py"]),
    "explain_and_score": dict(params=["autointerp", "models"], code=["autointerp"]),
    "validate_synthetic": dict(params=["validate", "crosscoders", "analysis"], code=["synthetic.py", "crosscoder.py", "train.py", "latents.py", "scaling.py", "cache.py"]),
    "validate_behaviours": dict(params=["analysis"], code=["synthetic.py", "latents.py", "crosscoder.py", "cache.py"]),
    # the report prints the run's params, so it declares every key the pipeline's outputs depend on
    "render_report": dict(params=["report", "pair", "layer", "seed", "models", "corpus", "activations", "crosscoders",
                                  "analysis", "causal", "autointerp"] + (["toy"] if TOY else []), code=["report"]),
}


# params_of(rule): the params slice the rule reads, as JSON (Snakemake reruns a job when it changes).
params_of = cfg.params_factory(config, STAGES)
log_of = cfg.log_factory(LOGS)
