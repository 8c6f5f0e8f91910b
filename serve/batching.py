"""Batching knobs and the adaptive batch-size limit (Clipper's AIMD on measured batch latency).

:class:`AdaptiveBatchLimit` is pure: it is told each batch's size and duration and says the next
limit, so tests drive it without an event loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AdaptiveBatchLimit", "BatchingConfig"]


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
        """Raise ``ValueError`` on a setting the engine cannot use."""
        numbers = (self.max_delay_ms, self.target_batch_ms, self.slo_ms)
        if self.max_batch_size < 1 or self.max_queue < 1 or self.max_delay_ms < 0 or self.slo_ms <= 0 \
                or not all(math.isfinite(v) for v in numbers):
            raise ValueError("max_batch_size and max_queue must be >= 1, max_delay_ms >= 0 and slo_ms > 0 "
                             "(finite numbers)")


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
