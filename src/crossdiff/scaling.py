"""Latent Scaling (paper §2.4, eq. 5, A.5, A.6) for every latent in one streaming pass.

For latent j and target y (N, d), the least-squares scale of its chat direction d = d_j^chat is (eq. 30)

    β_j = dᵀ(Yᵀ f_j) / (‖f_j‖² ‖d‖²) = Σ_n f_nj (y_n · d) / (Σ_n f_nj² ‖d‖²).

The targets (A.6), all in the crosscoder's normalised space where W_dec lives, for model m ∈ {base, chat}:
  error          y_n = h_n^m − Σ_{k≠j} f_nk d_k^m − b^m = ε_n^m + f_nj d_j^m      (eq. 31/32; the paper's
                 "+ b_dec" there is a sign slip: the bias is part of the reconstruction, ε = h − ĥ)
  reconstruction y_n = ĥ_n^m = Σ_k f_nk d_k^m + b^m                               (eq. 33/34)

so every numerator splits into per-token products that do not depend on which latent is left out:

    Σ_n f_nj (ε_n^m + f_nj d_j^m) · d = Σ_n f_nj (h_n^m · d) − Σ_n f_nj (ĥ_n^m · d) + (Σ_n f_nj²)(d_j^m · d).

The pass therefore keeps, per latent, only A_j^m = Σ f_nj (h_n^m·d_j^chat), R_j^m = Σ f_nj (ĥ_n^m·d_j^chat) and
Σ f_nj² (float64), touching the products h·d and ĥ·d only where f_nj ≠ 0 (SDDMM over f's sparsity pattern):
no per-latent copy of the data (the authors' code materialises one (latents, N, d) error tensor per batch,
which is why it scales to a few thousand latents only).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from crossdiff.crosscoder import serial

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# Above this share of non-zero activations the dense path (BLAS over all N·D products) beats SDDMM
# (bench_scaling: crossover between 8% and 16% at d=256, D=8192 on CPU).
SPARSE_MAX_DENSITY = 0.1


@dataclass
class ScalingStats:
    """Sufficient statistics of eq. 30 for all D latents (float64 accumulators)."""

    act: Tensor      # (2, D) Σ_n f_nj (h_n^m · d_j^chat), h normalised
    rec: Tensor      # (2, D) Σ_n f_nj (ĥ_n^m · d_j^chat), ĥ including b_dec
    ff: Tensor       # (D,)   Σ_n f_nj²
    fired: Tensor    # (D,)   #{n : f_nj > 0}
    n_tokens: int = 0

    @classmethod
    def zeros(cls, dict_size: int, device="cpu") -> ScalingStats:
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)
        return cls(z(2, dict_size), z(2, dict_size), z(dict_size),
                   torch.zeros(dict_size, dtype=torch.long, device=device))

    @torch.no_grad()
    def update(self, f: Tensor, x: Tensor, W_dec: Tensor, b_dec: Tensor, sparse: bool | None = None) -> None:
        """Add one batch: f (N, D) activations (≥ 0, as every crosscoder encode gives), x (N, 2, d) normalised
        activations, decoder W_dec (2, D, d), b_dec (2, d). `sparse=None` picks the path by f's density."""
        n, D = f.shape
        if x.shape[0] != n or x.shape[1] != 2 or W_dec.shape[:2] != (2, D):
            raise ValueError(f"shape mismatch: f {tuple(f.shape)}, x {tuple(x.shape)}, W_dec {tuple(W_dec.shape)}")
        if n == 0:
            return
        if not (torch.isfinite(x).all() and torch.isfinite(f).all()):
            bad = (~torch.isfinite(x).flatten(1).all(1) | ~torch.isfinite(f).all(1)).nonzero()[:, 0]
            raise ValueError(f"Latent Scaling: non-finite activations in {bad.numel()} rows of this batch "
                             f"(first at batch row {int(bad[0])}); an overflowed cache cannot be scaled — "
                             "rewrite it with activations.dtype: bfloat16 or float32")
        if sparse is not False:
            flat = f.reshape(-1)
            idx = flat.nonzero().squeeze(1)                             # one pass over f; row-major = CSR order
            if sparse is None:
                sparse = idx.numel() <= SPARSE_MAX_DENSITY * f.numel()
        if sparse:
            with serial(f):  # scattered O(nnz·d) work: OpenMP fork/join costs more than it saves (crosscoder.serial)
                self._update_sparse(f, idx, x, W_dec, b_dec)
        else:
            dc = W_dec[1]                                                # d_j^chat, the direction of every β
            recon = torch.einsum("nD,mDd->nmd", f, W_dec) + b_dec          # ĥ (eq. 2)
            ft = f.T
            for m in range(2):                                           # Σ_n f_nj y_n, then · d_j
                self.act[m] += ((ft @ x[:, m]) * dc).sum(-1).double()
                self.rec[m] += ((ft @ recon[:, m]) * dc).sum(-1).double()
            self.ff += (f * f).sum(0).double()
            self.fired += (f > 0).sum(0)
        self.n_tokens += n

    def _update_sparse(self, f: Tensor, idx: Tensor, x: Tensor, W_dec: Tensor, b_dec: Tensor) -> None:
        """SDDMM path: products h·d_j^chat and ĥ·d_j^chat only at the non-zero f_nj (flat indices `idx`)."""
        n, D = f.shape
        dc = W_dec[1]                                                   # d_j^chat, the direction of every β
        rows = torch.div(idx, D, rounding_mode="floor")
        cols, vals = idx - rows * D, f.reshape(-1)[idx]
        crow = torch.zeros(n + 1, dtype=torch.long, device=f.device)
        torch.cumsum(torch.bincount(rows, minlength=n), 0, out=crow[1:])
        F = torch.sparse_csr_tensor(crow, cols, vals, (n, D), check_invariants=False)
        recon = torch.stack([F @ W_dec[m] for m in range(2)], 1) + b_dec  # ĥ (eq. 2), O(nnz·d)
        dcT = dc.T.contiguous()
        for m in range(2):
            for acc, y in ((self.act, x[:, m]), (self.rec, recon[:, m])):
                g = torch.sparse.sampled_addmm(F, y.contiguous(), dcT, beta=0.0).values()  # y_n·d_j at f_nj≠0
                acc[m].index_add_(0, cols, (vals * g).double())
        self.ff.index_add_(0, cols, (vals * vals).double())
        self.fired += torch.bincount(cols, minlength=D)

    def betas(self, W_dec: Tensor) -> dict[str, np.ndarray]:
        """β for the four targets (eq. 30-34) and ν^ε, ν^r (§2.4), float64 (D,); NaN where undefined
        (latent never fired, zero chat decoder, or β^chat = 0 for ν)."""
        W = W_dec.detach().double().to(self.ff.device)
        dc = W[1]
        dd = (W * dc).sum(-1)                                           # (2, D): d_j^m · d_j^chat
        denom = self.ff * dd[1]                                         # ‖f_j‖² ‖d_j^chat‖²
        ok = (self.fired > 0) & (denom > 0)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        nan = torch.full_like(denom, float("nan"))
        out = {}
        for m, model in enumerate(("base", "chat")):
            err = self.act[m] - self.rec[m] + self.ff * dd[m]           # Σ f_nj (ε_n^m + f_nj d_j^m)·d (eq. 31/32)
            out[f"err_{model}"] = torch.where(ok, err / safe, nan)      # eq. 30
            out[f"rec_{model}"] = torch.where(ok, self.rec[m] / safe, nan)  # eq. 30 with eq. 33/34
        res = {f"beta_{k}": v.cpu().numpy() for k, v in out.items()}
        with np.errstate(divide="ignore", invalid="ignore"):
            for name, kind in (("nu_eps", "err"), ("nu_r", "rec")):     # ν = β^base / β^chat (§2.4)
                b, c = res[f"beta_{kind}_base"], res[f"beta_{kind}_chat"]
                res[name] = np.where(c != 0, b / c, np.nan)
        return res


@torch.no_grad()
def latent_scaling(crosscoder, batches: Iterable[Tensor], sparse: bool | None = None, total: int | None = None,
                   progress: bool = True) -> ScalingStats:
    """One pass over raw (B, 2, d) activation batches: inference encode (θ-threshold for BatchTopK), then
    the sufficient statistics of every latent. `sparse=None` picks SDDMM or dense BLAS per batch by density."""
    W_dec, b_dec = crosscoder.W_dec.detach(), crosscoder.b_dec.detach()
    stats = ScalingStats.zeros(W_dec.shape[1], W_dec.device)
    with tqdm(total=total, desc="latent scaling", unit="tok", unit_scale=True, disable=not progress) as bar:
        for h in batches:
            x = crosscoder.normalize(h.to(W_dec.device, W_dec.dtype))
            f = crosscoder.encode_normalized(x)
            stats.update(f, x, W_dec, b_dec, sparse)
            bar.update(len(h))
    return stats
