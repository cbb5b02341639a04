# Stage 5: causal KL evaluations (paper A.8): patch latents' chat-minus-base decoder contribution
# onto base activations and run the chat model on.


rule generate_eval_set:
    input:
        MODEL_INPUTS,
        corpus=f"{CORPUS}/val.parquet",
    output:
        f"results/causal/{PAIR}/eval_set.parquet",
    params:
        chat_model=lambda w: CHAT_MODEL,
        models=lambda w: MODELS,
        p=params_of("generate_eval_set"),
    log:
        log_of("generate_eval_set"),
    benchmark:
        benchmark_of("generate_eval_set")
    threads: LIGHT_THREADS
    resources:
        gpu=1,
    conda:
        ENV
    shell:
        "python workflow_scripts/generate_eval_set.py --params {params.p:q} --chat {params.chat_model:q}"
        " --toy-data {params.models}/data --corpus {input.corpus} --out {output} 2>&1 | tee {log}"


rule causal_kl:
    input:
        MODEL_INPUTS,
        eval_set=f"results/causal/{PAIR}/eval_set.parquet",
        model=f"{CC}/{{variant}}/model.safetensors",
        latents=f"{ANALYSIS}/{{variant}}/latents.parquet",
    output:
        kl=f"{CAUSAL}/{{variant}}/kl.parquet",
        metrics=f"{CAUSAL}/{{variant}}/metrics.json",
        figures=directory(f"{CAUSAL}/{{variant}}/figures"),
    params:
        base_model=lambda w: BASE_MODEL,
        causal=lambda w: CAUSAL,
        cc=lambda w: CC,
        chat_model=lambda w: CHAT_MODEL,
        p=params_of("causal_kl"),
    log:
        log_of("causal_kl", "-{variant}"),
    benchmark:
        benchmark_of("causal_kl", "-{variant}")
    threads: LIGHT_THREADS
    resources:
        gpu=1,
    conda:
        ENV
    shell:
        "python workflow_scripts/causal_kl.py --params {params.p:q} --base {params.base_model:q} --chat {params.chat_model:q}"
        " --eval-set {input.eval_set} --crosscoder {params.cc}/{wildcards.variant} --latents {input.latents}"
        " --variant {wildcards.variant} --out {params.causal}/{wildcards.variant} 2>&1 | tee {log}"


rule causal:
    input:
        expand(f"{CAUSAL}/{{variant}}/kl.parquet", variant=VARIANTS),
