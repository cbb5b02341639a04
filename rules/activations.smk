# Stage 2: the token corpus (web + chat, template mask) and the paired activation cache.

SHARDS = config["activations"]["shards"]


rule build_corpus:
    input:
        MODEL_INPUTS,
    output:
        expand(f"{CORPUS}/{{split}}.parquet", split=SPLITS),
    params:
        base_model=lambda w: BASE_MODEL,
        chat_model=lambda w: CHAT_MODEL,
        corpus=lambda w: CORPUS,
        models=lambda w: MODELS,
        p=params_of("build_corpus"),
    log:
        log_of("build_corpus"),
    benchmark:
        benchmark_of("build_corpus")
    conda:
        ENV
    shell:
        "python workflow_scripts/build_corpus.py --params {params.p:q} --base {params.base_model:q} --chat {params.chat_model:q}"
        " --toy-data {params.models}/data --out {params.corpus} 2>&1 | tee {log}"


rule cache_activations:
    input:
        MODEL_INPUTS,
        corpus=f"{CORPUS}/{{split}}.parquet",
    output:
        f"{ACTS}/{{split}}.h5" if SHARDS == 1 else f"{ACTS}/shards/{{split}}-{{shard}}.h5",
    wildcard_constraints:
        split="train|val",
        shard=r"\d+",
    params:
        base_model=lambda w: BASE_MODEL,
        chat_model=lambda w: CHAT_MODEL,
        p=params_of("cache_activations"),
        shard=lambda w: f"--shard {w.shard} --num-shards {SHARDS}" if SHARDS > 1 else "",
    log:
        log_of("cache_activations", "-{split}" if SHARDS == 1 else "-{split}-{shard}"),
    benchmark:
        benchmark_of("cache_activations", "-{split}" if SHARDS == 1 else "-{split}-{shard}")
    threads: workflow.cores
    resources:
        gpu=1,
    conda:
        ENV
    shell:
        "python workflow_scripts/cache_activations.py --params {params.p:q} --base {params.base_model:q} --chat {params.chat_model:q}"
        " --corpus {input.corpus} --out {output} {params.shard} 2>&1 | tee {log}"


if SHARDS > 1:

    rule merge_activations:
        input:
            expand(f"{ACTS}/shards/{{{{split}}}}-{{shard}}.h5", shard=range(SHARDS)),
        output:
            f"{ACTS}/{{split}}.h5",
        wildcard_constraints:
            split="train|val",
        params:
            p=params_of("merge_activations"),
        log:
            log_of("merge_activations", "-{split}"),
        benchmark:
            benchmark_of("merge_activations", "-{split}")
        conda:
            ENV
        shell:
            "python workflow_scripts/merge_activations.py --params {params.p:q} --out {output} {input} 2>&1 | tee {log}"


rule activations:
    input:
        expand(f"{ACTS}/{{split}}.h5", split=SPLITS),
