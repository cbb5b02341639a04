"""Latent Scaling for all latents at the paper's scale (d = 2,304, D = 73,728, 50M tokens), estimated by
measurement at two smaller sizes.

The one-pass Latent Scaling (crossdiff.scaling) costs, per token, one encoder matmul (2·2d·D flops), the
threshold, and an SDDMM over the L0 active latents (2·2·2d·L0 flops): time per token is linear in d·D at a
fixed L0/D. This script times `latent_scaling` at two sizes, checks that the time per (token · d · D) agrees
between them, and extrapolates time and memory. Memory is counted, not guessed: the float32 weights
(W_enc, W_dec: 2·2d·D), one batch of pre-activations and activations (2·batch·D) and the float64
accumulators (6·D); the measured peak RSS growth at the two sizes is printed next to that count.

    python bench/estimate_scaling.py --out results/bench/scaling_estimate.json
"""

import resource
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scaling import make  # noqa: E402  (after the sys.path insert that finds bench/)
from common import machine, timeit  # noqa: E402  (after the sys.path insert that finds bench/common.py)

from crossdiff.io import write_json  # noqa: E402  (after the sys.path insert that finds bench/common.py)
from crossdiff.scaling import latent_scaling  # noqa: E402  (after the sys.path insert that finds bench/common.py)

PAPER = {"d": 2304, "D": 73728, "tokens": 50_000_000, "l0": 100}
GIB = 2 ** 30


def counted_bytes(d: int, D: int, batch: int) -> int:
    """float32 weights + one batch of pre-activations and activations + float64 accumulators."""
    return 4 * (2 * 2 * d * D) + 4 * (2 * batch * D) + 4 * batch * 2 * d + 8 * 6 * D


def measure(d: int, D: int, l0: int, tokens: int, batch: int, device: str = "cpu") -> dict:
    """Time and memory of one all-latent pass; memory is the peak RSS growth on CPU, the allocator's peak
    (weights and batches included) on CUDA."""
    cuda = torch.device(device).type == "cuda"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    cc, batches = make(d, D, l0, tokens, batch, device=device)
    seconds = timeit(partial(latent_scaling, cc, batches, progress=False), repeat=2)
    rss = (torch.cuda.max_memory_allocated() / GIB if cuda
           else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20 - rss0)
    del cc, batches
    per = seconds / (tokens * d * D)
    flops = tokens * (2 * 2 * d * D + 2 * 2 * 2 * d * l0)
    print(f"d={d} D={D} tokens={tokens}: {seconds:.2f} s, {tokens / seconds:,.0f} tokens/s, "
          f"{flops / seconds / 1e9:.1f} GFLOP/s, peak RSS growth {rss:.2f} GiB (counted {counted_bytes(d, D, batch) / GIB:.2f})")
    return {"d": d, "D": D, "tokens": tokens, "batch": batch, "l0": l0, "seconds": seconds,
            "seconds_per_token_dD": per, "gflops": flops / seconds / 1e9, "rss_growth_gib": rss,
            "counted_gib": counted_bytes(d, D, batch) / GIB}


def main():
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", nargs=2, default=["256,4096,8", "512,8192,12"], metavar="d,D,L0",
                   help="the two sizes measured (on a GPU: larger, up to the paper's own 2304,73728,100)")
    args = p.parse_args()
    # two sizes with the paper's L0/D (100/73,728) kept roughly constant; d·D grows 4x between them by default
    small, large = (measure(*map(int, s.split(",")), args.tokens, args.batch, args.device) for s in args.sizes)
    per = large["seconds_per_token_dD"]  # the larger size is closer to BLAS's steady state
    drift = large["seconds_per_token_dD"] / small["seconds_per_token_dD"]
    paper_s = per * PAPER["tokens"] * PAPER["d"] * PAPER["D"]
    paper_flops = PAPER["tokens"] * (2 * 2 * PAPER["d"] * PAPER["D"] + 2 * 2 * 2 * PAPER["d"] * PAPER["l0"])
    result = {
        "measured": [small, large], "linearity_drift": drift, "machine": machine(),
        "paper": {**PAPER, "hours_here": paper_s / 3600, "tflop": paper_flops / 1e12,
                  "memory_gib_batch_2048": counted_bytes(PAPER["d"], PAPER["D"], 2048) / GIB,
                  "gpu_hours_at": {f"{tf} TFLOP/s": paper_flops / (tf * 1e12) / 3600 for tf in (100, 400)}},
    }
    print(f"time per token·d·D: large/small = {drift:.2f} (1.0 = linear). Paper scale: {paper_flops / 1e12:,.0f} TFLOP, "
          f"{paper_s / 3600:,.1f} h on this machine ({result['machine']['device']}), "
          f"memory {result['paper']['memory_gib_batch_2048']:.1f} GiB at batch 2048; "
          f"on a GPU {result['paper']['gpu_hours_at']['100 TFLOP/s'] * 60:.0f} min at 100 TFLOP/s sustained")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
