"""The crosscoder (paper §2.1, A.1): one shared encoder over base+chat activations, one decoder per model.

Parameters live in a *normalised* space: each model's activations times a scalar from `scale_from_norms`
(DESIGN §4; `normalisation`: per_model √d / E‖h^m‖, shared √d / mean_m E‖h^m‖, or none = raw). The sparsity
terms and the latent analysis (Δnorm, ν) see this space; `encode` takes raw activations and `decode` returns
raw activations, so every reconstruction is in the units of the cache.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from crossdiff.io import atomic_path, write_json

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

Kind = Literal["l1", "batchtopk"]
NORMALISATIONS = ("per_model", "shared", "none")
# The authors' decoder-norm init (dictionary_learning, jkminder fork): `scripts/train_crosscoder.py` passes
# --norm-init-scale 0.005 to the L1 `CrossCoder`; `BatchTopKCrossCoder.__init__` defaults norm_init_scale=1.0
# (both in dictionary.py; the scale is each per-model encoder column's / decoder row's norm, as our init_norm).
AUTHORS_INIT_NORM = {"l1": 0.005, "batchtopk": 1.0}
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


@dataclass
class CrossCoderConfig:
    d_model: int
    dict_size: int
    kind: Kind
    k: int | None = None             # BatchTopK: mean active latents per token (eq. 6)
    init_norm: float = 0.1           # encoder column norm at init (A.12), see CrossCoder.reset_parameters
    normalisation: str = "per_model" # the space of the parameters (and of Δnorm, ν): see scale_from_norms
    extra: dict = field(default_factory=dict)  # free-form provenance (training params, cache attrs)

    def __post_init__(self):
        if self.kind not in ("l1", "batchtopk"):
            raise ValueError(f"kind must be 'l1' or 'batchtopk', got {self.kind!r}")
        if self.d_model < 1 or self.dict_size < 1:
            raise ValueError(f"d_model and dict_size must be positive, got {self.d_model}, {self.dict_size}")
        if self.kind == "batchtopk" and not (self.k and 1 <= self.k <= self.dict_size):
            raise ValueError(f"batchtopk needs 1 <= k <= dict_size, got k={self.k}, dict_size={self.dict_size}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")


class CrossCoder(nn.Module):
    """W_enc (2, d, D), b_enc (D,), W_dec (2, D, d), b_dec (2, d); index 0 = base, 1 = chat."""

    def __init__(self, cfg: CrossCoderConfig, scale: Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d, D = cfg.d_model, cfg.dict_size
        self.W_enc = nn.Parameter(torch.empty(2, d, D))
        self.b_enc = nn.Parameter(torch.zeros(D))
        self.W_dec = nn.Parameter(torch.empty(2, D, d))
        self.b_dec = nn.Parameter(torch.zeros(2, d))
        # θ (eq. 11); < 0 means "not estimated yet". Kept for both kinds so every checkpoint has the same keys.
        self.register_buffer("threshold", torch.tensor(-1.0))
        self.register_buffer("scale", torch.ones(2) if scale is None else torch.as_tensor(scale, dtype=torch.float32).clone())
        self.reset_parameters()

    @property
    def kind(self) -> Kind:
        return self.cfg.kind

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A.12: decoder = encoder transpose, base and chat halves identical.

        Every per-model encoder column e_j^m gets norm `init_norm`. Our default 0.1 is our own choice, not
        the authors' (they use 0.005 for L1 and 1.0 for BatchTopK: AUTHORS_INIT_NORM, `init: authors`).
        With per-model inputs (‖h^m‖ ≈ √d) a random column gives pre-activations of std ≈ init_norm·√2, and
        the initial dense reconstruction W_decᵀW_enc h has norm ≈ (D/2)·init_norm²/d·‖h‖ ≈ 0.1‖h‖ at
        expansion 16-32: small against h, so early gradients are dominated by the data rather than by a
        random reconstruction that grows with D.
        """
        d, D = self.cfg.d_model, self.cfg.dict_size
        w = torch.randn(d, D)
        w *= self.cfg.init_norm / w.norm(dim=0, keepdim=True)
        self.W_enc.copy_(w.expand(2, d, D))
        self.W_dec.copy_(w.T.expand(2, D, d))
        self.b_enc.zero_()
        self.b_dec.zero_()

    # -- normalisation -------------------------------------------------------------------------
    def normalize(self, h: Tensor) -> Tensor:
        """Raw (N, 2, d) -> normalised space (per-model scalar, DESIGN §4)."""
        self._check_acts(h)
        return h * self.scale.to(h.dtype)[:, None]

    def _check_acts(self, h: Tensor) -> None:
        if h.ndim != 3 or h.shape[1] != 2 or h.shape[2] != self.cfg.d_model:
            raise ValueError(f"expected activations (N, 2, {self.cfg.d_model}), got {tuple(h.shape)}")

    # -- encoder -------------------------------------------------------------------------------
    def pre_acts(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """f(x) of eq. 1 from *normalised* x (N, 2, d): both models' encoders in one (N, 2d) @ (2d, D) matmul.
        `out`: an (N, D) buffer to write into (no autograd; see `scratch`)."""
        n = x.shape[0]
        W = self.W_enc.reshape(-1, self.cfg.dict_size)
        if out is not None:
            return torch.addmm(self.b_enc, x.reshape(n, -1), W, out=out).relu_()  # eq. 1
        pre = torch.addmm(self.b_enc, x.reshape(n, -1), W)                     # eq. 1
        return pre.relu_() if not torch.is_grad_enabled() else torch.relu(pre)

    def latent_weights(self) -> Tensor:
        """‖d_j^base‖ + ‖d_j^chat‖ (D,), the factor of the sparsity terms (eq. 3) and of v (eq. 6)."""
        return self.decoder_norms().sum(0)

    def encode(self, h: Tensor) -> Tensor:
        """Raw (N, 2, d) -> inference activations f (N, D): ReLU (L1, eq. 1) or θ-thresholded (BatchTopK, eq. 10)."""
        return self.encode_normalized(self.normalize(h))

    def encode_normalized(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """`encode` for already normalised x (`out`: see `pre_acts`)."""
        f = self.pre_acts(x, out)
        if self.kind == "batchtopk":
            if self.threshold < 0:
                raise RuntimeError("BatchTopK crosscoder has no inference threshold θ yet (train it first)")
            drop = (f * self.latent_weights()) <= self.threshold     # not v(x, j) > θ (A.1, eq. 10)
            f = f.masked_fill(drop, 0) if torch.is_grad_enabled() else f.masked_fill_(drop, 0)
        return f

    # -- decoder -------------------------------------------------------------------------------
    def decode_normalized(self, f: Tensor) -> Tensor:
        """Dense Σ_j f_j d_j + b_dec (eq. 2) in normalised space, (N, 2, d)."""
        return torch.einsum("nD,mDd->nmd", f, self.W_dec) + self.b_dec  # eq. 2

    @torch.no_grad()
    def decode_support(self, f: Tensor, nonzero: Tensor | None = None) -> Tensor:
        """`decode_normalized` of a mostly-zero f (inference) as a CSR product over its nonzeros (`nonzero`:
        the mask f != 0 if the caller has it): O(L0·N·d) instead of O(N·D·d). On CPU only; elsewhere, or
        when f is not sparse, the dense product."""
        if f.device.type != "cpu":
            return self.decode_normalized(f)
        sel = Selection.from_mask(f != 0 if nonzero is None else nonzero)
        if sel.flat.numel() > SUPPORT_DENSITY * f.numel():
            return self.decode_normalized(f)
        return sparse_decode(self, sel.gather(f), sel) + self.b_dec     # eq. 2

    def decode(self, f: Tensor) -> Tensor:
        """f (N, D) -> reconstruction in RAW units (N, 2, d)."""
        return self.decode_normalized(f) / self.scale.to(f.dtype)[:, None]

    def forward(self, h: Tensor) -> Tensor:
        """Raw -> raw reconstruction with inference activations."""
        return self.decode(self.encode(h))

    def decoder_norms(self) -> Tensor:
        """‖d_j^m‖ (2, D) in normalised space (what the sparsity terms see)."""
        return self.W_dec.norm(dim=-1)

    def decoder_raw(self) -> Tensor:
        """W_dec in raw units (2, D, d): Σ_j f_j decoder_raw[m, j] + b_dec/scale reconstructs raw h^m."""
        return self.W_dec / self.scale[:, None, None]

    @torch.no_grad()
    def fold_center(self, c: Tensor) -> None:
        """Absorb an input centre c (2, d), normalised space, into the biases: a crosscoder trained on x − c
        then gives the same f and reconstruction on x itself, so the saved model is plain eq. 1-2."""
        self.b_enc -= torch.einsum("md,mdD->D", c.to(self.W_enc), self.W_enc)  # eq. 1: W_enc(x − c) + b_enc
        self.b_dec += c.to(self.b_dec)                                          # eq. 2: x̂ − c + c

    # -- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """model.safetensors + config.json (DESIGN §3), atomically."""
        directory = Path(directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_path(directory / WEIGHTS, suffix=".safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": "crossdiff-crosscoder"})
        write_json(directory / CONFIG, asdict(self.cfg))

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> CrossCoder:
        """Never unpickles: safetensors for tensors, JSON for the config."""
        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
        for p in (cfg_path, w_path):
            if not p.exists():
                raise FileNotFoundError(f"crosscoder checkpoint incomplete: {p} missing")
        cfg = CrossCoderConfig(**json.loads(cfg_path.read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(w_path)))
        return model.to(device)


def scale_from_norms(d_model: int, norm_base: float, norm_chat: float, mode: str = "per_model") -> Tensor:
    """(base, chat) input scales (DESIGN §4) from the cache's mean norms E‖h^m‖.

    per_model: √d / E‖h^m‖, each model's mean norm becomes √d. Δnorm and ν then see both models at equal
      mean norm: ν equals the raw-space ν times r = E‖h_chat‖ / E‖h_base‖ (β^base and β^chat scale by s_m).
    shared: one scalar √d / ½(E‖h_base‖ + E‖h_chat‖) for both, so ratios between the models (Δnorm, ν) are
      the raw ones. The authors' later trainer (dictionary_learning `NormalizableMixin`) also uses one scalar,
      target_rms / √(Σ Var) over both models after centring; we keep √d so μ and lr keep their meaning.
    none: raw activations (the paper's runs).
    """
    for name, v in (("norm_base", norm_base), ("norm_chat", norm_chat)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive finite mean activation norm, got {v}")
    if mode == "per_model":
        s = [math.sqrt(d_model) / norm_base, math.sqrt(d_model) / norm_chat]
    elif mode == "shared":
        s = [math.sqrt(d_model) / (0.5 * (norm_base + norm_chat))] * 2
    elif mode == "none":
        s = [1.0, 1.0]
    else:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {mode!r}")
    return torch.tensor(s, dtype=torch.float32)


@torch.no_grad()
def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Per-model geometric median (2, d) of points (N, 2, d): argmin_m Σ_n ‖x_n − m‖, by Weiszfeld iterations
    from the mean. The authors start the BatchTopK decoder bias here on the first (normalised) batch
    (dictionary_learning trainers/crosscoder.py, `BatchTopKCrossCoderTrainer.update` / `.geometric_median`)."""
    x = points.double()
    guess = x.mean(0)
    for _ in range(max_iter):
        w = 1 / (x - guess).norm(dim=-1).clamp_min(1e-12)              # (N, 2): Weiszfeld weights 1/‖x_n − m‖
        new = (w[..., None] * x).sum(0) / w.sum(0)[:, None]
        done = bool(((new - guess).norm(dim=-1) < tol).all())
        guess = new
        if done:
            break
    return guess.to(points.dtype)


# -- sparse training primitives (DESIGN §7) ------------------------------------------------------
# A selection is a set of (token, latent) entries given as flat indices n*D + j, sorted ascending, so
# they are directly the row-major pattern of a CSR matrix (N, D). Decode and every backward below run as
# CSR products over these entries only: cost O(#entries · d), never O(N · D · d).


SUPPORT_DENSITY = 0.1  # decode_support: above this share of nonzeros the dense product is as fast (measured)
PARALLEL_WORK = 1 << 22   # multiply-adds above which a sparse product is worth all threads (measured, issue 19)


def scratch(cc: CrossCoder, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A buffer kept on `cc` between calls (never in the state dict): a fresh N×D block is returned to the OS on
    free and page-faulted in again every step (measured 15 ms of a 63 ms matmul). A shorter request (a last,
    partial batch) gets the buffer's first rows; other shapes, dtypes or devices reallocate. Its contents are
    overwritten by the next caller of the same name."""
    buf = cc.__dict__.get(name)
    if (buf is None or buf.shape[0] < shape[0] or buf.shape[1:] != shape[1:] or buf.dtype != dtype
            or buf.device != device):
        buf = cc.__dict__[name] = torch.empty(shape, dtype=dtype, device=device)
    return buf[:shape[0]]


@contextlib.contextmanager
def serial(t: Tensor, work: int | None = None):
    """Run the sparse ops single-threaded on CPU: each is O(#entries·d) of scattered work, where OpenMP's
    fork/join costs more than it saves (measured: a 512-entry CSR product takes 16 ms on 2 busy threads,
    7 µs on one). Dense matmuls outside keep all threads. With `work` (multiply-adds) ≥ PARALLEL_WORK the
    product is large enough to gain from threads (a 65k-entry × 256 CSR product: 2.1 ms on 1, 1.2 ms on 2)."""
    if t.device.type != "cpu" or (work is not None and work >= PARALLEL_WORK):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@dataclass
class Selection:
    """Selected entries of an (N, D) activation matrix, in CSR order."""
    n: int
    dict_size: int
    crow: Tensor     # (N+1,) row pointers
    cols: Tensor     # (E,) latent index of each entry
    flat: Tensor     # (E,) n*D + j
    rows: Tensor | None = None
    _t: tuple | None = field(default=None, repr=False)
    src: Tensor | None = field(default=None, repr=False)       # the (N, D) tensor the entries were selected from
    src_vals: Tensor | None = field(default=None, repr=False)  # src at the entries, gathered while selecting

    def gather(self, t: Tensor) -> Tensor:
        """t at the entries (E,). Reuses the values gathered during selection when t is that tensor: each
        65k-entry gather from a 33 MB buffer is a cache miss per entry (~2 ms, measured)."""
        if self.src_vals is not None and t is self.src:
            return self.src_vals
        return t.reshape(-1)[self.flat]

    @classmethod
    def from_flat(cls, flat: Tensor, n: int, dict_size: int) -> Selection:
        rows = torch.div(flat, dict_size, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=n)
        crow = torch.zeros(n + 1, dtype=torch.long, device=flat.device)
        torch.cumsum(counts, 0, out=crow[1:])
        return cls(n, dict_size, crow, flat - rows * dict_size, flat, rows)

    @classmethod
    def from_mask(cls, mask: Tensor) -> Selection:
        """The entries where an (N, D) bool mask is true."""
        return cls.from_flat(indices_of(mask.reshape(-1)), *mask.shape)

    def csr(self, values: Tensor) -> Tensor:
        return torch.sparse_csr_tensor(self.crow, self.cols, values, (self.n, self.dict_size),
                                       check_invariants=False)

    def csr_t(self, values: Tensor) -> Tensor:
        """The (D, N) transpose as a CSR matrix (entries grouped by latent), built once per selection.

        `csr(v).t() @ y` would convert CSC -> CSR on every call (measured 4x slower than the product itself).
        """
        if self._t is None:
            rows = self.rows if self.rows is not None else torch.div(self.flat, self.dict_size, rounding_mode="floor")
            key = self.cols.int() if self.dict_size < 2**31 else self.cols
            perm = torch.sort(key, stable=True).indices                   # by latent, rows ascending within
            crow = torch.zeros(self.dict_size + 1, dtype=torch.long, device=self.flat.device)
            torch.cumsum(torch.bincount(self.cols, minlength=self.dict_size), 0, out=crow[1:])
            self._t = (perm, crow, rows[perm])
        perm, crow, rows = self._t
        return torch.sparse_csr_tensor(crow, rows, values[perm], (self.dict_size, self.n), check_invariants=False)


def indices_ge(flat: Tensor, cut, out: Tensor | None = None) -> Tensor:
    """Ascending indices of `flat >= cut`; `out`: a reused bool buffer for the mask (no page faults for a
    fresh one each step)."""
    return indices_of(flat >= cut if out is None else torch.ge(flat, cut, out=out))


def indices_of(mask: Tensor) -> Tensor:
    """Ascending indices of a flat bool mask. torch's nonzero costs ~1 ns per element scanned, so it runs on
    the mask's 8-byte words first and then only inside the words that hold a hit (measured 11 -> 7.5 ms on
    8.4M)."""
    if mask.numel() % 8:
        return mask.nonzero().squeeze(1)
    words = mask.view(torch.int64).nonzero().squeeze(1)                # words holding ≥ 1 hit
    sub = mask.view(-1, 8)[words].reshape(-1).nonzero().squeeze(1)   # hits inside them
    return words[sub >> 3] * 8 + (sub & 7)


def batch_topk_indices(v: Tensor, n_keep: int, cut: float | None = None) -> Tensor:
    """`_batch_topk`'s indices: see there."""
    return _batch_topk(v.reshape(-1), n_keep, cut)[0]


def _batch_topk(flat: Tensor, n_keep: int, cut: float | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Flat indices (sorted) of exactly the `n_keep` largest entries of v (N, D): BATCHTOPK of eq. 6.

    Same set as `v.flatten().topk(n_keep)` but much cheaper: only the candidates v >= cut are compacted and
    ranked. `cut` is a guess (the trainer passes the previous step's n_keep-th value, slightly lowered: the
    running threshold); without it, or when it keeps fewer than n_keep, a strided sample gives a cut keeping
    ~2·n_keep, and failing that the full top-k runs. Any candidate set of >= n_keep entries above a cut
    contains the top n_keep, so exactness never depends on the guess; only the exact top-k of the
    candidates fixes the count. Returns the indices and v at them.
    """
    if not 0 < n_keep <= flat.numel():
        raise ValueError(f"cannot keep {n_keep} of {flat.numel()} activations")
    cand = indices_ge(flat, cut, mask) if cut is not None else None   # ascending
    if cand is None or cand.numel() < n_keep:
        stride = max(1, flat.numel() // 65536)
        sample = flat[::stride]
        m = min(sample.numel(), 2 * n_keep // stride + 1)
        cand = indices_ge(flat, sample.topk(m, sorted=False).values.min(), mask)
    if cand.numel() < n_keep:                                        # rare: sample unrepresentative
        cand = torch.arange(flat.numel(), device=flat.device)
    vals = flat[cand]
    if cand.numel() == n_keep:
        return cand, vals
    pos = vals.topk(n_keep, sorted=False).indices
    keep = torch.zeros(cand.numel(), dtype=torch.bool, device=flat.device)
    keep[pos] = True
    return cand[keep], vals[keep]                                    # still ascending: CSR order


CUT_MARGIN = 0.05   # running threshold: next step's candidates are v >= (1 - margin) · this step's cut


@torch.no_grad()
def batchtopk_v(cc: CrossCoder, x: Tensor, autocast: bool = False) -> tuple[Tensor, Tensor]:
    """v(x_n, j) = f_j(x_n)·w_j before the ReLU (A.1) for normalised x (N, 2, d), and w = latent_weights().

    One GEMM with w folded into the encoder: x (W_enc·w) + b_enc·w = (x W_enc + b_enc)·w (eq. 1 times w,
    w ≥ 0), so no N×D pass for the ReLU or for ·w: the ReLU is applied to the selected entries only
    (`selected_acts`); the top N·k of v and of relu(v) hold the same values wherever they are positive.
    The output goes into an N×D `scratch` buffer, overwritten by the next call. bf16 autocast (GPU) keeps the
    dense pre-activation path.
    """
    w = cc.latent_weights()
    if autocast:
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            f = cc.pre_acts(x)
        return f.float().mul_(w), w                                      # v(x_i, j), A.1
    n, D = x.shape[0], cc.cfg.dict_size
    buf = scratch(cc, "_v_buffer", (n, D), x.dtype, x.device)
    W = cc.W_enc.reshape(-1, D) * w
    torch.addmm(cc.b_enc * w, x.reshape(n, -1), W, out=buf)              # eq. 1 (pre-ReLU) times w
    return buf, w


@torch.no_grad()
def batchtopk_select(cc: CrossCoder, v: Tensor, n_keep: int) -> Selection:
    """BATCHTOPK of eq. 6 over v (N, D), using and updating the running cut kept on `cc` (not persisted)."""
    mask = scratch(cc, "_mask_buffer", (v.numel(),), torch.bool, v.device)
    flat, vals = _batch_topk(v.reshape(-1), n_keep, cc.__dict__.get("_topk_cut"), mask)
    kth = float(vals.min())                                              # this step's n_keep-th value
    cc.__dict__["_topk_cut"] = kth * (1 - CUT_MARGIN) if kth > 0 else None
    sel = Selection.from_flat(flat, v.shape[0], v.shape[1])
    sel.src, sel.src_vals = v, vals
    return sel


class _SelectedActs(torch.autograd.Function):
    """Values f_j(x_n) at the selected entries, differentiable w.r.t. W_enc and b_enc (eq. 1).

    Forward reuses the dense f already computed for the selection; backward is a CSR product
    Gᵀ X over the selected entries (the ReLU's gradient is zero where f = 0), instead of the dense
    X ᵀ G over all N·D pre-activations.
    """

    @staticmethod
    def forward(ctx, values, x_flat, W_enc, b_enc, sel: Selection):
        ctx.sel = sel
        ctx.save_for_backward(values, x_flat)
        ctx.enc_shape = W_enc.shape
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        values, x_flat = ctx.saved_tensors
        sel: Selection = ctx.sel
        with serial(g, g.numel() * x_flat.shape[1]):
            g = g * (values > 0)                                        # ReLU'
            gW = sel.csr_t(g) @ x_flat                                  # (D, 2d) = Gᵀ X
            gW = gW.t().contiguous().reshape(ctx.enc_shape)             # a 2-D transpose: 2x faster than the
            #                                                             engine's copy of the strided 3-D view
            gb = torch.zeros(sel.dict_size, dtype=g.dtype, device=g.device).index_add_(0, sel.cols, g)
        return None, None, gW, gb, None


class _SparseDecode(torch.autograd.Function):
    """Σ_j f_j d_j^m over the selected entries only (eq. 7-8 without the bias), for both models.

    Forward: F_csr @ W_dec[m]. Backward: ∂f = Σ_m SDDMM(G_m, W_dec[m]) at the selected entries,
    ∂W_dec[m] = F_csrᵀ G_m. Cost O(#entries · d) instead of O(N · D · d). One product per model, each on
    W_dec[m] as stored and writing into the gradient's own slice: a single [d^base | d^chat] product
    needs W_dec permuted to (D, 2d), a copy of the whole decoder each way (measured on the H200 at the
    paper's shape: 0.65 ms per copy, as much as the product).
    """

    @staticmethod
    def forward(ctx, values, W_dec, sel: Selection):
        M, D, d = W_dec.shape
        ctx.sel = sel
        ctx.save_for_backward(values, W_dec)
        out = torch.empty(sel.n, M, d, dtype=W_dec.dtype, device=W_dec.device)
        with serial(values, values.numel() * M * d):
            F = sel.csr(values)
            for m in range(M):
                torch.mm(F, W_dec[m], out=out[:, m])
        return out

    @staticmethod
    def backward(ctx, g):
        values, W_dec = ctx.saved_tensors
        sel: Selection = ctx.sel
        gv = gW = None
        with serial(g, values.numel() * g[0].numel()):
            if ctx.needs_input_grad[0]:                                 # SDDMM: ∂f_nj = Σ_m g_n^m · d_j^m
                pattern = sel.csr(torch.zeros_like(values))
                gv = sum(torch.sparse.sampled_addmm(pattern, g[:, m].contiguous(), W_dec[m].t(), beta=0.0).values()
                         for m in range(W_dec.shape[0]))
            if ctx.needs_input_grad[1]:
                gW = torch.empty_like(W_dec)
                Ft = sel.csr_t(values)
                for m in range(W_dec.shape[0]):
                    torch.mm(Ft, g[:, m], out=gW[m])                    # (D, d) = Fᵀ G_m
        return gv, gW, None


class _ColumnActs(torch.autograd.Function):
    """Values f_j(x_n) on a few whole columns (N, C), differentiable w.r.t. W_enc and b_enc (eq. 1).

    For a selection that fills a large share of a few columns (the aux loss's dead latents): the backward is
    one dense (2d, N) × (N, C) product instead of a CSR product over every entry. Unselected entries hold 0.
    """

    @staticmethod
    def forward(ctx, values, x_flat, W_enc, b_enc, cols):
        ctx.save_for_backward(values, x_flat, cols)
        ctx.enc_shape = W_enc.shape
        return values.clone()

    @staticmethod
    def backward(ctx, g):
        values, x_flat, cols = ctx.saved_tensors
        g = g * (values > 0)                                            # ReLU' (and 0 off the selection)
        D = ctx.enc_shape[-1]
        gW = g.new_zeros(x_flat.shape[1], D).index_copy_(1, cols, x_flat.t() @ g)
        gb = g.new_zeros(D).index_copy_(0, cols, g.sum(0))
        return None, None, gW.reshape(ctx.enc_shape), gb, None


def acts_from_v(v: Tensor, w: Tensor) -> Tensor:
    """f = ReLU(v) / w from v = (pre-ReLU f)·w (A.1); 0 where w = 0 (a latent with a zero decoder)."""
    return torch.where(w > 0, v.clamp_min(0) / w, 0.0)                  # eq. 1 ReLU


def column_acts(cc: CrossCoder, x: Tensor, values: Tensor, cols: Tensor) -> Tensor:
    """`values` (N, C): f on latents `cols` (0 where unselected), with the dense encoder backward."""
    return _ColumnActs.apply(values, x.reshape(x.shape[0], -1), cc.W_enc, cc.b_enc, cols)


def selected_acts(cc: CrossCoder, x: Tensor, f: Tensor, sel: Selection, w: Tensor | None = None) -> Tensor:
    """f at the selected entries (E,), with the sparse encoder backward.

    With `w` (the latent weights), `f` holds v = f·w (A.1) and the values are recovered as v / w, so the
    trainer keeps a single (N, D) buffer. A latent with w = 0 has v = 0 and gets value 0 (its decoder is
    zero, so neither its reconstruction nor its gradient changes). v may be pre-ReLU (`batchtopk_v`): the
    ReLU of eq. 1 is applied here, to the selected entries only.
    """
    values = sel.gather(f)
    if w is not None:
        values = acts_from_v(values, w[sel.cols])
    return _SelectedActs.apply(values, x.reshape(x.shape[0], -1), cc.W_enc, cc.b_enc, sel)


def sparse_decode(cc: CrossCoder, values: Tensor, sel: Selection) -> Tensor:
    """Σ_j f_j d_j in normalised space (N, 2, d), no bias, touching only the selected latents."""
    return _SparseDecode.apply(values, cc.W_dec, sel)
