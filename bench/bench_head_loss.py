"""The fine-tune's loss through a 262k-row head: chunked with reused buffers (`head_loss`) vs. the dense
`F.cross_entropy(head(h).float(), t)`, forward + backward, at Gemma 3 270M's head (V = 262,144, h = 640, bf16
where the CPU multiplies bf16 natively, as the fine-tune runs it) and a batch's ~600 assistant positions.

Each side also runs in a fresh subprocess for its peak RSS (the head's weight is in both); the dense side
allocates several N x V float32 tensors a step, the chunked side two (chunk x V) buffers once.
"""

import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import parser, timeit, write_result  # noqa: E402  (after the sys.path insert that finds bench/common.py)

from crossdiff.toy.finetune import resolve_train_dtype  # noqa: E402
from crossdiff.toy.head_loss import linear_cross_entropy  # noqa: E402


def setup(quick: bool):
    n, h, V = (150, 640, 65_536) if quick else (600, 640, 262_144)
    dtype = resolve_train_dtype("auto")
    g = torch.Generator().manual_seed(0)
    W = torch.empty(V, h, dtype=dtype).normal_(0, 0.02, generator=g)   # made in place: no float32 copy
    x = torch.empty(n, h, dtype=dtype).normal_(generator=g).requires_grad_(True)
    t = torch.randint(0, V, (n,), generator=g)
    return x, W, t


def step(kind: str, x, W, t):
    if kind == "dense":
        loss = F.cross_entropy((x @ W.t()).float(), t)
    else:
        loss = linear_cross_entropy(x, W, t)
    loss.backward()
    x.grad = None


def peak_rss_gib(kind: str, quick: bool) -> float:
    """Peak RSS (VmHWM) of a fresh process that runs 3 steps of one side. Not ru_maxrss: a child's starts at
    the parent's high-water mark, so it would report the parent's peak after the parent ran the dense side."""
    code = ("import sys, re; sys.path.insert(0, 'bench'); import bench_head_loss as b; "
            f"x, W, t = b.setup({quick}); [b.step({kind!r}, x, W, t) for _ in range(3)]; "
            "print(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    return int(out.stdout.strip().splitlines()[-1]) / 2**20


def main(argv=None):
    args = parser(__doc__).parse_args(argv)
    x, W, t = setup(args.quick)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, W, t), F.cross_entropy((x @ W.t()).float(), t),
                                   rtol=1e-5, atol=1e-5)
    repeat = 3 if args.quick else 5
    t_dense = timeit(lambda: step("dense", x, W, t), repeat=repeat)
    t_chunk = timeit(lambda: step("chunked", x, W, t), repeat=repeat)
    rss = {k: peak_rss_gib(k, args.quick) for k in ("dense", "chunked")}
    write_result(args.out, "head_loss",
                 ours={"step_s": t_chunk, "peak_rss_gib": rss["chunked"]},
                 baseline={"step_s": t_dense, "peak_rss_gib": rss["dense"],
                           "impl": "F.cross_entropy(head(h).float(), t), autograd"},
                 ratio=t_dense / t_chunk, goal="faster than dense, and less memory",
                 dtype=str(resolve_train_dtype("auto")), threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
