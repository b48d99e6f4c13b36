"""Warmup–stable–decay (WSD) learning-rate schedule (SPEC 3), as a factor on each group's peak lr."""

from __future__ import annotations

import math

__all__ = ["wsd_factor"]


def wsd_factor(step: int, total_steps: int, warmup: float, decay: float, shape: str = "linear", min_ratio: float = 0.0) -> float:
    """The lr multiplier for optimizer step ``step`` (0-based) of ``total_steps``.

    Linear warmup over the first ``warmup`` fraction of steps (from 1/n_warmup, never 0), constant
    1, then decay over the last ``decay`` fraction to ``min_ratio`` with shape ``linear``
    (1 − x), ``sqrt`` (1 − √x) or ``cosine`` (½(1 + cos πx)), x going from 1/(n_decay + 1) to
    n_decay/(n_decay + 1): the endpoint x = 1 is a virtual step after the last, so no step is spent
    at exactly ``min_ratio``·lr.
    """
    n_warmup = round(warmup * total_steps)
    n_decay = round(decay * total_steps)
    if step < n_warmup:
        return (step + 1) / n_warmup
    decay_start = total_steps - n_decay
    if step < decay_start:
        return 1.0
    x = min(1.0, (step - decay_start + 1) / (n_decay + 1))
    if shape == "linear":
        f = 1.0 - x
    elif shape == "sqrt":
        f = 1.0 - math.sqrt(x)
    elif shape == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * x))
    else:
        raise ValueError(f"unknown decay shape {shape!r}; accepted values: ['linear', 'sqrt', 'cosine']")
    return min_ratio + (1.0 - min_ratio) * f
