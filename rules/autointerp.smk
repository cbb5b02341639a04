# Stage 6: autointerp (paper A.10): activating examples per tercile, LLM explanations, detection
# scores against MiniLM-similar and random non-activating windows; on the embedded pair, explanations
# are also checked against the planted behaviours their latents detect (validate_behaviours).


rule embed_windows:
    input:
        val=f"{ACTS}/val.h5",
    output:
        f"{AUTOINTERP}/window_embeddings.npy",
    params:
        chat_model=lambda w: CHAT_MODEL,
        p=params_of("embed_windows"),
    log:
        log_of("embed_windows"),
    benchmark:
        benchmark_of("embed_windows")
    threads: LIGHT_THREADS
    conda:
        ENV
    shell:
        "python workflow_scripts/embed_windows.py --params {params.p:q} --val {input.val} --tokenizer {params.chat_model:q}"
        " --out {output} 2>&1 | tee {log}"


rule collect_examples:
    input:
        model=f"{CC}/{{variant}}/model.safetensors",
        latents=f"{ANALYSIS}/{{variant}}/latents.parquet",
        val=f"{ACTS}/val.h5",
        windows=f"{AUTOINTERP}/window_embeddings.npy",
        behaviours=[f"results/validate/{PAIR}/behaviours.json"] if BUILT else [],
    output:
        f"{AUTOINTERP}/{{variant}}/examples.parquet",
    params:
        cc=lambda w: CC,
        chat_model=lambda w: CHAT_MODEL,
        p=params_of("collect_examples"),
        behaviours=lambda w, input: f"--behaviours {input.behaviours} --variant {w.variant}" if BUILT else "",
    log:
        log_of("collect_examples", "-{variant}"),
    benchmark:
        benchmark_of("collect_examples", "-{variant}")
    threads: LIGHT_THREADS
    conda:
        ENV
    shell:
        "python workflow_scripts/collect_examples.py --params {params.p:q} --crosscoder {params.cc}/{wildcards.variant}"
        " --latents {input.latents} --val {input.val} --tokenizer {params.chat_model:q} --out {output}"
        " --window-embeddings {input.windows}"
        " {params.behaviours} 2>&1 | tee {log}"


rule explain_and_score:
    input:
        MODEL_INPUTS,
        examples=f"{AUTOINTERP}/{{variant}}/examples.parquet",
        behaviours=[f"results/validate/{PAIR}/behaviours.json"] if BUILT else [],
        explainer=[EXPLAINER_DIR] if EXPLAINER_DIR else [],
    output:
        explanations=f"{AUTOINTERP}/{{variant}}/explanations.jsonl",
        scores=f"{AUTOINTERP}/{{variant}}/scores.parquet",
        metrics=f"{AUTOINTERP}/{{variant}}/metrics.json",
    params:
        autointerp=lambda w: AUTOINTERP,
        serve_model=lambda w: SERVE_MODEL,
        p=params_of("explain_and_score"),
        cache=f"results/llm_cache/{PAIR}",
        behaviours=lambda w, input: f"--behaviours {input.behaviours} --variant {w.variant}" if BUILT else "",
    log:
        log_of("explain_and_score", "-{variant}"),
    benchmark:
        benchmark_of("explain_and_score", "-{variant}")
    threads: LIGHT_THREADS
    resources:
        gpu=1,
    conda:
        ENV
    shell:
        "python workflow_scripts/explain_and_score.py --params {params.p:q} --examples {input.examples}"
        " --serve-model {params.serve_model:q} --cache {params.cache} --out {params.autointerp}/{wildcards.variant}"
        " {params.behaviours} 2>&1 | tee {log}"


rule autointerp:
    input:
        expand(f"{AUTOINTERP}/{{variant}}/scores.parquet", variant=VARIANTS),
