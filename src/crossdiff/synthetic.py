"""Ground truth for the diffing method: synthetic base/chat activations built from known sparse features.

Why: on real models nobody knows which latents *should* be chat-only. Here every activation is a sparse
sum of planted feature directions, so after training a crosscoder with the normal trainer and running the
normal analysis we can ask, with known answers, whether Δnorm (eq. 4) finds the true chat-only features and
whether Latent Scaling (eq. 5, A.6) flags the two L1 artefacts of §2.3, planted as bait:

    shared      same direction, same activation in both models
    chat_only   present in chat only;  base_only: present in base only
    shrinkage   same direction, base activation = shrinkage_ratio × chat activation (Complete Shrinkage, §2.3)
    decoupled   same direction, same activation, but active in base only on a random share
                (decoupled_share) of the tokens where it is active in chat (Latent Decoupling, A.4)

h^m(x) = Σ_i a_i^m(x) d_i + σ·n^m(x), with unit directions d_i, independent Gaussian noise per model, and
a_i^chat(x) = z_i(x)·u_i(x): z_i ~ Bernoulli(feature_rate), u_i ~ Uniform[0.5, 1.5] (bounded away from 0 so
a firing feature always stands above the noise). Everything is a pure function of (seed, split, chunk),
so the ground-truth coefficients are regenerated on demand instead of stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from crossdiff import __version__
from crossdiff.io import atomic_path
from crossdiff.report.figures import truth_delta_norm_by_kind, truth_nu_scatter

log = logging.getLogger(__name__)

KINDS = ("shared", "chat_only", "base_only", "shrinkage", "decoupled")
SPLITS = {"train": 0, "val": 1}
CHUNK = 4096          # rows generated (and written) at a time; also the HDF5 chunk size
SEQ_LEN = 128         # synthetic tokens are grouped into pseudo-sequences so `seq`/`pos` look like a real cache
MAG_LOW, MAG_HIGH = 0.5, 1.5


@dataclass(frozen=True)
class SyntheticSpec:
    d_model: int
    n_tokens: int
    n_features: Mapping[str, int]
    feature_rate: float
    shrinkage_ratio: float
    decoupled_share: float
    noise: float
    seed: int = 0

    @classmethod
    def from_params(cls, p: Mapping) -> SyntheticSpec:
        """From the `validate:` params slice (extra keys such as `epochs` are ignored here)."""
        unknown = set(p["n_features"]) - set(KINDS)
        if unknown:
            raise ValueError(f"validate.n_features: unknown kinds {sorted(unknown)}; expected {KINDS}")
        return cls(d_model=int(p["d_model"]), n_tokens=int(p["n_tokens"]),
                   n_features={k: int(p["n_features"].get(k, 0)) for k in KINDS},
                   feature_rate=float(p["feature_rate"]), shrinkage_ratio=float(p["shrinkage_ratio"]),
                   decoupled_share=float(p["decoupled_share"]), noise=float(p["noise"]), seed=int(p.get("seed", 0)))

    def __post_init__(self):
        if self.d_model < 1 or self.n_tokens < 1:
            raise ValueError(f"d_model and n_tokens must be positive, got {self.d_model}, {self.n_tokens}")
        if sum(self.n_features.values()) < 1:
            raise ValueError("validate.n_features: at least one feature is needed")
        for name in ("feature_rate", "shrinkage_ratio", "decoupled_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"validate.{name} must lie in [0, 1], got {getattr(self, name)}")


@dataclass
class GroundTruth:
    """The planted features: unit directions (F, d) and their kind (F,) as indices into KINDS."""

    directions: np.ndarray
    kind: np.ndarray
    spec: SyntheticSpec

    @property
    def n(self) -> int:
        return len(self.kind)

    def kind_names(self) -> np.ndarray:
        return np.asarray(KINDS)[self.kind]

    def model_scale(self) -> np.ndarray:
        """(2, F): factor on a feature's chat activation in (base, chat); decoupling is a mask, not a scale."""
        k = self.kind
        base = np.ones(self.n, np.float32)
        chat = np.ones(self.n, np.float32)
        base[k == KINDS.index("chat_only")] = 0.0
        chat[k == KINDS.index("base_only")] = 0.0
        base[k == KINDS.index("shrinkage")] = self.spec.shrinkage_ratio
        return np.stack([base, chat])


def make_features(spec: SyntheticSpec) -> GroundTruth:
    """Random unit directions (isotropic Gaussian, normalised); in d ≥ 32 they are nearly orthogonal."""
    rng = np.random.default_rng([spec.seed, 7919])
    kind = np.concatenate([np.full(spec.n_features[k], i) for i, k in enumerate(KINDS)]).astype(np.int64)
    d = rng.standard_normal((len(kind), spec.d_model))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return GroundTruth(d.astype(np.float32), kind, spec)


def coefficients(gt: GroundTruth, split: str, chunk: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Ground-truth feature activations (a_base, a_chat), each (n, F) float32, for rows of one chunk."""
    spec = gt.spec
    rng = np.random.default_rng([spec.seed, SPLITS[split], chunk])
    active = rng.random((n, gt.n)) < spec.feature_rate
    a_chat = np.where(active, rng.uniform(MAG_LOW, MAG_HIGH, (n, gt.n)), 0.0).astype(np.float32)
    scale = gt.model_scale()
    a_base = a_chat * scale[0]
    a_chat = a_chat * scale[1]
    dec = gt.kind == KINDS.index("decoupled")
    keep = rng.random((n, int(dec.sum()))) < spec.decoupled_share     # base fires on a subset of chat's tokens
    a_base[:, dec] *= keep
    return a_base, a_chat


def iter_split(gt: GroundTruth, split: str, n_tokens: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield (row offset, a_base, a_chat, h (n, 2, d) float32) chunk by chunk, deterministically."""
    spec = gt.spec
    for chunk, start in enumerate(range(0, n_tokens, CHUNK)):
        n = min(CHUNK, n_tokens - start)
        a_base, a_chat = coefficients(gt, split, chunk, n)
        rng = np.random.default_rng([spec.seed, SPLITS[split], chunk, 1])
        noise = spec.noise * rng.standard_normal((n, 2, spec.d_model), dtype=np.float32)
        h = np.stack([a_base @ gt.directions, a_chat @ gt.directions], axis=1) + noise
        yield start, a_base, a_chat, h.astype(np.float32)


def write_synthetic_cache(path: str | Path, gt: GroundTruth, split: str, n_tokens: int) -> Path:
    """Write one split in the public activation-cache format (DESIGN §3), atomically.

    Token ids are 0 and no position is a template token: the synthetic rows carry no text. `norm_base`,
    `norm_chat` (mean L2 norms) are stored like the real writer does, for the trainer's normalisation.
    """
    path = Path(path)
    d = gt.spec.d_model
    sums = np.zeros(2)
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as f:
        chunks = (min(CHUNK, n_tokens), d)
        base = f.create_dataset("base", (n_tokens, d), np.float16, chunks=chunks)
        chat = f.create_dataset("chat", (n_tokens, d), np.float16, chunks=chunks)
        rows = np.arange(n_tokens)
        f.create_dataset("tokens", data=np.zeros(n_tokens, np.int32))
        f.create_dataset("seq", data=(rows // SEQ_LEN).astype(np.int32))
        f.create_dataset("pos", data=(rows % SEQ_LEN + 1).astype(np.int32))   # BOS (pos 0) is never cached
        f.create_dataset("template", data=np.zeros(n_tokens, bool))
        f.create_dataset("source", data=np.ones(n_tokens, np.uint8))
        for start, _, _, h in iter_split(gt, split, n_tokens):
            base[start:start + len(h)] = h[:, 0]
            chat[start:start + len(h)] = h[:, 1]
            sums += np.linalg.norm(h.astype(np.float16).astype(np.float32), axis=-1).sum(0)
        f.attrs.update(base_model="synthetic:base", chat_model="synthetic:chat", layer=0, d_model=d,
                       tokenizer="", created_by=f"crossdiff {__version__} synthetic", split=split,
                       norm_base=float(sums[0] / n_tokens), norm_chat=float(sums[1] / n_tokens))
    return path


# -- matching and scores -------------------------------------------------------------------------------


def match_latents(dec_base: np.ndarray, dec_chat: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each learned latent's best true feature by the cosine of d_j^base + d_j^chat with the feature direction.

    The sum points along the concept whichever model(s) the latent decodes into (a true feature has one
    direction in every model it lives in). Returns (feature index (D,), cosine (D,)); a latent whose
    decoders are both zero gets index -1, cosine 0. Cosine is signed: a latent decoding −d is no match.
    """
    v = np.asarray(dec_base, np.float64) + np.asarray(dec_chat, np.float64)
    norm = np.linalg.norm(v, axis=1)
    cos = (v / np.where(norm > 0, norm, 1.0)[:, None]) @ np.asarray(directions, np.float64).T
    idx = cos.argmax(1)
    best = cos[np.arange(len(v)), idx]
    idx[norm == 0] = -1
    best[norm == 0] = 0.0
    return idx, best


def auroc(pos, neg) -> float:
    """P(s_pos > s_neg) + ½ P(s_pos = s_neg), the Mann–Whitney statistic; NaN scores dropped, NaN if a side is empty."""
    pos = np.asarray(pos, np.float64)
    neg = np.sort(np.asarray(neg, np.float64)[~np.isnan(neg)])
    pos = pos[~np.isnan(pos)]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    less = np.searchsorted(neg, pos, "left")
    leq = np.searchsorted(neg, pos, "right")
    return float((less + leq).sum() / (2 * len(pos) * len(neg)))


def auroc_null_sd(n_pos: int, n_neg: int) -> float:
    """Standard deviation of the AUROC of uninformative scores (Mann–Whitney U under H0, no ties)."""
    return float(np.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg)))


# -- ground truth of a trained crosscoder ----------------------------------------------------------------


def latent_truth(crosscoder, gt: GroundTruth, split: str, n_tokens: int, progress: bool = True) -> dict[str, np.ndarray]:
    """Match every latent to a true feature, and measure on regenerated data where its matched feature lives.

    `base_share[j]` = Σ_x f_j(x)·1[feature present in base at x] / Σ_x f_j(x): the share of latent j's
    activation mass on tokens where its concept is also in the base model. For a genuinely chat-specific
    latent it is 0; for a Latent-Decoupling artefact (A.4: a chat-only latent that also fires on the shared
    subset) it is ≈ decoupled_share; for Complete Shrinkage it is ≈ 1. It is the ground truth ν^r and ν^ε
    try to estimate without knowing the features.
    """
    import torch
    from tqdm import tqdm

    dec = crosscoder.decoder_raw().detach().cpu().numpy()
    idx, cos = match_latents(dec[0], dec[1], gt.directions)
    mass = np.zeros(len(idx))
    on_base = np.zeros(len(idx))
    param = next(crosscoder.parameters())
    safe = np.where(idx >= 0, idx, 0)
    with torch.no_grad():
        for _, a_base, _, h in tqdm(iter_split(gt, split, n_tokens), desc="ground truth", leave=False,
                                    total=-(-n_tokens // CHUNK), disable=not progress):
            f = crosscoder.encode(torch.from_numpy(h).to(param.device, param.dtype)).float().cpu().numpy()
            present = (a_base[:, safe] > 0) & (idx >= 0)
            mass += f.sum(0)
            on_base += (f * present).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        base_share = np.where(mass > 0, on_base / mass, np.nan)
    return {"feature": idx, "cos": cos, "base_share": base_share}


def matched_kinds(feature: np.ndarray, cos: np.ndarray, gt: GroundTruth, match_cos: float) -> np.ndarray:
    """Kind name of each latent's matched feature, or "unmatched" when its best cosine is below `match_cos`."""
    kind = np.full(len(feature), "unmatched", dtype=object)
    ok = (cos >= match_cos) & (feature >= 0)
    kind[ok] = np.asarray(KINDS)[gt.kind[feature[ok]]]
    return kind.astype(str)


def _median(x) -> float:
    x = np.asarray(x, np.float64)
    x = x[np.isfinite(x)]
    return float(np.median(x)) if len(x) else float("nan")


def _auroc_entry(pos, neg) -> dict:
    pos = np.asarray(pos, np.float64)
    neg = np.asarray(neg, np.float64)
    n_pos, n_neg = int(np.isfinite(pos).sum()), int(np.isfinite(neg).sum())
    return {"auroc": auroc(pos, neg), "n_pos": n_pos, "n_neg": n_neg,
            "null_sd": auroc_null_sd(n_pos, n_neg) if n_pos and n_neg else float("nan")}


def variant_metrics(table, truth: Mapping[str, np.ndarray], gt: GroundTruth, match_cos: float,
                    nu_thresholds=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)) -> dict:
    """Scores of one crosscoder against the planted features (see module docstring for the kinds).

    `table` is the normal latent table (DESIGN §3) of that crosscoder; `truth` comes from `latent_truth`.
    A latent *matches* feature i when i is its best feature and the cosine is ≥ `match_cos`. Among the Δnorm
    chat-only latents, "spurious bait" = those matching shrinkage features plus the decoupling artefacts
    (matching a decoupled feature and putting > s/2 of their activation where it is present in base);
    `composition` counts matches per kind, with the artefacts also counted under "decoupled".
    """
    t = table.sort("latent")
    if t["latent"].to_list() != list(range(len(truth["feature"]))):
        raise ValueError("latent table rows do not cover latents 0..D-1 of the crosscoder")
    klass = t["klass"].to_numpy().astype(str)
    alive = ~t["dead"].to_numpy().astype(bool)
    nu_eps, nu_r = t["nu_eps"].to_numpy().astype(float), t["nu_r"].to_numpy().astype(float)
    ratio = t["norm_base"].to_numpy() / np.maximum(t["norm_chat"].to_numpy(), 1e-12)
    feat = truth["feature"]
    kind = matched_kinds(feat, truth["cos"], gt, match_cos)
    matched = kind != "unmatched"
    chat_set = alive & (klass == "chat_only")
    # A decoupled feature's chat-only latent is an artefact (A.4) only if it also fires where the feature is in
    # base; the ideal split's chat-only part fires on the exclusive tokens alone. Cut midway: s/2.
    artefact = (kind == "decoupled") & (truth["base_share"] > gt.spec.decoupled_share / 2)

    def of(k, where=chat_set):
        return where & (artefact if k == "decoupling_artefact" else kind == k)

    true_chat = np.flatnonzero(gt.kind == KINDS.index("chat_only"))
    found_by_set = np.isin(true_chat, feat[of("chat_only")])
    composition = {k: int(of(k).sum()) for k in KINDS + ("unmatched", "decoupling_artefact")}
    spurious = composition["shrinkage"] + composition["decoupling_artefact"]
    n_set = int(chat_set.sum())
    robust = []
    for pi in nu_thresholds:                                   # Fig. 8: ν^ε < π and ν^r < π
        r = chat_set & (nu_eps < pi) & (nu_r < pi)
        robust.append({"pi": float(pi), "n": int(r.sum()), "true_chat_only": int((r & (kind == "chat_only")).sum()),
                       "bait": int((r & ((kind == "shrinkage") | artefact)).sum()),
                       "recall": float(np.isin(true_chat, feat[r & (kind == "chat_only")]).mean())
                       if len(true_chat) else float("nan")})
    return {
        "n_latents": int(len(kind)), "n_alive": int(alive.sum()),
        "classes": {c: int((alive & (klass == c)).sum()) for c in ("base_only", "shared", "chat_only", "other")},
        "features_recovered": {k: float(np.isin(np.flatnonzero(gt.kind == i), feat[alive & matched]).mean())
                               if (gt.kind == i).any() else float("nan") for i, k in enumerate(KINDS)},
        "chat_only_set": {
            "n": n_set, "composition": composition,
            "recall": float(found_by_set.mean()) if len(true_chat) else float("nan"),
            "precision": composition["chat_only"] / n_set if n_set else float("nan"),
            "spurious_bait": spurious, "spurious_bait_share": spurious / n_set if n_set else float("nan"),
        },
        "auroc_nu_eps_shrinkage_vs_chat_only": _auroc_entry(nu_eps[of("shrinkage")], nu_eps[of("chat_only")]),
        "auroc_nu_r_decoupled_vs_chat_only": _auroc_entry(nu_r[of("decoupled")], nu_r[of("chat_only")]),
        "auroc_nu_r_decoupling_artefact_vs_chat_only": _auroc_entry(nu_r[of("decoupling_artefact")], nu_r[of("chat_only")]),
        "medians": {k: {"nu_eps": _median(nu_eps[of(k)]), "nu_r": _median(nu_r[of(k)]),
                        "norm_ratio_base_chat": _median(ratio[of(k)]), "base_share": _median(truth["base_share"][of(k)]),
                        "n": int(of(k).sum())} for k in ("chat_only", "shrinkage", "decoupled", "decoupling_artefact")},
        "robust_by_threshold": robust,
    }


# -- the whole check ---------------------------------------------------------------------------------------


def expected(spec: SyntheticSpec, norm_base: float, norm_chat: float) -> dict:
    """What Δnorm (eq. 4) and Latent Scaling (eq. 5, A.6) should report for a latent that learned a feature
    faithfully, in the crosscoder's normalised space (DESIGN §4).

    Normalisation multiplies base by √d/E‖h^b‖ and chat by √d/E‖h^c‖, so a feature with base/chat activation
    ratio q has normalised decoder norms in ratio κq, κ = E‖h^c‖/E‖h^b‖, and β^base/β^chat = κq for both
    targets. Shared: ν = κ. Shrinkage bait: ν^ε = κρ whether or not the base decoder shrank to 0 (the base
    error, or the latent's own base decoder, holds ρ·a·d); ν^r = κρ if it did not shrink, 0 if it did.
    Decoupled bait: a chat-only latent firing on all the feature's chat tokens while other latents rebuild
    the base side on the shared share s has ν^r ≈ κs, ν^ε ≈ 0 (A.4); the ideal split's chat-only part (firing
    on the exclusive tokens only) is genuinely chat-specific: ν ≈ 0, like a true chat-only feature.
    """
    from crossdiff.latents import delta_norm

    kappa = norm_chat / norm_base
    rho, share = spec.shrinkage_ratio, spec.decoupled_share
    return {"kappa": kappa,
            "nu": {"shared": {"nu_eps": kappa, "nu_r": kappa}, "chat_only": {"nu_eps": 0.0, "nu_r": 0.0},
                   "shrinkage": {"nu_eps": kappa * rho, "nu_r": [0.0, kappa * rho]},
                   "decoupling_artefact": {"nu_eps": 0.0, "nu_r": kappa * share}},
            "delta_norm": {"shared": float(delta_norm(kappa, 1.0)),                      # eq. 4, ‖d_b‖/‖d_c‖ = κ
                           "shrinkage": float(delta_norm(kappa * rho, 1.0)), "chat_only": 1.0, "base_only": 0.0}}


def variant_params(entry: Mapping, vp: Mapping) -> dict:
    """A `crosscoders:` entry at the synthetic scale: `validate.epochs`, and `validate.train` values for the
    keys the entry has (so `k` only reaches BatchTopK and `mu` only L1; everything else is the entry's).

    A key the entry sets to `auto` stays `auto`: the user asked for calibration (`mu: auto` toward its
    `target_l0`, `lr: auto`), and a fixed value tuned to this set would validate something else."""
    over = {k: v for k, v in vp.get("train", {}).items() if k in entry and entry[k] != "auto"}
    return {**entry, **over, "epochs": vp["epochs"]}


# The trainer's metrics copied into each variant's block: the health verdict (crossdiff.health) with its
# reasons, and the μ / lr a run actually used (mu: auto, lr: auto).
TRAINING_KEYS = ("val", "steps", "dict_size", "kind", "k", "k_requested", "mu", "lr", "target_l0", "target_fve",
                 "opposed_decoders", "health", "health_reasons")


def run_validation(params: Mapping, out: str | Path, work: str | Path, device: str = "auto",
                   variants: list[str] | None = None, progress: bool = True) -> dict:
    """Generate the synthetic pair, train every crosscoder variant with the normal trainer, run the normal
    analysis, score against the planted features; writes {out}/metrics.json and {out}/figures/*.png.

    `params`: the slice {validate, crosscoders, analysis}; each variant uses its `crosscoders:` entry with
    `validate.epochs`. `work` keeps the caches, checkpoints and latent tables (inspectable afterwards).
    """
    from crossdiff.cli import resolve_device
    from crossdiff.crosscoder import CrossCoder
    from crossdiff.io import write_json
    from crossdiff.latents import analyse
    from crossdiff.train import train

    vp = params["validate"]
    spec = SyntheticSpec.from_params(vp)
    gt = make_features(spec)
    out, work = Path(out), Path(work)
    n_val = max(spec.n_tokens // 5, 1)
    paths = {s: write_synthetic_cache(work / f"{s}.h5", gt, s, n) for s, n in (("train", spec.n_tokens), ("val", n_val))}
    runs, result = {}, {}
    for name in variants or list(params["crosscoders"]):
        cc_params = variant_params(params["crosscoders"][name], vp)
        training = train(paths["train"], paths["val"], work / name, cc_params, seed=spec.seed,
                         checkpoints=work / "checkpoints" / name, device=device, progress=progress)
        table = analyse(work / name, paths["train"], paths["val"], params["analysis"], device=resolve_device(device),
                        progress=progress)
        cc = CrossCoder.load(work / name)
        truth = latent_truth(cc, gt, "val", n_val, progress)
        kind = matched_kinds(truth["feature"], truth["cos"], gt, vp["match_cos"])
        result[name] = {"training": {k: training.get(k) for k in TRAINING_KEYS},
                        **variant_metrics(table, truth, gt, vp["match_cos"], params["analysis"]["nu_thresholds"])}
        runs[name] = (table, kind)
    metrics = {"spec": {**vars(spec), "n_features": dict(spec.n_features), "n_val_tokens": n_val},
               "match_cos": vp["match_cos"], "expected": expected(spec, *_norms(paths["train"])),
               "health": {name: r["training"]["health"] for name, r in result.items()}, "variants": result}
    truth_nu_scatter(out / "figures" / "nu_scatter.png", runs)
    truth_delta_norm_by_kind(out / "figures" / "delta_norm_by_kind.png", runs, params["analysis"]["classes"])
    write_json(out / "metrics.json", metrics)
    return metrics


def _norms(path: Path) -> tuple[float, float]:
    with h5py.File(path, "r") as f:
        return float(f.attrs["norm_base"]), float(f.attrs["norm_chat"])
