"""Training health: did this crosscoder train, or is it a silent failure?

Why: a crosscoder that learned almost nothing (μ far too high, lr too small, too few steps) still writes
a model, a metrics.json and every downstream table, and nothing said so (issue 17: val FVE 0.09 on a new
data set with the defaults). These checks are pure functions over the trainer's metrics dict, so they are
testable without training and reusable by the report. Each returns None (pass) or a one-line reason.

    fve         validation FVE (training window if there is no val cache) >= min_fve
    dead        share of latents that never fired on the validation cache <= max_dead
    l0          |L0 / target − 1| <= l0_tolerance, target = k (BatchTopK) or target_l0 (L1, when set)
    loss_trend  final training objective <= (1 − min_loss_drop) × the objective of the first steps
                (the objective at the final μ, so an L1 μ ramp does not hide a stuck run), and finite
    opposed     share of latents whose base and chat decoders point opposite ways <= max_opposed
                (`opposed_share`: mixtures that put Δnorm between the classes, so eq. 4 misclassifies them)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

DEFAULTS = {"min_fve": 0.5, "max_dead": 0.5, "l0_tolerance": 0.5, "min_loss_drop": 0.05, "max_opposed": 0.05,
            "strict": False}
OPPOSED_COS = -0.5   # decoder halves at more than 120° ...
OPPOSED_RATIO = 0.2  # ... with the smaller norm ≥ 0.2 × the larger, i.e. Δnorm in [0.1, 0.9] (eq. 4): no *-only class


class HealthError(RuntimeError):
    """A crosscoder failed its health checks and `health.strict` is true."""


def thresholds(cfg: Mapping | None) -> dict:
    """DEFAULTS overridden by a `health:` block; unknown keys are an error naming them."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown health keys: {sorted(unknown)}; expected {sorted(DEFAULTS)}")
    return {**DEFAULTS, **cfg}


def _split(m: Mapping, key: str):
    """(value, split) from val, falling back to the last training window; (None, None) when neither has it."""
    for split in ("val", "train"):
        v = (m.get(split) or {}).get(key)
        if v is not None:
            return float(v), split
    return None, None


def check_fve(m: Mapping, t: Mapping) -> str | None:
    fve, split = _split(m, "fve")
    if fve is None:
        return "fve: no FVE was measured"
    if not math.isfinite(fve) or fve < t["min_fve"]:
        return f"fve: {split} FVE {fve:.3f} < min_fve {t['min_fve']}"
    return None


def check_dead(m: Mapping, t: Mapping) -> str | None:
    dead, split = _split(m, "dead")
    if dead is not None and not dead <= t["max_dead"]:
        return f"dead: {dead:.1%} of latents dead on {split} > max_dead {t['max_dead']:.0%}"
    return None


def check_l0(m: Mapping, t: Mapping) -> str | None:
    target = m.get("target_l0")
    l0, split = _split(m, "l0")
    if target is None or l0 is None:
        return None
    if not math.isfinite(l0) or abs(l0 / target - 1) > t["l0_tolerance"]:
        return f"l0: {split} L0 {l0:.1f} is off its target {target:g} by more than ±{t['l0_tolerance']:.0%}"
    return None


def check_loss_trend(m: Mapping, t: Mapping) -> str | None:
    trend = m.get("loss_trend") or {}
    early, final = trend.get("early"), trend.get("final")
    if early is None or final is None:
        return None
    if not (math.isfinite(early) and math.isfinite(final)):
        return f"loss_trend: non-finite loss (first steps {early}, final {final})"
    if final > (1 - t["min_loss_drop"]) * early:
        return (f"loss_trend: final loss {final:.4g} is not {t['min_loss_drop']:.0%} below the first steps' "
                f"{early:.4g} (nothing was learned: lr too small, or too few steps)")
    return None


def opposed_share(W_dec) -> float:
    """Share of latents whose base and chat decoders (2, D, d) point opposite ways, neither half negligible.

    Why: a monosemantic latent's halves are aligned (a shared concept) or one is ~0 (a *-only concept). On a
    synthetic set with true L0 ≈ 5, BatchTopK at k = 20 learns chat-only features as latents whose base half
    is −0.38× the chat half, cancelling what the latents the spare k lets co-fire write into base: Δnorm ≈ 0.81
    instead of ≈ 1, and eq. 4 calls not one of them chat-only, silently (issue 17; 28% of latents opposed
    there, ≤ 1% on the toy and Gemma pairs). Computed on W_dec as stored, the space Δnorm is taken in.
    """
    import torch

    w = torch.as_tensor(W_dec).detach().double()
    nb, nc = w.norm(dim=-1)
    cos = (w[0] * w[1]).sum(-1) / (nb * nc).clamp_min(1e-30)
    ratio = torch.minimum(nb, nc) / torch.maximum(nb, nc).clamp_min(1e-30)
    return float(((cos < OPPOSED_COS) & (ratio >= OPPOSED_RATIO)).double().mean())


def check_opposed(m: Mapping, t: Mapping) -> str | None:
    share = m.get("opposed_decoders")
    if share is not None and not share <= t["max_opposed"]:
        return (f"opposed: {share:.1%} of latents decode opposite directions in base and chat > max_opposed "
                f"{t['max_opposed']:.0%}; such mixtures put Δnorm between the classes, so *-only latents go "
                "unclassified (seen with a BatchTopK k far above the data's L0, and with more features than "
                "the dictionary separates: try a lower k, a larger expansion, or the sweep)")
    return None


CHECKS: tuple[Callable[[Mapping, Mapping], str | None], ...] = (check_fve, check_dead, check_l0, check_loss_trend,
                                                                check_opposed)


def assess(metrics: Mapping, cfg: Mapping | None = None) -> dict:
    """{"health": "pass" | "fail", "health_reasons": [...]} for a trainer metrics dict."""
    t = thresholds(cfg)
    reasons = [r for check in CHECKS if (r := check(metrics, t)) is not None]
    return {"health": "fail" if reasons else "pass", "health_reasons": reasons}


def banner(name: str, reasons: list[str]) -> str:
    """A multi-line warning that stands out in a Snakemake log."""
    bar = "!" * 78
    lines = [bar, f"!! CROSSCODER HEALTH CHECK FAILED: {name}", "!!"]
    lines += [f"!!   - {r}" for r in reasons]
    lines += ["!!", "!! Its latents and every result built on them are suspect. Thresholds: the crosscoder's",
              "!! `health:` params; `strict: true` makes this an error.", bar]
    return "\n" + "\n".join(lines)


def report(name: str, result: Mapping, cfg: Mapping | None = None) -> None:
    """Log the banner for a failed run; raise HealthError when `strict`."""
    if result["health"] == "pass":
        return
    log.warning(banner(name, result["health_reasons"]))
    if thresholds(cfg)["strict"]:
        raise HealthError(f"crosscoder {name} failed its health checks (health.strict is true):\n  "
                          + "\n  ".join(result["health_reasons"]))
