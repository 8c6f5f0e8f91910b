"""Confidence intervals for the figures a calibrated model is verified with (accuracy, mean cost)."""

from __future__ import annotations

import math
from statistics import NormalDist

import torch

__all__ = ["mean_interval", "wilson_interval", "z_value"]


def z_value(level: float = 0.95) -> float:
    """The two-sided standard-normal quantile for a confidence ``level`` (1.96 for 0.95)."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion (right near 0 and 1, where the normal one is not)."""
    if n <= 0:
        return (0.0, 1.0)
    z = z_value(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends, not rounding noise
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return (lo, hi)


def mean_interval(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """Normal-approximation interval for the mean of ``values`` (also for paired differences)."""
    v = values.double().flatten()
    n = v.numel()
    if n == 0:
        return (math.nan, math.nan)
    m = float(v.mean())
    if n == 1:
        return (m, m)
    half = z_value(level) * float(v.std(unbiased=True)) / math.sqrt(n)
    return (m - half, m + half)
