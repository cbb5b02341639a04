# Stage 1: the model pair. For the embedded toy pair this builds corpora, tokenizer, base and chat
# models offline; for a packaged real base it exports the weights, and with `models.chat: finetune` it
# fine-tunes the chat model on the embedded chat corpus; a built pair is then measured (evaluate_pair:
# held-out losses, planted behaviours base vs chat). For a real pair (HF ids / local dirs) there is
# nothing to build.


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
        benchmark:
            benchmark_of("build_toy_pair")
        threads: workflow.cores
        resources:
            mem_mb=4000,
        conda:
            ENV
        shell:
            "python workflow_scripts/build_toy_pair.py --params {params.p:q} --out {params.models} 2>&1 | tee {log}"


# Real weights shipped in a package (crossdiff.packaged.MODELS): the packaged base (models.base: package:NAME)
# and the autointerp explainer (autointerp.endpoint.model: package:NAME), as plain HF folders.
rule export_packaged_model:
    output:
        directory("results/models/packaged/{name}"),
    wildcard_constraints:
        name="|".join(re.escape(n) for n in packaged.MODELS),
    params:
        p=params_of("export_packaged_model"),
    log:
        log_of("export_packaged_model", "-{name}"),
    benchmark:
        benchmark_of("export_packaged_model", "-{name}")
    resources:
        mem_mb=4000,
    conda:
        ENV
    shell:
        "python workflow_scripts/export_packaged_model.py --params {params.p:q} --name {wildcards.name} --out {output} 2>&1 | tee {log}"


if FINETUNED:

    rule finetune_chat:
        input:
            base=PACKAGED_DIR or config["models"]["base"],
        output:
            base=directory(f"{MODELS}/base"),
            chat=directory(f"{MODELS}/chat"),
            data=directory(f"{MODELS}/data"),
            metrics=f"{MODELS}/metrics.json",
        params:
            models=lambda w: MODELS,
            p=params_of("finetune_chat"),
        log:
            log_of("finetune_chat"),
        benchmark:
            benchmark_of("finetune_chat")
        threads: workflow.cores
        resources:
            mem_mb=8000,
        conda:
            ENV
        shell:
            "python workflow_scripts/finetune_chat.py --params {params.p:q} --base {input.base} --out {params.models} 2>&1 | tee {log}"


if BUILT:

    # Apart from building the pair, so more prompts (pair_eval) never re-train a model.
    rule evaluate_pair:
        input:
            MODEL_INPUTS,
            metrics=f"{MODELS}/metrics.json",
        output:
            evaluation=f"{MODELS}/evaluation.json",
            generations=f"{MODELS}/generations.parquet",
        params:
            models=lambda w: MODELS,
            p=params_of("evaluate_pair"),
        log:
            log_of("evaluate_pair"),
        benchmark:
            benchmark_of("evaluate_pair")
        threads: LIGHT_THREADS
        resources:
            mem_mb=4000,
            gpu=1,
        conda:
            ENV
        shell:
            "python workflow_scripts/evaluate_pair.py --params {params.p:q} --models {params.models} --out {params.models} 2>&1 | tee {log}"


rule models:
    input:
        [f"{MODELS}/metrics.json", f"{MODELS}/evaluation.json"] if BUILT else [],
