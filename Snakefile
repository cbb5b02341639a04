# crossdiff: what did chat fine-tuning change inside a language model?
# The one DAG of the project. dvc.yaml is generated from it (workflow_scripts/sync_dvc.py).

import sys
from pathlib import Path

from snakemake.utils import min_version, validate

min_version("9.0")

configfile: "params.yaml"


# Bad params stop here, before any compute, with an error naming the key.
sys.path.insert(0, str(Path(workflow.basedir) / "src"))
from crossdiff.config import validate as validate_params

validate_params(config)
validate(config, "schemas/params.schema.yaml")


include: "rules/common.smk"
include: "rules/models.smk"
include: "rules/activations.smk"
include: "rules/crosscoder.smk"
include: "rules/analysis.smk"
include: "rules/causal.smk"
include: "rules/seeds.smk"
include: "rules/autointerp.smk"
include: "rules/validate.smk"
include: "rules/sweep.smk"
include: "rules/report.smk"
include: "rules/bench.smk"


rule all:
    default_target: True
    input:
        rules.models.input,
        rules.activations.input,
        rules.crosscoders.input,
        rules.analysis.input,
        rules.causal.input,
        rules.seeds.input,
        rules.autointerp.input,
        rules.validate.input,
        rules.report.input,
