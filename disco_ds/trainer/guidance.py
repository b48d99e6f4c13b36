"""Norm guidance: where the output layer's norm is heading, against the optimal norm.

"Optimal Scaling Needs Optimal Norm" finds that at the optimal (η, B) the output layer's
‖W_out‖_RMS→∞ ends at the same value whatever the horizon (2^(7.0±0.2) ≈ 128) and grows roughly
as a power of the step count on the way. So a run can be judged before it ends: fit the recent
log–log growth of the norm, project it to the run's last step and compare with the target. A
projection well above the target says the learning rate is likely too high, well below too low.

With unconstrained Scion every update of the output layer has RMS→∞ norm exactly η_t·ρ, so by
the triangle inequality the norm can grow by at most that much per step: a schedule whose summed
output-layer learning rate cannot lift the norm from its init to the target is flagged at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Projection", "NormGuide", "reachable_norm"]

# The paper's optimum is 2^(7.0 ± 0.2); a projection within a factor 2^0.5 of the target is "on track".
ON_TRACK_LOG2 = 0.5


def reachable_norm(initial_norm: float, output_lrs: Sequence[float], radius: float = 1.0) -> float:
    """The largest ‖W_out‖_RMS→∞ a run can reach: init plus the sum of its updates' norms (η_t·ρ)."""
    return initial_norm + radius * float(sum(output_lrs))


@dataclass(frozen=True)
class Projection:
    """The output norm projected to the run's last step from its recent log–log growth."""

    step: int
    norm: float
    final_step: int
    final_norm: float
    target: float
    verdict: str
    """``high`` (lr likely too high), ``low`` (lr likely too low) or ``on track``."""

    def message(self, final_tokens: float) -> str:
        advice = {"high": "lr likely too high", "low": "lr likely too low", "on track": "on track"}[self.verdict]
        return (f"‖W_out‖_RMS→∞ {self.norm:.3g} at step {self.step}: heading for ≈ {self.final_norm:.3g} at "
                f"{final_tokens:,.0f} tokens (target {self.target:g}): {advice}")


class NormGuide:
    """Collects (step, ‖W_out‖) as a run logs them and projects the norm to ``final_step``.

    Args:
        target: the optimal output norm (the paper's 128 across horizons).
        final_step: the run's last optimizer step.
        window: the fraction of the steps so far that the power-law fit uses (the norm's growth
            is piecewise linear in log–log, so only the recent piece predicts the next).
        min_points: observations needed before projecting.
    """

    def __init__(self, target: float, final_step: int, window: float = 0.5, min_points: int = 5):
        self.target, self.final_step, self.window, self.min_points = float(target), int(final_step), window, min_points
        self._steps: list[int] = []
        self._norms: list[float] = []

    def observe(self, step: int, norm: float) -> None:
        if norm > 0 and math.isfinite(norm) and step > 0:
            self._steps.append(int(step))
            self._norms.append(float(norm))

    def project(self, remaining_lr_sum: float | None = None) -> Projection | None:
        """The projection from the observations so far, or None while there are too few.

        ``remaining_lr_sum`` (the output layer's learning rates summed over the steps still to
        come) caps the projection at what the updates can reach."""
        if len(self._steps) < self.min_points:
            return None
        steps, norms = np.asarray(self._steps, dtype=float), np.asarray(self._norms)
        recent = steps >= steps[-1] * (1 - self.window)
        if recent.sum() < self.min_points:
            recent = np.zeros_like(recent)
            recent[-self.min_points:] = True
        x, y = np.log(steps[recent]), np.log(norms[recent])
        if np.ptp(x) == 0:
            return None
        slope, intercept = np.polyfit(x, y, 1)
        final = math.exp(intercept + slope * math.log(self.final_step))
        if remaining_lr_sum is not None:
            final = min(final, norms[-1] + remaining_lr_sum)
        final = max(final, 0.0)
        gap = math.log2(final / self.target) if final > 0 else -math.inf
        verdict = "high" if gap > ON_TRACK_LOG2 else "low" if gap < -ON_TRACK_LOG2 else "on track"
        return Projection(int(steps[-1]), float(norms[-1]), self.final_step, final, self.target, verdict)
