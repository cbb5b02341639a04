# Stage 1: the model pair. For the embedded toy pair this builds corpora, tokenizer, base and chat
# models offline; for a real pair (HF ids / local dirs) there is nothing to build.


if TOY:

    rule build_toy_pair:
        output:
            base=directory(f"{MODELS}/base"),
            chat=directory(f"{MODELS}/chat"),
            data=directory(f"{MODELS}/data"),
            metrics=f"{MODELS}/metrics.json",
        params:
            models=lambda w: MODELS,
            p=params_of("build_toy_pair"),
        log:
            log_of("build_toy_pair"),
        threads: workflow.cores
        resources:
            mem_mb=4000,
        conda:
            ENV
        shell:
            "python workflow_scripts/build_toy_pair.py --params {params.p:q} --out {params.models} 2>&1 | tee {log}"


rule models:
    input:
        [f"{MODELS}/metrics.json"] if TOY else [],
