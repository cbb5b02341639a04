# Benchmarks: each bench/bench_*.py measures ours against a baseline in the same run and writes
# results/bench/{name}.json with both figures and their ratio (>1 = we are faster).

BENCHES = sorted(p.stem.removeprefix("bench_") for p in Path(workflow.basedir, "bench").glob("bench_*.py"))


rule run_benchmark:
    output:
        "results/bench/{name}.json",
    log:
        log_of("bench", "-{name}"),
    threads: workflow.cores
    conda:
        ENV
    shell:
        "python bench/bench_{wildcards.name}.py --out {output} 2>&1 | tee {log}"


rule bench:
    input:
        expand("results/bench/{name}.json", name=BENCHES),
