# Stage 7: the paper's tables and figures from this run, plus a browsable latent dashboard.


rule render_report:
    input:
        models=[f"{MODELS}/metrics.json", f"{MODELS}/evaluation.json"] if BUILT else [],
        training=expand(f"{CC}/{{variant}}/metrics.json", variant=VARIANTS),
        latents=expand(f"{ANALYSIS}/{{variant}}/latents.parquet", variant=VARIANTS),
        comparison=f"{ANALYSIS}/comparison/metrics.json",
        seeds=f"{ANALYSIS}/seeds/metrics.json",
        causal=expand(f"{CAUSAL}/{{variant}}/kl.parquet", variant=VARIANTS),
        examples=expand(f"{AUTOINTERP}/{{variant}}/examples.parquet", variant=VARIANTS),
        scores=expand(f"{AUTOINTERP}/{{variant}}/scores.parquet", variant=VARIANTS),
        validate="results/validate/metrics.json",
        behaviours=[f"results/validate/{PAIR}/behaviours.json"] if BUILT else [],
        sweep=SWEEP_REPORT,  # the sweep's front, with report.include_sweep (rules/sweep.smk)
    output:
        index=f"{REPORT}/index.html",
        latents=directory(f"{REPORT}/latents"),
    params:
        layer=lambda w: LAYER,
        pair=lambda w: PAIR,
        report=lambda w: REPORT,
        p=params_of("render_report"),
        variants=" ".join(VARIANTS),
    log:
        log_of("render_report"),
    benchmark:
        benchmark_of("render_report")
    conda:
        ENV
    shell:
        "python workflow_scripts/render_report.py --params {params.p:q} --pair {params.pair} --layer {params.layer}"
        " --variants {params.variants} --out {params.report} 2>&1 | tee {log}"


rule report:
    input:
        f"{REPORT}/index.html",
