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
from dataclasses import dataclass, field

from serve.batching import check_fields

__all__ = ["TRIAGE_BOUNDS", "TRIAGE_MODES", "LevelPace", "StagePace", "TriageConfig", "TriageController"]

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
    the level when the next costlier level keeps up and that level's prediction is under
    ``exit_fraction`` of the objective: at once when the last raise came while the level kept up (a
    transient backlog, such as a stall, that is gone once worked off), and otherwise only when ``hold_s``
    has passed since the last change (the load itself was too much, and the rate window lags it). A
    raise within ``hold_s`` of a lowering shows the lowering came too early (the start of a burst,
    before the rate window sees it): the hold then doubles at each such raise, up to ``max_hold_s``,
    and falls back once a raise comes after a calm spell; and for as long as that hold lasts the level
    is taken not to keep up, so the early trigger (``enter_fraction``) fires again: the fitted pace had
    just been shown too optimistic. Two more guards on lowering: a lowering waits ``lower_step_s``
    after the last one (one step per look, not a chain from the top level to 0 within a few batches),
    and "keeps up" for a lowering is judged on the higher of the arrival rates over ``rate_window_s``
    and over the short ``burst_window_s``, which sees a burst's onset within a fraction of a second.
    """

    mode: str = "off"
    level: int = 1
    enter_fraction: float = 0.8
    exit_fraction: float = 0.5
    hold_s: float = 0.5
    max_hold_s: float = 4.0           # auto: the longest hold after lowerings that were undone at once
    step_s: float = 0.0               # auto: at least this long between two raises (0: at every batch)
    utilization: float = 1.0          # auto: a level keeps up while arrivals x its pace stay under this
    rate_window_s: float = 2.0        # auto: the arrival rate is measured over this window
    burst_window_s: float = 0.5       # auto: and over this one, for lowerings only (a burst's onset)
    lower_step_s: float = 0.25        # auto: at least this long between two lowerings

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
    "rate_window_s": (float, 0.01, 60.0), "max_hold_s": (float, 0.0, 3600.0),
    "burst_window_s": (float, 0.01, 60.0), "lower_step_s": (float, 0.0, 3600.0),
}


@dataclass
class StagePace:
    """One stage's batch time as ``fixed_ms + row_ms * rows``, fitted by least squares with exponential
    forgetting. The per-row cost of a full batch is what a backlog is worked off at; the average batch
    at moderate load is smaller, and its per-row cost overstated the backlog's time by up to 2x."""

    weight: float = 0.0
    rows: float = 0.0     # the forgetting sums: n, t, n^2, n t
    ms: float = 0.0
    rows_sq: float = 0.0
    rows_ms: float = 0.0

    def record(self, rows: int, ms: float, alpha: float) -> None:
        k = 1.0 - alpha
        self.weight, self.rows, self.ms = k * self.weight + 1, k * self.rows + rows, k * self.ms + ms
        self.rows_sq, self.rows_ms = k * self.rows_sq + rows * rows, k * self.rows_ms + rows * ms

    def fit(self) -> tuple[float, float]:
        """``(fixed_ms, row_ms)``; with too little spread in batch sizes, all of the time is per row."""
        n, t = self.rows / self.weight, self.ms / self.weight
        var = self.rows_sq / self.weight - n * n
        if var > 0.25 * n * n / 16:  # batch sizes spread enough (coefficient of variation > 1/8)
            row_ms = (self.rows_ms / self.weight - n * t) / var
            fixed_ms = t - row_ms * n
            if row_ms >= 0 and fixed_ms >= 0:
                return fixed_ms, row_ms
        return 0.0, t / max(n, 1e-9)


@dataclass
class LevelPace:
    """The measured service pace at one level: each stage's batch time fit, the rows each stage sees
    per input entering stage 0 (a cascade defers some), and the recent first-stage batch time."""

    stages: list[StagePace] = field(default_factory=list)
    seen: list[float] = field(default_factory=list)  # rows per stage, forgotten on one clock (stage 0's batches)
    batch_ms: float | None = None
    first_rows: int = 0   # inputs seen at stage 0
    first_batches: int = 0
    alpha: float = 0.05
    # A level's own pace counts from min_batches stage-0 batches and min_rows inputs on: one batch slowed
    # by a VM stall once stood for a level for 9 s and kept auto triage off it (gRPC, 80% of peak).
    min_rows: int = 16
    min_batches: int = 4

    def record(self, stage: int, rows: int, seconds: float) -> None:
        while len(self.stages) <= stage:
            self.stages.append(StagePace())
            self.seen.append(0.0)
        ms = seconds * 1e3
        self.stages[stage].record(rows, ms, self.alpha)
        if stage == 0:
            self.seen = [(1 - self.alpha) * v for v in self.seen]
        self.seen[stage] += rows
        if stage == 0:
            self.first_rows += rows
            self.first_batches += 1
            self.batch_ms = ms if self.batch_ms is None else (1 - 4 * self.alpha) * self.batch_ms + 4 * self.alpha * ms

    @property
    def measured(self) -> bool:
        return self.first_rows >= self.min_rows and self.first_batches >= self.min_batches

    def _per_stage(self):
        """``(rows per input entering, fixed_ms, row_ms)`` of each stage that has run."""
        for st, rows in zip(self.stages, self.seen):
            if st.weight > 0:
                yield rows / self.seen[0], *st.fit()

    def backlog_ms(self, rows: int, batch_limit: int) -> float:
        """The time to work off ``rows`` queued inputs in batches of at most ``batch_limit``."""
        total = 0.0
        for share, fixed_ms, row_ms in self._per_stage():
            n = rows * share
            total += math.ceil(n / batch_limit) * fixed_ms + n * row_ms if n > 0 else 0.0
        return total

    def capacity_ms(self, batch_limit: int) -> float:
        """Device time per input when batches are full: what a rising queue is worked off at."""
        return sum(share * (row_ms + fixed_ms / batch_limit) for share, fixed_ms, row_ms in self._per_stage())


class TriageController:
    """The triage level of one model with ``num_levels`` levels (0 = as calibrated, higher = cheaper).

    Pure: it is told each batch (:meth:`record_batch`) and the load (:meth:`observe`) with the time,
    and says the level, so tests drive it without an event loop.

    Args:
        config: the knobs.
        num_levels: how many levels the model publishes.
        slo_ms: the latency objective the auto mode protects.
        now: the time of creation (the first entry of :attr:`changes`).
        level_costs: each level's priced cost (G operations per input, float and int8), to estimate the pace of a level not yet
            measured from one that was; None: unknown levels are taken to run at a measured level's pace.
        batch_limit: the most rows a batch takes (the engine passes its current limit to :meth:`observe`).
    """

    def __init__(self, config: TriageConfig, num_levels: int, slo_ms: float, now: float = 0.0,
                 level_costs: list[float | None] | None = None, batch_limit: int = 64) -> None:
        self.config, self.num_levels, self.slo_ms = config, max(1, num_levels), slo_ms
        self.batch_limit = batch_limit
        self.level = self.fixed_level()
        self.costs = list(level_costs) if level_costs else [None] * self.num_levels
        self.pace = [LevelPace() for _ in range(self.num_levels)]
        self._arrivals: collections.deque[tuple[float, int]] = collections.deque()
        self._arrived = 0  # rows in _arrivals
        # How long a lowering waits after a change: hold_s after a raise for load the level could not
        # carry, nothing after one for a transient backlog (holding it degraded 3-4x more inputs than
        # the backlog held, at 80% of peak).
        self._hold_s = 0.0
        self._lowered_at = -math.inf
        # Until then the level is taken not to keep up: a raise undid a lowering, so the fitted pace
        # (full batches, without the front end's share of the CPU) was shown too optimistic.
        self._distrust_until = -math.inf
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
        keep = max(self.config.rate_window_s, self.config.burst_window_s)
        while self._arrivals and self._arrivals[0][0] < now - keep:
            self._arrived -= self._arrivals.popleft()[1]

    def arrival_rate(self, now: float, window_s: float | None = None) -> float:
        """Inputs per second over the last ``window_s`` (default ``rate_window_s``)."""
        self._forget(now)
        window = self.config.rate_window_s if window_s is None else window_s
        if window >= max(self.config.rate_window_s, self.config.burst_window_s):
            return self._arrived / window
        rows = 0
        for t, n in reversed(self._arrivals):  # newest first; the short window holds few entries
            if t < now - window:
                break
            rows += n
        return rows / window

    def utilization(self, level: int, now: float, window_s: float | None = None) -> float | None:
        """Seconds of device time per second that the arrivals over ``window_s`` (default
        ``rate_window_s``) need at ``level`` in full batches (None: pace unknown)."""
        rate = self.arrival_rate(now, window_s)
        return min((rate * pace.capacity_ms(self.batch_limit) * scale / 1e3 for pace, scale in self._paces(level)),
                   default=None)

    def predicted_ms(self, level: int, wait_ms: float, backlog: int) -> float | None:
        """When the queued work would be done at ``level``: the oldest row's wait or the backlog worked
        off in full batches at the level's pace, whichever is later, plus one batch (the one running);
        None before any pace is measured."""
        return min((max(wait_ms, pace.backlog_ms(backlog, self.batch_limit) * scale) + pace.batch_ms * scale
                    for pace, scale in self._paces(level)), default=None)

    def _paces(self, level: int) -> list[tuple[LevelPace, float]]:
        """The paces ``level`` may run at, each with the factor its times are scaled by; the estimate is
        the fastest. The level's own measured pace (else the nearest measured level's, scaled by priced
        cost), and, as a cap, each measured costlier level's: levels are ordered by cost, so a cheaper
        one is never slower. A level's pace is not refreshed while it is unused, and without the cap a
        stale slow measurement blocked every lowering to it."""
        known = [k for k, q in enumerate(self.pace) if q.measured]
        if not known:
            return []
        if level in known:
            own = (self.pace[level], 1.0)
        else:
            k = min(known, key=lambda j: abs(j - level))
            scale = self.costs[level] / self.costs[k] if self.costs[level] and self.costs[k] else 1.0
            own = (self.pace[k], scale)
        return [own] + [(self.pace[k], 1.0) for k in known if k < level]

    def observe(self, now: float, wait_ms: float, backlog: int = 0, batch_limit: int | None = None) -> int:
        """Auto mode: take the load (the oldest queued row's wait or the front end's lag, in ms, the
        queued rows, and the batch limit now) and return the level."""
        if batch_limit is not None:
            self.batch_limit = max(1, batch_limit)
        if self.config.mode != "auto":
            return self.level
        c, slo = self.config, self.slo_ms
        here = self.predicted_ms(self.level, wait_ms, backlog)
        here = wait_ms if here is None else here  # nothing measured yet: the wait alone
        load = self.utilization(self.level, now)
        distrusted = now < self._distrust_until
        behind = load is None or load >= c.utilization or distrusted
        if here > slo or (here > c.enter_fraction * slo and behind):
            last_change = self.changes[-1][0] if self.changes else -math.inf
            if self.level < self.top and now - last_change >= c.step_s:
                why = (f"predicted {here:.0f} ms > {slo:g} ms" if here > slo else
                       f"predicted {here:.0f} ms > {c.enter_fraction:g} x {slo:g} ms and level {self.level} does "
                       f"not keep up ({_share(load)} of its pace" + (", distrusted after an undone lowering)"
                                                                     if distrusted else ")"))
                self._hold_s = self._hold_after_raise(now, behind)
                self._set(self.level + 1, now, f"{why} (wait {wait_ms:.0f} ms, {backlog} queued)")
            return self.level
        if (self.level == 0 or now - self.changes[-1][0] < self._hold_s
                or now - self._lowered_at < c.lower_step_s):
            return self.level
        above = self.predicted_ms(self.level - 1, wait_ms, backlog)
        above = wait_ms if above is None else above
        loads = [self.utilization(self.level - 1, now, w) for w in (c.rate_window_s, c.burst_window_s)]
        load_above = None if None in loads else max(loads)
        if above < c.exit_fraction * slo and (load_above is None or load_above < c.utilization):
            self._lowered_at = now
            self._set(self.level - 1, now, f"level {self.level - 1} keeps up ({_share(load_above)} of its pace) and "
                                           f"is predicted {above:.0f} ms < {c.exit_fraction:g} x {slo:g} ms")
        return self.level

    def _hold_after_raise(self, now: float, behind: bool) -> float:
        """How long the next lowering waits: doubled if this raise undoes a lowering within ``hold_s``,
        ``hold_s`` if the level did not keep up, nothing for a transient backlog."""
        c = self.config
        if now - self._lowered_at < c.hold_s:
            hold = min(max(c.hold_s, 2 * self._hold_s), max(c.hold_s, c.max_hold_s))
            self._distrust_until = now + hold
            return hold
        return c.hold_s if behind else 0.0

    def _set(self, level: int, now: float, reason: str) -> None:
        if level != self.level:
            self.changes.append((now, level, reason))
        self.level = level

    def history(self, now: float, last: int = 100) -> list[dict[str, float | int | str]]:
        """The last changes, as seconds ago, level and why."""
        return [{"s_ago": round(now - t, 3), "level": lv, "reason": why} for t, lv, why in list(self.changes)[-last:]]


def _share(load: float | None) -> str:
    return "unmeasured" if load is None else f"{load:.2f}"
