# The sweep (`snakemake sweep`, not part of `all`): one crosscoder per (sparsity, expansion) point of params
# `sweep:` on this layer's activation cache, each the `sweep.variant` entry with only the swept keys changed
# (crossdiff.sweep), then a table and the FVE-L0 Pareto front. Points are wildcards, so each is one DVC stage.

from crossdiff import sweep as sweep_lib

SWEEP = config["sweep"]
SWEEP_ENTRY = config["crosscoders"].get(SWEEP["variant"])
if SWEEP_ENTRY is None:
    raise ValueError(f"params key `sweep.variant`: {SWEEP['variant']!r} is not an entry of crosscoders: {VARIANTS}")
SWEEP_DIR = f"results/sweep/{PAIR}/L{LAYER}/{SWEEP['variant']}"
SWEEP_PREFIX = sweep_lib.PREFIX[SWEEP_ENTRY["type"]]  # k (BatchTopK) or l0_ (L1's target_l0)
SWEEP_POINT = f"{SWEEP_DIR}/{SWEEP_PREFIX}{{sparsity}}-x{{expansion}}"
SWEEP_GRID = sweep_lib.grid(SWEEP)
# A point reads only its own keys (sweep.track only decides whether dvc.yaml lists the sweep), not the grid: adding a value to the grid trains the new points alone.
STAGES["sweep_point"] = ["sweep.variant", "sweep.max_steps", f"crosscoders.{SWEEP['variant']}", "seed", "device",
                         "analysis.classes", "analysis.dead_freq"]
STAGES["sweep_aggregate"] = ["sweep", f"crosscoders.{SWEEP['variant']}"]
# The report shows the front only when asked (report.include_sweep), so its inputs stay what it reads.
SWEEP_REPORT = [f"{SWEEP_DIR}/metrics.json", f"{SWEEP_DIR}/table.parquet", f"{SWEEP_DIR}/figures"] if config["report"].get("include_sweep") else []
if SWEEP_REPORT:
    STAGES["render_report"] = [*STAGES["render_report"], "sweep"]


rule sweep_point:
    input:
        train=f"{ACTS}/train.h5",
        val=f"{ACTS}/val.h5",
    output:
        model=f"{SWEEP_POINT}/model.safetensors",
        config=f"{SWEEP_POINT}/config.json",
        metrics=f"{SWEEP_POINT}/metrics.json",
        dvclive=directory(f"{SWEEP_POINT}/dvclive"),
    wildcard_constraints:
        sparsity=r"\d+",
        expansion=r"\d+",
    params:
        out=lambda w: SWEEP_POINT.format(**w),
        p=params_of("sweep_point"),
    log:
        log_of("sweep_point", "-{sparsity}-x{expansion}"),
    benchmark:
        benchmark_of("sweep_point", "-{sparsity}-x{expansion}")
    threads: TRAIN_THREADS
    resources:
        gpu=1,
    conda:
        ENV
    shell:
        "python workflow_scripts/sweep_point.py --params {params.p:q} --sparsity {wildcards.sparsity}"
        " --expansion {wildcards.expansion} --train {input.train} --val {input.val} --out {params.out} 2>&1 | tee {log}"


rule sweep_aggregate:
    input:
        [f"{SWEEP_POINT}/metrics.json".format(sparsity=s, expansion=x) for s, x in SWEEP_GRID],
    output:
        table=f"{SWEEP_DIR}/table.parquet",
        tsv=f"{SWEEP_DIR}/front.tsv",
        metrics=f"{SWEEP_DIR}/metrics.json",
        figures=directory(f"{SWEEP_DIR}/figures"),
    params:
        out=lambda w: SWEEP_DIR,
        p=params_of("sweep_aggregate"),
    log:
        log_of("sweep_aggregate"),
    benchmark:
        benchmark_of("sweep_aggregate")
    conda:
        ENV
    shell:
        "python workflow_scripts/sweep_aggregate.py --params {params.p:q} --points {input} --out {params.out} 2>&1 | tee {log}"


rule sweep:
    input:
        f"{SWEEP_DIR}/metrics.json",
