"""Batching knobs and the adaptive batch-size limit (Clipper's AIMD on measured batch latency).

:class:`AdaptiveBatchLimit` is pure: it is told each batch's size and duration and says the next
limit, so tests drive it without an event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["BATCHING_BOUNDS", "AdaptiveBatchLimit", "BatchingConfig", "check_fields"]


@dataclass
class BatchingConfig:
    """Batching knobs, changeable while serving."""

    max_batch_size: int = 64
    max_delay_ms: float = 2.0
    adaptive: bool = False
    target_batch_ms: float = 25.0     # adaptive: the batch latency AIMD aims under
    slo_ms: float = 100.0             # default deadline of a request, and the objective triage protects
    max_queue: int = 4096             # queued rows (all stages) before rejecting

    def validate(self) -> None:
        """Raise ``ValueError`` on a setting of the wrong type or out of bounds (see :data:`BATCHING_BOUNDS`)."""
        check_fields(self, BATCHING_BOUNDS)


# Every knob's type and closed range: a settings change outside them is refused, so one request
# cannot make later ones fail, stall the engine or pin the batch size (NaN, inf, booleans included).
BATCHING_BOUNDS: dict[str, tuple[type, float, float]] = {
    "max_batch_size": (int, 1, 4096), "max_delay_ms": (float, 0.0, 1000.0), "adaptive": (bool, 0, 1),
    "target_batch_ms": (float, 0.1, 60_000.0), "slo_ms": (float, 1.0, 3_600_000.0),
    "max_queue": (int, 1, 1_000_000),
}


def check_fields(obj: Any, bounds: dict[str, tuple[type, float, float]]) -> None:
    """Check each field of ``obj`` named in ``bounds`` is of its type and within its range.

    ``bool`` is its own type (never a number here); an ``int`` is a valid ``float``; floats must be finite.
    """
    for name, (kind, lo, hi) in bounds.items():
        v = getattr(obj, name)
        if kind is bool:
            ok = isinstance(v, bool)
        elif kind is int:
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        else:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and lo <= v <= hi
        if not ok:
            noun = "an integer" if kind is int else "a number"
            what = "true or false" if kind is bool else f"{noun} in [{lo:g}, {hi:g}]"
            raise ValueError(f"setting {name!r} must be {what}, got {v!r}")


class AdaptiveBatchLimit:
    """The row limit of one stage's batches.

    Fixed at ``max_batch_size``, or in ``adaptive`` mode additive-increase/multiplicative-decrease on the
    measured batch latency: one more row while a full batch takes less than ``target_batch_ms``, 10%
    fewer when a batch takes more.
    """

    def __init__(self, config: BatchingConfig) -> None:
        self.config = config
        self.limit = config.max_batch_size

    def configure(self, config: BatchingConfig) -> None:
        """New knobs: an adaptive limit keeps what it learned, capped by the new maximum."""
        self.config = config
        self.limit = min(self.limit, config.max_batch_size) if config.adaptive else config.max_batch_size

    def after_batch(self, rows: int, seconds: float) -> int:
        """Account for a batch of ``rows`` that took ``seconds``; returns the next limit."""
        c = self.config
        if not c.adaptive:
            self.limit = c.max_batch_size
        elif seconds * 1e3 > c.target_batch_ms:
            self.limit = max(1, int(self.limit * 0.9))
        elif rows >= self.limit:
            self.limit = min(c.max_batch_size, self.limit + 1)
        return self.limit
