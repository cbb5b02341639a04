# Ground truth: synthetic activations with known chat-only features and the paper's artefact baits,
# and, on the embedded pair, whether chat-only latents pick out the planted behaviours.


rule validate_synthetic:
    output:
        metrics="results/validate/metrics.json",
        figures=directory("results/validate/figures"),
    params:
        p=params_of("validate_synthetic"),
    log:
        log_of("validate_synthetic"),
    benchmark:
        benchmark_of("validate_synthetic")
    threads: workflow.cores
    conda:
        ENV
    shell:
        "python workflow_scripts/validate_synthetic.py --params {params.p:q} --out results/validate 2>&1 | tee {log}"


if BUILT:

    rule validate_behaviours:
        input:
            val=f"{ACTS}/val.h5",
            corpus=f"{CORPUS}/val.parquet",
            models=expand(f"{CC}/{{variant}}/model.safetensors", variant=VARIANTS),
            latents=expand(f"{ANALYSIS}/{{variant}}/latents.parquet", variant=VARIANTS),
        output:
            f"results/validate/{PAIR}/behaviours.json",
        params:
            analysis=lambda w: ANALYSIS,
            cc=lambda w: CC,
            p=params_of("validate_behaviours"),
            variants=" ".join(VARIANTS),
        log:
            log_of("validate_behaviours"),
        benchmark:
            benchmark_of("validate_behaviours")
        conda:
            ENV
        shell:
            "python workflow_scripts/validate_behaviours.py --params {params.p:q} --variants {params.variants}"
            " --crosscoders {params.cc} --analysis {params.analysis} --val {input.val} --corpus {input.corpus} --out {output} 2>&1 | tee {log}"


rule validate:
    input:
        "results/validate/metrics.json",
        [f"results/validate/{PAIR}/behaviours.json"] if BUILT else [],
