"""The trainer's read-ahead (crossdiff.prefetch) against loading each batch in series with the step.

Trains the same BatchTopK crosscoder on the same synthetic cache twice per round, once with the read-ahead and
once with the loader inline (the trainer as it was), rounds interleaved; reports the median steps/s of each,
the loader's own cost per batch, and checks that both runs end bitwise equal. ratio > 1: the read-ahead is
faster. The trainer reads ahead on CUDA only (crossdiff.train.READ_AHEAD): on a CPU the thread competes
with the step for the cores, and this bench measured it slower there.

    python bench/bench_loader.py --out results/bench/loader.json [--device cuda]
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from common import parser, write_result  # noqa: E402  (after the sys.path insert that finds bench/common.py)

import crossdiff.train  # noqa: E402
from crossdiff.cache import ActivationCache  # noqa: E402
from crossdiff.synthetic import SyntheticSpec, make_features, write_synthetic_cache  # noqa: E402


def cache(path: Path, d: int, n_tokens: int) -> Path:
    spec = SyntheticSpec(d_model=d, n_tokens=n_tokens, n_features={"shared": 8 * d, "chat_only": d, "base_only": d,
                         "shrinkage": 0, "decoupled": 0}, feature_rate=0.002, shrinkage_ratio=0.1,
                         decoupled_share=0.5, noise=0.01)
    return write_synthetic_cache(path, make_features(spec), "train", n_tokens)


def run(h5: Path, out: Path, steps: int, batch: int, device: str, ahead: bool) -> float:
    """Steps per second of one training run (crossdiff.train.train, as the pipeline calls it)."""
    params = dict(type="batchtopk", expansion=16, k=20, batch_size=batch, max_steps=steps, val_every=10**9,
                  checkpoint_every=10**9, lr=1e-3)
    crossdiff.train.READ_AHEAD = {torch.device(device).type} if ahead else set()
    t0 = time.perf_counter()
    crossdiff.train.train(h5, None, out, params, device=device, progress=False)
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    d, steps, batch = (64, 40, 512) if args.quick else (256, 300, 1024)
    with tempfile.TemporaryDirectory(prefix="crossdiff-bench-loader-") as tmp:
        tmp = Path(tmp)
        h5 = cache(tmp / "train.h5", d, 64 * batch)
        c = ActivationCache(h5)
        t0 = time.perf_counter()
        n = sum(1 for _ in c.iter_shuffled(batch, seed=0, device=args.device))
        load_ms = 1e3 * (time.perf_counter() - t0) / n
        run(h5, tmp / "warm-up", steps, batch, args.device, False)       # first-run costs (allocator, caches)
        rates = {True: [], False: []}
        for _ in range(args.rounds):
            for ahead in (False, True):
                rates[ahead].append(run(h5, tmp / f"run-{ahead}", steps, batch, args.device, ahead))
        a, b = (load_file(tmp / f"run-{x}" / "model.safetensors") for x in (True, False))
        equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ours, base = statistics.median(rates[True]), statistics.median(rates[False])
    write_result(args.out, "loader", {"steps_per_s": ours, "runs": rates[True]},
                 {"steps_per_s": base, "runs": rates[False]}, ours / base,
                 "read-ahead >= inline loading; bitwise-equal weights", loader_ms_per_batch=load_ms,
                 bitwise_equal=equal, shape={"d": d, "D": 16 * d, "k": 20, "batch": batch, "steps": steps},
                 device=args.device)
    if not equal:
        raise SystemExit("the read-ahead changed the trained weights")


if __name__ == "__main__":
    main()
