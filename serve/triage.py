"""Triage: which level a model answers at, by hand (``on``) or from the load it sees (``auto``).

:class:`TriageController` is pure: it is told each batch's duration, each arrival, the time, and the
load (the oldest queued row's wait and the backlog), and says the level. Auto mode acts on predicted
deadline misses, not on waiting alone, and tells a queue that is merely unlucky from one that cannot
keep up: at 80% of capacity Poisson arrivals queue for tens of milliseconds now and then, and a
level change for that only costs accuracy (it cost 5-25% of inputs per 20 s in the runs before this
rule), while under a burst the arrivals outrun the level's measured pace and waiting only makes it worse.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

from serve.batching import check_fields

__all__ = ["TRIAGE_BOUNDS", "TRIAGE_MODES", "LevelPace", "TriageConfig", "TriageController"]

TRIAGE_MODES = ("off", "on", "auto")


@dataclass
class TriageConfig:
    """Triage knobs: ``mode`` off | on | auto; ``level`` used by ``on``.

    Auto predicts, after every batch, when the queued work would finish at the current level: the
    oldest queued row's wait, or the backlog worked off at the level's measured pace, whichever is
    later, plus one batch. It also measures the arrival rate over ``rate_window_s``; a level *keeps up*
    while that rate times the level's pace (seconds of device time per second) is under
    ``utilization``. It raises the level (at most once per ``step_s``) when the prediction passes the
    objective itself, or passes ``enter_fraction`` of it while the level does not keep up. It lowers
    the level when ``hold_s`` has passed since the last change, the next costlier level keeps up, and
    that level's prediction is under ``exit_fraction`` of the objective.
    """

    mode: str = "off"
    level: int = 1
    enter_fraction: float = 0.8
    exit_fraction: float = 0.5
    hold_s: float = 0.5
    step_s: float = 0.0               # auto: at least this long between two raises (0: at every batch)
    utilization: float = 1.0          # auto: a level keeps up while arrivals x its pace stay under this
    rate_window_s: float = 2.0        # auto: the arrival rate is measured over this window

    def validate(self) -> None:
        """Raise ``ValueError`` on a setting of the wrong type or out of bounds (see :data:`TRIAGE_BOUNDS`)."""
        if self.mode not in TRIAGE_MODES:
            raise ValueError(f"triage mode must be off, on or auto, got {self.mode!r}")
        check_fields(self, TRIAGE_BOUNDS)
        if self.exit_fraction > self.enter_fraction:
            raise ValueError("exit_fraction must not exceed enter_fraction (no hysteresis otherwise)")


TRIAGE_BOUNDS: dict[str, tuple[type, float, float]] = {
    "level": (int, 0, 64), "enter_fraction": (float, 0.0, 10.0), "exit_fraction": (float, 0.0, 10.0),
    "hold_s": (float, 0.0, 3600.0), "step_s": (float, 0.0, 3600.0), "utilization": (float, 0.01, 10.0),
    "rate_window_s": (float, 0.01, 60.0),
}


@dataclass
class LevelPace:
    """The measured service pace at one level: ms per input (over every stage) and ms per first-stage batch."""

    row_ms: float | None = None
    batch_ms: float | None = None
    _seconds: float = 0.0
    _rows: int = 0

    def record(self, stage: int, rows: int, seconds: float, alpha: float = 0.2, window: int = 16) -> None:
        self._seconds += seconds
        if stage == 0:
            self._rows += rows
            ms = seconds * 1e3
            self.batch_ms = ms if self.batch_ms is None else (1 - alpha) * self.batch_ms + alpha * ms
        if self._rows >= window:  # every stage's time, per input that entered the model
            per_row = self._seconds * 1e3 / self._rows
            self.row_ms = per_row if self.row_ms is None else (1 - alpha) * self.row_ms + alpha * per_row
            self._seconds, self._rows = 0.0, 0


class TriageController:
    """The triage level of one model with ``num_levels`` levels (0 = as calibrated, higher = cheaper).

    Pure: it is told each batch (:meth:`record_batch`) and the load (:meth:`observe`) with the time,
    and says the level, so tests drive it without an event loop.

    Args:
        config: the knobs.
        num_levels: how many levels the model publishes.
        slo_ms: the latency objective the auto mode protects.
        now: the time of creation (the first entry of :attr:`changes`).
        level_costs: each level's priced cost (GFLOPs per input), to estimate the pace of a level not yet
            measured from one that was; None: unknown levels are taken to run at a measured level's pace.
    """

    def __init__(self, config: TriageConfig, num_levels: int, slo_ms: float, now: float = 0.0,
                 level_costs: list[float | None] | None = None) -> None:
        self.config, self.num_levels, self.slo_ms = config, max(1, num_levels), slo_ms
        self.level = self.fixed_level()
        self.costs = list(level_costs) if level_costs else [None] * self.num_levels
        self.pace = [LevelPace() for _ in range(self.num_levels)]
        self._arrivals: collections.deque[tuple[float, int]] = collections.deque()
        self._arrived = 0  # rows in _arrivals
        # (time, level, reason) of each change; bounded, as servers run for days.
        self.changes: collections.deque[tuple[float, int, str]] = collections.deque(
            [(now, self.level, f"start ({config.mode})")], maxlen=1000)

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
            self._set(self.fixed_level(), now, f"set by hand ({config.mode})")

    def record_batch(self, level: int, stage: int, rows: int, seconds: float) -> None:
        """A batch of ``rows`` at ``stage`` ran at ``level`` in ``seconds``."""
        if 0 <= level < self.num_levels and rows > 0:
            self.pace[level].record(stage, rows, seconds)

    def arrive(self, now: float, rows: int) -> None:
        """``rows`` inputs arrived at ``now`` (only auto mode keeps them)."""
        if self.config.mode == "auto":
            self._arrivals.append((now, rows))
            self._arrived += rows
            self._forget(now)

    def _forget(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] < now - self.config.rate_window_s:
            self._arrived -= self._arrivals.popleft()[1]

    def arrival_rate(self, now: float) -> float:
        """Inputs per second over the last ``rate_window_s``."""
        self._forget(now)
        return self._arrived / self.config.rate_window_s

    def utilization(self, level: int, now: float) -> float | None:
        """Seconds of device time per second that the recent arrivals need at ``level`` (None: pace unknown)."""
        pace = self._pace(level)
        return None if pace is None else self.arrival_rate(now) * pace[0] / 1e3

    def predicted_ms(self, level: int, wait_ms: float, backlog: int) -> float | None:
        """When the queued work would be done at ``level``: the oldest row's wait or the backlog at the
        level's pace, whichever is later, plus one batch; None before any pace is measured."""
        pace = self._pace(level)
        if pace is None:
            return None
        row_ms, batch_ms = pace
        return max(wait_ms, backlog * row_ms) + batch_ms

    def _pace(self, level: int) -> tuple[float, float] | None:
        p = self.pace[level]
        if p.row_ms is not None and p.batch_ms is not None:
            return p.row_ms, p.batch_ms
        known = [k for k, q in enumerate(self.pace) if q.row_ms is not None and q.batch_ms is not None]
        if not known:
            return None
        k = min(known, key=lambda j: abs(j - level))
        scale = 1.0
        if self.costs[level] and self.costs[k]:
            scale = self.costs[level] / self.costs[k]
        return self.pace[k].row_ms * scale, self.pace[k].batch_ms * scale

    def observe(self, now: float, wait_ms: float, backlog: int = 0) -> int:
        """Auto mode: take the load (the oldest queued row's wait or the front end's lag, in ms, and the
        queued rows) and return the level."""
        if self.config.mode != "auto":
            return self.level
        c, slo = self.config, self.slo_ms
        here = self.predicted_ms(self.level, wait_ms, backlog)
        here = wait_ms if here is None else here  # nothing measured yet: the wait alone
        load = self.utilization(self.level, now)
        behind = load is None or load >= c.utilization
        if here > slo or (here > c.enter_fraction * slo and behind):
            last_change = self.changes[-1][0] if self.changes else -math.inf
            if self.level < self.top and now - last_change >= c.step_s:
                why = (f"predicted {here:.0f} ms > {slo:g} ms" if here > slo else
                       f"predicted {here:.0f} ms > {c.enter_fraction:g} x {slo:g} ms and level {self.level} does "
                       f"not keep up ({_share(load)} of its pace)")
                self._set(self.level + 1, now, f"{why} (wait {wait_ms:.0f} ms, {backlog} queued)")
            return self.level
        if self.level == 0 or now - self.changes[-1][0] < c.hold_s:
            return self.level
        above = self.predicted_ms(self.level - 1, wait_ms, backlog)
        above = wait_ms if above is None else above
        load_above = self.utilization(self.level - 1, now)
        if above < c.exit_fraction * slo and (load_above is None or load_above < c.utilization):
            self._set(self.level - 1, now, f"level {self.level - 1} keeps up ({_share(load_above)} of its pace) and "
                                           f"is predicted {above:.0f} ms < {c.exit_fraction:g} x {slo:g} ms")
        return self.level

    def _set(self, level: int, now: float, reason: str) -> None:
        if level != self.level:
            self.changes.append((now, level, reason))
        self.level = level

    def history(self, now: float, last: int = 100) -> list[dict[str, float | int | str]]:
        """The last changes, as seconds ago, level and why."""
        return [{"s_ago": round(now - t, 3), "level": lv, "reason": why} for t, lv, why in list(self.changes)[-last:]]


def _share(load: float | None) -> str:
    return "unmeasured" if load is None else f"{load:.2f}"
