"""`lr: auto` and `mu: auto`: hyperparameters that follow the dictionary and the data instead of one pair.

Why: μ = 0.15 gives L0 ≈ 25 on the toy pair at d = 128 and learns almost nothing on a new d = 64 set
(issue 17); the right μ depends on d, the activation statistics and the number of true features, none of
which a user knows in advance. L0 is what a user can state ("about as many active latents as k"), so
`mu: auto` takes a `target_l0` and finds μ itself. Or it takes a `target_fve`: the same controller on
1 / (1 − FVE), which also falls as μ rises. A target FVE carries across data sets where no single L0
does: an L1 crosscoder needs several times the true number of active features to reconstruct well
(shrinkage), and that number is unknown on new data (bench/validate_defaults.py).

Method: a controller during training, not a search. μ is kept in log space and, after each step of the
first `mu_calibrate` fraction of the run (default: all of it), moved by

    log μ ← log μ + gain · clamp(log L̂0 − log target_l0, −1, 1),   L̂0 = L0 predicted `lead` steps ahead

(an integral controller on the log-ratio: L0 too high raises μ, too low lowers it). L0 follows μ only
after the encoder has adapted (~hundreds of steps), so a controller on the current L0 overshoots: it keeps
raising μ while L0 is still falling and lands at half the target (measured). The prediction extrapolates
the trend of log L0 (two EMAs of the per-batch L0, 20 and 100 steps) `lead` = 200 steps ahead, which
brakes the ramp before L0 arrives. The clamp bounds the change to ±0.3% per step, so the start (μ = 0.01,
far below any useful μ) ramps μ up like the usual μ warm-up instead of jumping into the regime where an
L1 crosscoder collapses (FVE ≈ 0.05 with a 1%-per-step ramp, measured). With `mu_calibrate` < 1, μ is
frozen for the rest of the run. Chosen over a bracketing search of short runs because it costs no extra
steps, and short runs overstate a full run's L0 (at fixed μ, L0 keeps falling as the encoder sharpens);
the controller measures L0 on the very run being trained, on device (no host sync per step). The μ the
run ended with is recorded in metrics.json and config.json.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

MU_INIT = 0.01      # start below any useful μ: the controller ramps it up (like the μ warm-up)
FAST, SLOW = 20.0, 100.0   # EMA time constants (steps) of log L0, for its level and trend
LEAD = 200.0        # steps of lag between a change of μ and L0 following it (the encoder must adapt)
MU_GAIN = 0.003     # max change of log μ per step (0.3%); ~1500 steps to move μ 100×


def auto_lr(dict_size: int) -> float:
    """2e-4 / √(D / 2^14): the scaling law of the authors' trainer (dictionary_learning's crosscoder
    trainer) and of sparsify's default lr; gives ≈ 1e-4 at the paper's D = 73,728 (A.12)."""
    return 2e-4 / math.sqrt(dict_size / 2 ** 14)


def controlled_target(target_l0: float | None, target_fve: float | None) -> float:
    """What `mu: auto` steers toward, as a quantity that falls as μ rises: L0, or 1 / FVU = 1 / (1 − FVE)."""
    return float(target_l0) if target_l0 else 1.0 / (1.0 - target_fve)


@torch.no_grad()
def controlled_signal(target_l0: float | None, r: dict, x: Tensor) -> Tensor:
    """This batch's value of `controlled_target`'s quantity from the loss dict r (on device: no host sync)."""
    if target_l0:
        return r["l0"]
    fvu = r["eps"].pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)   # 1 − FVE of this batch
    return 1.0 / fvu.clamp_min(1e-6)


class MuController:
    """log μ on device, adapted toward a target during the first `until` steps, then fixed (see module doc).

    `target` is in units of the signal `update` receives, a quantity that falls as μ rises: L0 or 1 / FVU."""

    def __init__(self, target: float, until: int, device, init: float = MU_INIT, gain: float = MU_GAIN,
                 lead: float = LEAD):
        if not target > 0:
            raise ValueError(f"the target of mu: auto must be positive, got {target}")
        self.log_target, self.until, self.gain, self.lead = math.log(target), until, gain, lead
        # [log μ, fast EMA of log L0, slow EMA of log L0, steps seen]: one tensor, so a checkpoint holds it whole
        self.state = torch.tensor([math.log(init), 0.0, 0.0, 0.0], dtype=torch.float64, device=device)

    def mu(self) -> Tensor:
        return self.state[0].exp().float()

    @torch.no_grad()
    def update(self, step: int, signal: Tensor) -> None:
        """After `step`: move log μ by gain·clamp(predicted log L0 − log target, ±1) while step < until."""
        if step >= self.until:
            return
        s = self.state
        x = signal.double().clamp_min(0.1).log()
        first = s[3] == 0
        for i, tau in ((1, FAST), (2, SLOW)):
            s[i] = torch.where(first, x, s[i] + (x - s[i]) / tau)
        slope = (s[1] - s[2]) / (SLOW - FAST)          # per step: an EMA of a linear trend lags it by τ steps
        pred = s[1] + (FAST + self.lead) * slope       # log L0 `lead` steps ahead at the current trend
        s[0] += self.gain * (pred - self.log_target).clamp(-1.0, 1.0)
        s[3] += 1
