#!/usr/bin/env bash
# Issue 19's GPU measurements, one after another, each under its own time limit, into ${1:-results/bench/gpu}:
# the bf16 BatchTopK step at the paper's shape, the crosscoder step bench, the read-ahead loader, all-latent
# Latent Scaling measured up to the paper's shape, caching throughput against a bare forward, and the
# generated-set validation run through the real trainer on CUDA (params.yaml defaults, then BatchTopK with
# bf16 autocast).
#   bash bench/gpu.sh results/bench/gpu           QUICK=1 DEVICE=cpu bash bench/gpu.sh /tmp/smoke  (smoke test)
set -u
out=${1:-results/bench/gpu}
py=${PYTHON:-python}
dev=${DEVICE:-cuda}
mkdir -p "$out"
run() {  # run LIMIT_S NAME SCRIPT ARGS...: a failure or a timeout is reported and the next part still runs
    local limit=$1 name=$2
    shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$py" "$@" || echo "!! $name: rc $? (failed, or killed at ${limit}s)"
}
if [ "${QUICK:-0}" = 1 ]; then
    q=--quick sizes=(64,1024,4 128,2048,6) tokens=20000 sets=(--sets d64-x6-r01-n01 --n-tokens 20000)
else
    q= sizes=(1152,36864,50 2304,73728,100) tokens=400000 sets=(--sets d256-x16-r0025-n01)
fi
run 150 paper bench/gpu_paper.py $q --out "$out/gpu_paper.json"
run 90 crosscoder bench/bench_crosscoder.py $q --out "$out/crosscoder.json"
run 90 loader bench/bench_loader.py $q --device "$dev" --out "$out/loader.json"
run 120 scaling bench/estimate_scaling.py --device "$dev" --tokens 65536 --sizes "${sizes[@]}" --out "$out/scaling_estimate.json"
run 150 cache bench/bench_cache.py --device "$dev" --model-dtype bfloat16 --tokens "$tokens" --out "$out/cache.json"
run 240 validate bench/validate_defaults.py --device "$dev" "${sets[@]}" --out "$out/validate_defaults.json"
run 120 validate_bf16 bench/validate_defaults.py --device "$dev" "${sets[@]}" --variants batchtopk \
    -S batchtopk.dtype=bfloat16 --out "$out/validate_defaults_bf16.json"
