# Conclusions that survive seeds: params `seeds` training runs per variant (replicates named NAME-seedN go
# through training, analysis and causal KL like any variant), summarised as mean/spread and claims held n of N.


rule summarise_seeds:
    input:
        training=expand(f"{CC}/{{run}}/metrics.json", run=RUNS),
        analysis=expand(f"{ANALYSIS}/{{run}}/metrics.json", run=RUNS),
        causal=expand(f"{CAUSAL}/{{run}}/kl.parquet", run=RUNS),
        causal_ci=expand(f"{CAUSAL}/{{run}}/metrics.json", run=RUNS),
    output:
        metrics=f"{ANALYSIS}/seeds/metrics.json",
        runs=f"{ANALYSIS}/seeds/runs.parquet",
    params:
        p=params_of("summarise_seeds"),
        runs=" ".join(RUNS),
        cc=lambda w: CC,
        analysis=lambda w: ANALYSIS,
        causal=lambda w: CAUSAL,
    log:
        log_of("summarise_seeds"),
    benchmark:
        benchmark_of("summarise_seeds")
    conda:
        ENV
    shell:
        "python workflow_scripts/summarise_seeds.py --params {params.p:q} --runs {params.runs}"
        " --crosscoders {params.cc} --analysis {params.analysis} --causal {params.causal}"
        " --out {params.analysis}/seeds 2>&1 | tee {log}"


rule seeds:
    input:
        f"{ANALYSIS}/seeds/metrics.json",
