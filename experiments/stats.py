"""Confidence intervals for the figures a calibrated model is verified with (accuracy, mean cost)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist

import torch

__all__ = ["PairedDifference", "mean_interval", "paired_difference", "wilson_interval", "z_value"]


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


@dataclass(frozen=True)
class PairedDifference:
    """Two models' accuracy on the same inputs: the difference and how far the inputs alone move it."""

    n: int
    acc_a: float
    acc_b: float
    diff: float               # acc_a - acc_b
    only_a: int               # inputs right in a only
    only_b: int               # inputs right in b only
    std_error: float          # of the difference, from the discordant inputs (McNemar's)
    interval: tuple[float, float]

    def chance_beyond(self, tolerance: float) -> float:
        """How often models of equal accuracy, disagreeing as these do, differ by more than ``tolerance``
        on a test set of this size (normal approximation): the share of apparent disagreement the test
        split alone would produce."""
        if self.std_error == 0:
            return 0.0
        return math.erfc(tolerance / (self.std_error * math.sqrt(2)))

    def to_dict(self) -> dict:
        return asdict(self)


def paired_difference(correct_a: torch.Tensor, correct_b: torch.Tensor, level: float = 0.95) -> PairedDifference:
    """Accuracy difference of two models scored on the same inputs (0/1 per input, same order), with its
    paired standard error: only the inputs the two disagree on move it, so the error is far smaller than
    two independent accuracies' would suggest, and it is what "two runs agree within x points" is
    measured against."""
    a, b = correct_a.bool().flatten(), correct_b.bool().flatten()
    if a.numel() != b.numel() or a.numel() == 0:
        raise ValueError(f"paired_difference needs two equal, non-empty sets of per-input results, got "
                         f"{a.numel()} and {b.numel()}")
    n = a.numel()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    diff = (only_a - only_b) / n
    var = max(0.0, (only_a + only_b) / n ** 2 - (only_a - only_b) ** 2 / n ** 3)
    se = math.sqrt(var)
    z = z_value(level)
    return PairedDifference(n, float(a.double().mean()), float(b.double().mean()), diff, only_a, only_b, se,
                            (diff - z * se, diff + z * se))
