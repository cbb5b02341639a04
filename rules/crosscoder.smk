# Stage 3: one crosscoder per entry of params.yaml `crosscoders:` (default: l1 and batchtopk).


rule train_crosscoder:
    input:
        train=f"{ACTS}/train.h5",
        val=f"{ACTS}/val.h5",
    output:
        model=f"{CC}/{{variant}}/model.safetensors",
        config=f"{CC}/{{variant}}/config.json",
        metrics=f"{CC}/{{variant}}/metrics.json",
        dvclive=directory(f"{CC}/{{variant}}/dvclive"),
    params:
        cc=lambda w: CC,
        p=params_of("train_crosscoder"),
        checkpoints=f"results/checkpoints/{PAIR}/L{LAYER}/{{variant}}",
    log:
        log_of("train_crosscoder", "-{variant}"),
    benchmark:
        benchmark_of("train_crosscoder", "-{variant}")
    threads: TRAIN_THREADS
    resources:
        gpu=1,
    conda:
        ENV
    shell:
        "python workflow_scripts/train_crosscoder.py --params {params.p:q} --variant {wildcards.variant}"
        " --train {input.train} --val {input.val} --out {params.cc}/{wildcards.variant}"
        " --checkpoints {params.checkpoints} 2>&1 | tee {log}"


rule crosscoders:
    input:
        expand(f"{CC}/{{variant}}/model.safetensors", variant=VARIANTS),
