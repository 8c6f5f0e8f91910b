"""Triage: which level a model answers at, by hand (``on``) or from the load it sees (``auto``).

:class:`TriageController` is pure: it is told the time and how long the most urgent work has waited,
and says the level. It keeps no clock of its own, so tests drive it without an event loop.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from serve.batching import check_fields

__all__ = ["TRIAGE_BOUNDS", "TRIAGE_MODES", "TriageConfig", "TriageController"]

TRIAGE_MODES = ("off", "on", "auto")


@dataclass
class TriageConfig:
    """Triage knobs: ``mode`` off | on | auto; ``level`` used by ``on``; auto thresholds on the oldest
    queued row's wait as a fraction of the objective, one level up at most every ``step_s``, one level
    down after ``hold_s`` of calm."""

    mode: str = "off"
    level: int = 1
    enter_wait_fraction: float = 0.3
    exit_wait_fraction: float = 0.1
    hold_s: float = 1.0
    step_s: float = 0.0               # auto: at least this long between two raises (0: at every batch)

    def validate(self) -> None:
        """Raise ``ValueError`` on a setting of the wrong type or out of bounds (see :data:`TRIAGE_BOUNDS`)."""
        if self.mode not in TRIAGE_MODES:
            raise ValueError(f"triage mode must be off, on or auto, got {self.mode!r}")
        check_fields(self, TRIAGE_BOUNDS)
        if self.exit_wait_fraction > self.enter_wait_fraction:
            raise ValueError("exit_wait_fraction must not exceed enter_wait_fraction (no hysteresis otherwise)")


TRIAGE_BOUNDS: dict[str, tuple[type, float, float]] = {
    "level": (int, 0, 64), "enter_wait_fraction": (float, 0.0, 10.0), "exit_wait_fraction": (float, 0.0, 10.0),
    "hold_s": (float, 0.0, 3600.0), "step_s": (float, 0.0, 3600.0),
}


class TriageController:
    """The triage level of one model with ``num_levels`` levels (0 = as calibrated, higher = cheaper).

    Args:
        config: the knobs.
        num_levels: how many levels the model publishes.
        slo_ms: the latency objective the auto mode protects.
        now: the time of creation (the first entry of :attr:`changes`).
    """

    def __init__(self, config: TriageConfig, num_levels: int, slo_ms: float, now: float = 0.0) -> None:
        self.config, self.num_levels, self.slo_ms = config, max(1, num_levels), slo_ms
        self.level = self.fixed_level()
        self._calm_since: float | None = None
        # (time, level) of each change; bounded, as servers run for days.
        self.changes: collections.deque[tuple[float, int]] = collections.deque([(now, self.level)], maxlen=1000)

    @property
    def top(self) -> int:
        return self.num_levels - 1

    def fixed_level(self) -> int:
        """The level of the ``off`` and ``on`` modes (auto starts from it)."""
        return max(0, min(self.config.level, self.top)) if self.config.mode == "on" else 0

    def configure(self, config: TriageConfig, slo_ms: float, now: float) -> None:
        """New knobs; leaving auto (or changing the fixed level) takes effect at once."""
        self.config, self.slo_ms = config, slo_ms
        if config.mode != "auto":
            self._set(self.fixed_level(), now)

    def observe(self, now: float, wait_ms: float) -> int:
        """Auto mode: take the current wait (queue wait or front-end lag, in ms) and return the level."""
        if self.config.mode != "auto":
            return self.level
        c = self.config
        if wait_ms > c.enter_wait_fraction * self.slo_ms:
            self._calm_since = None
            last_change = self.changes[-1][0] if self.changes else -math.inf
            if self.level < self.top and now - last_change >= c.step_s:
                self._set(self.level + 1, now)
        elif wait_ms < c.exit_wait_fraction * self.slo_ms:
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= c.hold_s and self.level > 0:
                self._set(self.level - 1, now)
                self._calm_since = now
        else:
            self._calm_since = None
        return self.level

    def _set(self, level: int, now: float) -> None:
        if level != self.level:
            self.changes.append((now, level))
        self.level = level

    def history(self, now: float, last: int = 100) -> list[dict[str, float | int]]:
        """The last changes, as seconds ago and level."""
        return [{"s_ago": round(now - t, 3), "level": lv} for t, lv in list(self.changes)[-last:]]
