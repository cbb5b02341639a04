"""Latent Scaling for all latents in one pass (scaling.py) vs the per-latent way, same data, same run.

Baseline (the authors' closed_form_scalars + remove_latents): per batch, encode and decode once, then
materialise each latent's error target ε_m + f_j d_j^m as a (latents, N, d) tensor (a chunk of 64 latents at
a time here, all selected latents at once there) and reduce it with f_j and d_j^chat (eq. 30). The baseline
computes only the two error targets (the reconstruction target is shared by all latents), which favours it.
Only `--baseline-latents` latents are timed and the per-latent part is extrapolated linearly to all D
latents (the encode/decode part is counted once, not extrapolated).

Also: the all-latent pass against one inference-encode pass over the same tokens, and the sparse (SDDMM)
vs dense (BLAS) accumulation across activation densities (where scaling.SPARSE_MAX_DENSITY comes from).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, timeit, write_result  # noqa: E402  (after the sys.path insert that finds bench/common.py)

from crossdiff.crosscoder import CrossCoder, CrossCoderConfig  # noqa: E402  (after the sys.path insert that finds bench/common.py)
from crossdiff.scaling import ScalingStats, latent_scaling  # noqa: E402  (after the sys.path insert that finds bench/common.py)


def make(d: int, D: int, l0: int, n: int, batch: int, seed: int = 0, device: str = "cpu"):
    """A BatchTopK crosscoder with random weights whose θ gives mean L0 ≈ l0, and raw activation batches,
    built on `device`."""
    torch.manual_seed(seed)
    with torch.device(device), torch.no_grad():
        cc = CrossCoder(CrossCoderConfig(d, D, "batchtopk", k=l0))
        cc.W_enc.normal_(0, (2 * d) ** -0.5)
        cc.W_dec.normal_(0, d ** -0.5)
        cc.b_dec.normal_(0, 0.1)
        h = torch.randn(n, 2, d)
        v = cc.pre_acts(cc.normalize(h[:batch])) * cc.latent_weights()
        cc.threshold.fill_(torch.quantile(v.flatten()[:1 << 24], 1 - l0 / D).item())
    return cc.eval(), list(h.split(batch))


@torch.no_grad()
def encode_pass(cc, batches):
    for h in batches:
        cc.encode(h)


@torch.no_grad()
def per_latent(cc, batches, latents: torch.Tensor, chunk: int = 64):
    """The per-latent way for `latents` only, as the authors' closed_form_scalars/remove_latents do it: per
    batch, stack the error once per latent, add the latent back (eq. 31/32), reduce with a batched matmul.
    Returns the β numerators dᵀ(Yᵀf) (2, len)."""
    W = cc.W_dec
    num = torch.zeros(2, len(latents), dtype=torch.float64)
    for h in batches:
        x = cc.normalize(h)
        f = cc.encode_normalized(x)
        eps = x - cc.decode_normalized(f)
        n = len(h)
        for a in range(0, len(latents), chunk):
            J = latents[a:a + chunk]
            fj = f[:, J].T                                               # (J, N)
            for m in range(2):
                target = eps[:, m].unsqueeze(0).repeat(len(J), 1, 1)     # (J, N, d) one copy per latent
                target += W[m, J].unsqueeze(1).repeat(1, n, 1) * fj[..., None]  # + f_j d_j^m (eq. 31/32)
                A = torch.bmm(target.transpose(1, 2), fj[..., None]).squeeze(-1)  # (J, d) = Yᵀ f_j
                num[m, a:a + chunk] += (A * W[1, J]).sum(-1).double()           # d_j^chatᵀ (Yᵀ f_j)
    return num


@torch.no_grad()
def encode_decode(cc, batches):
    for h in batches:
        cc.decode_normalized(cc.encode_normalized(cc.normalize(h)))


def main():
    p = parser(__doc__)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--dict-size", type=int, default=8192)
    p.add_argument("--l0", type=int, default=32)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--baseline-latents", type=int, default=128)
    args = p.parse_args()
    if args.quick:
        args.d, args.dict_size, args.tokens, args.baseline_latents = 64, 4096, 2048, 64
    cc, batches = make(args.d, args.dict_size, args.l0, args.tokens, args.batch)
    D = args.dict_size
    with torch.no_grad():
        l0 = sum(float((cc.encode(h) > 0).sum()) for h in batches) / args.tokens

    # correctness on the subset: the one-pass numerators equal the per-latent ones
    subset = torch.randperm(D)[:args.baseline_latents]
    stats = latent_scaling(cc, batches, progress=False)
    with torch.no_grad():
        ref = per_latent(cc, batches, subset)
        dd = (cc.W_dec * cc.W_dec[1]).sum(-1).double()
        ours = stats.act - stats.rec + stats.ff * dd
    max_rel = float(((ours[:, subset] - ref).abs() / ref.abs().clamp_min(1e-6)).max())

    t_ours = timeit(lambda: latent_scaling(cc, batches, progress=False), repeat=3)
    t_enc = timeit(lambda: encode_pass(cc, batches), repeat=3)
    t_encdec = timeit(lambda: encode_decode(cc, batches), repeat=2)
    t_sub = timeit(lambda: per_latent(cc, batches, subset), repeat=2, warmup=1)
    t_base = t_encdec + (t_sub - t_encdec) * D / len(subset)           # linear extrapolation to all D latents

    # sparse vs dense accumulation by density (one batch, update only)
    crossover = []
    h = batches[0]
    x = cc.normalize(h)
    pre = cc.pre_acts(x)
    for dens in (0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16):
        f = pre * (pre >= torch.quantile(pre.flatten()[:1 << 24], 1 - dens))
        ts = timeit(lambda f=f: ScalingStats.zeros(D).update(f, x, cc.W_dec.detach(), cc.b_dec.detach(), sparse=True), repeat=2)
        td = timeit(lambda f=f: ScalingStats.zeros(D).update(f, x, cc.W_dec.detach(), cc.b_dec.detach(), sparse=False), repeat=2)
        crossover.append({"density": dens, "sparse_s": ts, "dense_s": td})
        print(f"density {dens:.3f}: sparse {ts * 1e3:.0f} ms  dense {td * 1e3:.0f} ms")

    ratio = t_base / t_ours
    print(f"d={args.d} D={D} tokens={args.tokens} L0={l0:.1f}: ours {t_ours:.3f}s, encode {t_enc:.3f}s "
          f"(x{t_ours / t_enc:.2f}), per-latent {t_base:.1f}s extrapolated from {len(subset)} latents ({t_sub:.2f}s)")
    write_result(args.out, "scaling",
                 ours={"seconds": t_ours, "what": "all D latents, one pass (encode + sufficient statistics)"},
                 baseline={"seconds": t_base, "what": f"per-latent error targets, timed on {len(subset)} latents, "
                                                      "extrapolated linearly to D (encode/decode counted once)",
                           "subset_seconds": t_sub, "encode_decode_seconds": t_encdec},
                 ratio=ratio, goal=">= 50x at D >= 4096; all-latent pass <= 2x one encode pass",
                 encode_seconds=t_enc, pass_over_encode=t_ours / t_enc, max_rel_diff_vs_per_latent=max_rel,
                 sizes={"d": args.d, "D": D, "tokens": args.tokens, "batch": args.batch, "l0": l0},
                 sparse_vs_dense=crossover)


if __name__ == "__main__":
    main()
