"""BatchTopK training at the paper's shape on a GPU (issue 19): d = 2,304, D = 73,728, k = 100, batch 2,048,
bf16 autocast, as the trainer runs on CUDA, on synthetic activations.

Measured in the same run, against:
- the bf16 matmul peak (8192³ bf16 GEMM, this GPU's ceiling as it runs here);
- one bf16 encoder matmul of the step's shape (the step's one unavoidable dense part);
- the dense step as the authors' dictionary_learning formulates it (dense f^train, f @ W_dec, dense
  autograd), under the same autocast, with torch's Adam.

FLOPs are counted, not sampled. Ours executes the encoder matmul 2·N·2d·D plus four sparse products of
2·N·k·2d each (decode forward; gradients of the values, of W_dec and of W_enc). The dense step executes five
dense products of 2·N·2d·D each (encoder forward and W_enc gradient; decode forward; gradients of f and of
W_dec). The dense count is also the step's model FLOPs: `mfu` is that count over ours' time and the peak.
Our step is broken into phases by prefix timing: each phase is the difference of two cumulative prefixes.
Not a `bench_*.py`: `snakemake bench` runs on any machine, and this one needs a GPU (`bench/gpu.sh` runs it).

    python bench/gpu_paper.py --out results/bench/gpu_paper.json          # on a CUDA machine
    python bench/gpu_paper.py --out /tmp/gpu.json --quick                  # CPU smoke test, small shape
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_crosscoder import dense_loss  # noqa: E402  (after the sys.path insert that finds bench/)
from common import machine, parser, timeit  # noqa: E402  (after the sys.path insert that finds bench/common.py)

from crossdiff.crosscoder import CrossCoder, CrossCoderConfig, batchtopk_select, batchtopk_v  # noqa: E402
from crossdiff.io import write_json  # noqa: E402
from crossdiff.train import TrainConfig, adam, batchtopk_loss  # noqa: E402

PAPER = (2304, 73728, 100, 2048)      # d, D, k, batch (paper §2, A.2)
QUICK = (64, 2048, 16, 512)


def matmul_peak_tflops(dev, n: int) -> float:
    """bf16 n³ GEMM throughput: the ceiling every share below is taken against."""
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    return 2 * n ** 3 / timeit(lambda: a @ b, repeat=10, warmup=3) / 1e12


def peak_memory(fn, dev) -> float:
    """GiB the CUDA allocator peaks at over one call of fn (0 on CPU)."""
    if dev.type != "cuda":
        fn()
        return 0.0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2 ** 30


def kernel_profile(step, dev, rows: int = 12) -> str:
    """The device kernels of 3 steps by total time (torch.profiler), for the note's 'where the time goes'."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    for key in ("self_device_time_total", "self_cuda_time_total", "self_cpu_time_total"):
        try:
            return prof.key_averages().table(sort_by=key, row_limit=rows)
        except (AttributeError, KeyError, ValueError):
            continue
    return ""


def make(d: int, D: int, k: int, dev, optimizer):
    torch.manual_seed(0)
    with torch.device(dev):                                       # built on the device: no CPU init of 2·2d·D
        cc = CrossCoder(CrossCoderConfig(d, D, "batchtopk", k=k))
    return cc, optimizer(cc.parameters(), lr=1e-4)


def measure_ours(x, D: int, k: int, repeat: int, dead_share: float = 0.0, profile: bool = False) -> dict:
    """Our training step (loss, backward, clip, fused Adam) as the trainer runs it on CUDA, timed whole and by
    phase; `dead_share` of the latents start dead, so the aux loss (A.1) runs too (one that fires revives)."""
    n, _, d = x.shape
    dev = x.device
    cc, opt = make(d, D, k, dev, adam)
    cfg = TrainConfig(type="batchtopk", k=k, dead_tokens=10**12)
    tsf = torch.zeros(D, dtype=torch.long, device=dev)
    tsf[: int(dead_share * D)] = 10**13                                # dead until it fires

    def loss():
        return batchtopk_loss(cc, x, k, tsf, cfg, autocast=True)["loss"]

    def step():
        r = loss()
        opt.zero_grad(set_to_none=True)
        r.backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        opt.step()

    def prefix(stop: str):
        """The step cut after phase `stop` (the phases below, in order)."""
        def run():
            if stop == "encoder":
                return batchtopk_v(cc, x, autocast=True)
            if stop == "select":
                with torch.no_grad():
                    return batchtopk_select(cc, batchtopk_v(cc, x, autocast=True)[0], n * k)
            r = loss()
            if stop == "loss":
                return r
            cc.zero_grad(set_to_none=True)
            r.backward()
            if stop == "clip":
                torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        return run

    with torch.no_grad():                                               # same loss as the dense step's
        a = batchtopk_loss(cc, x, k, tsf.clone(), cfg, autocast=True)["recon"]
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            b = dense_loss(cc, x, k).float()
    mem = peak_memory(step, dev)
    t = timeit(step, repeat=repeat, warmup=2)
    cum = {ph: timeit(prefix(ph), repeat=repeat, warmup=2) for ph in ("encoder", "select", "loss", "backward", "clip")}
    cum["adam"] = t
    order = list(cum)
    phases = {ph: cum[ph] - (cum[order[i - 1]] if i else 0.0) for i, ph in enumerate(order)}
    return {"step_s": t, "tokens_per_s": n / t, "peak_gib": mem, "phases_s": phases, "dead_share": dead_share,
            "recon_rel_diff_vs_dense": float((a - b).abs() / b.abs()),
            "profile": kernel_profile(step, dev) if profile else ""}


def measure_dense(x, D: int, k: int, repeat: int) -> dict:
    """The dense step (dictionary_learning's formulation) under bf16 autocast, with torch's Adam; and one bf16
    encoder matmul of the same shape."""
    n, _, d = x.shape
    dev = x.device
    cc, opt = make(d, D, k, dev, torch.optim.Adam)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = dense_loss(cc, x, k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(cc.parameters(), 1.0)
        opt.step()

    mem = peak_memory(step, dev)
    t = timeit(step, repeat=repeat, warmup=2)
    xb, Wb = x.reshape(n, -1).bfloat16(), cc.W_enc.detach().reshape(-1, D).bfloat16()
    return {"step_s": t, "tokens_per_s": n / t, "peak_gib": mem,
            "encoder_matmul_s": timeit(lambda: xb @ Wb, repeat=repeat, warmup=2)}


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--no-profile", action="store_true")
    args = p.parse_args(argv)
    d, D, k, n = QUICK if args.quick else PAPER
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.quick:
        p.error("no CUDA device: the paper's shape needs a GPU (--quick runs a small smoke version on the CPU)")
    repeat = 3 if args.quick else 10
    torch.manual_seed(0)
    x = torch.randn(n, 2, d, device=dev) * (1 + torch.rand(1, 1, d, device=dev))
    ours = measure_ours(x, D, k, repeat, profile=not args.no_profile)
    ours_dead = measure_ours(x, D, k, repeat, dead_share=0.1)
    dense = measure_dense(x, D, k, repeat)
    peak = matmul_peak_tflops(dev, 1024 if args.quick else 8192)
    t_ours, t_dense, t_mm, prof = ours["step_s"], dense["step_s"], dense.pop("encoder_matmul_s"), ours.pop("profile")
    ours_dead.pop("profile")
    enc = 2 * n * 2 * d * D
    ours_flops, dense_flops = enc + 4 * 2 * n * k * 2 * d, 5 * enc
    res = {
        "name": "gpu_paper_shape", "machine": machine(),
        "shape": {"d_model": d, "dict_size": D, "k": k, "batch": n, "dtype": "bf16 autocast, float32 master weights"},
        "peak_bf16_tflops_measured": peak,
        "encoder_matmul": {"s": t_mm, "tflops": enc / t_mm / 1e12, "share_of_peak": enc / t_mm / 1e12 / peak},
        "ours": {**ours, "executed_tflops": ours_flops / t_ours / 1e12,
                 "executed_share_of_peak": ours_flops / t_ours / 1e12 / peak,
                 "mfu": dense_flops / t_ours / 1e12 / peak, "step_over_encoder_matmul": t_ours / t_mm},
        "ours_10pct_dead": {**ours_dead, "step_over_encoder_matmul": ours_dead["step_s"] / t_mm},
        "dense": {**dense, "executed_tflops": dense_flops / t_dense / 1e12,
                  "executed_share_of_peak": dense_flops / t_dense / 1e12 / peak,
                  "impl": "dense f^train, f @ W_dec, dense autograd, torch Adam (dictionary_learning)"},
        "ratio": t_dense / t_ours,
        "goal": ">= 40% of bf16 peak",
    }
    write_json(args.out, res)
    print(f"[bench gpu_paper_shape] peak {peak:.0f} TFLOP/s; ours {n / t_ours:,.0f} tok/s, step {t_ours * 1e3:.2f} ms "
          f"= {t_ours / t_mm:.2f} encoder matmuls, executed {res['ours']['executed_share_of_peak']:.1%} / "
          f"MFU {res['ours']['mfu']:.1%} of peak; dense {n / t_dense:,.0f} tok/s "
          f"({res['dense']['executed_share_of_peak']:.1%} of peak); ours/dense {t_dense / t_ours:.2f}x")
    for name, r in (("ours", ours), ("ours, 10% dead (aux on)", ours_dead)):
        print(f"{name}: step {r['step_s'] * 1e3:.2f} ms; phases (ms): "
              + ", ".join(f"{ph} {v * 1e3:.2f}" for ph, v in r["phases_s"].items()))
    if prof:
        print(prof)


if __name__ == "__main__":
    main()
