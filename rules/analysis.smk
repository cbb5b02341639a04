# Stage 4: per-latent statistics, Δnorm classes and Latent Scaling; then variants compared.


rule analyse_latents:
    input:
        model=f"{CC}/{{variant}}/model.safetensors",
        config=f"{CC}/{{variant}}/config.json",
        train=f"{ACTS}/train.h5",
        val=f"{ACTS}/val.h5",
    output:
        latents=f"{ANALYSIS}/{{variant}}/latents.parquet",
        metrics=f"{ANALYSIS}/{{variant}}/metrics.json",
        figures=directory(f"{ANALYSIS}/{{variant}}/figures"),
    params:
        analysis=lambda w: ANALYSIS,
        cc=lambda w: CC,
        p=params_of("analyse_latents"),
    log:
        log_of("analyse_latents", "-{variant}"),
    benchmark:
        benchmark_of("analyse_latents", "-{variant}")
    threads: LIGHT_THREADS
    conda:
        ENV
    shell:
        "python workflow_scripts/analyse_latents.py --params {params.p:q} --crosscoder {params.cc}/{wildcards.variant}"
        " --train {input.train} --val {input.val} --out {params.analysis}/{wildcards.variant} 2>&1 | tee {log}"


rule compare_variants:
    input:
        expand(f"{ANALYSIS}/{{variant}}/latents.parquet", variant=VARIANTS),
    output:
        metrics=f"{ANALYSIS}/comparison/metrics.json",
        figures=directory(f"{ANALYSIS}/comparison/figures"),
    params:
        analysis=lambda w: ANALYSIS,
        p=params_of("compare_variants"),
        variants=" ".join(VARIANTS),
    log:
        log_of("compare_variants"),
    benchmark:
        benchmark_of("compare_variants")
    conda:
        ENV
    shell:
        "python workflow_scripts/compare_variants.py --params {params.p:q} --variants {params.variants}"
        " --analysis {params.analysis} --out {params.analysis}/comparison 2>&1 | tee {log}"


rule analysis:
    input:
        expand(f"{ANALYSIS}/{{variant}}/latents.parquet", variant=VARIANTS),
        f"{ANALYSIS}/comparison/metrics.json",
