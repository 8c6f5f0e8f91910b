"""Learning a cascade's IDK thresholds: least expected cost subject to an accuracy floor.

A cascade of ``K`` stages has ``K - 1`` thresholds; stage ``k`` answers a sample that reaches it when
its confidence is ``>= t_k`` and defers it otherwise (``t = -inf``: never defers; ``+inf``: always).
Stage ``k`` costs ``c_k`` per sample that reaches it, so for one sample exiting at stage ``e`` the cost
is ``c_0 + ... + c_e`` and ``E[cost] = sum_k c_k * P(reach k)``.

The search works offline on a calibration split (validation, never test): each stage's confidence and
correctness for every sample, computed once with every stage run on every sample.

- Two stages: **exact**. Sort the samples by confidence; deferring the ``j`` least confident ones is
  every distinct policy there is. Accuracy for each ``j`` comes from prefix sums and cost grows with
  ``j``, so the least feasible ``j`` is the optimum: ``O(n log n)``.
- Three stages: exact over every first threshold (or ``max_candidates`` of them, spread by quantile),
  each with the exact two-stage search on the samples it defers.
- More stages, and as a refinement of the above: coordinate descent, each step the exact one-threshold
  search with the other thresholds fixed (cost never rises once feasible).

:class:`OperatingPoint` reports thresholds, accuracy, expected cost and per-stage reach/exit rates.

A gated network (SkipNet) has one execute threshold for all its gates; :func:`gate_threshold_for_budget`
chooses it on calibration data for a cost budget (:class:`GateOperatingPoint`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np

P = TypeVar("P")

__all__ = ["GateOperatingPoint", "OperatingPoint", "ThresholdSearch", "accuracy_floor", "exit_stages",
           "gate_threshold_for_budget", "pareto_front"]


@dataclass(frozen=True)
class OperatingPoint:
    """One setting of a cascade's thresholds and what it gives on the data it was evaluated on."""

    thresholds: tuple[float, ...]
    accuracy: float
    expected_cost: float
    reach: tuple[float, ...]      # P(a sample reaches stage k)
    exit: tuple[float, ...]       # P(a sample exits at stage k)
    feasible: bool                # accuracy >= min_accuracy
    min_accuracy: float

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = [_finite_or_str(t) for t in self.thresholds]
        return d


def _finite_or_str(t: float) -> float | str:
    return t if math.isfinite(t) else ("inf" if t > 0 else "-inf")


def accuracy_floor(reference_accuracy: float, epsilon: float, relative: bool = False) -> float:
    """The accuracy a cascade must keep: ``reference - epsilon`` (absolute, as fractions: 0.005 is half a
    point) or ``(1 - epsilon) * reference`` (relative, the IDK paper's form)."""
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    return reference_accuracy * (1.0 - epsilon) if relative else reference_accuracy - epsilon


def exit_stages(confidences: Sequence[np.ndarray], thresholds: Sequence[float], n: int | None = None) -> np.ndarray:
    """The stage each sample exits at: the first ``k`` with ``confidence_k >= t_k``, else the last.

    ``n`` (the number of samples) is needed only when there are no confidences (one stage left).
    """
    if n is None:
        n = len(confidences[0]) if len(confidences) else 0
    out = np.full(n, len(thresholds), dtype=np.int64)
    active = np.ones(n, dtype=bool)
    for k, (conf, t) in enumerate(zip(confidences, thresholds)):
        answer = active & (np.asarray(conf) >= t)
        out[answer] = k
        active &= ~answer
    return out


def pareto_front(points: Sequence[P], cost: Callable[[P], float] = lambda p: p.expected_cost,
                 accuracy: Callable[[P], float] = lambda p: p.accuracy) -> list[P]:
    """The points no other point beats on both cost (lower) and accuracy (higher), by rising cost.

    ``cost`` and ``accuracy`` read them off a point (an :class:`OperatingPoint` by default; any
    record, e.g. a model's measured latency and test accuracy)."""
    best: list[P] = []
    for p in sorted(points, key=lambda p: (cost(p), -accuracy(p))):
        if not best or accuracy(p) > accuracy(best[-1]):
            best.append(p)
    return best


@dataclass(frozen=True)
class GateOperatingPoint:
    """A gated network's execute threshold chosen on calibration data for a cost budget, and what it gave."""

    threshold: float
    cost: float            # mean cost per input on the calibration data, in the budget's unit
    accuracy: float
    budget: float
    within_budget: bool    # False: no candidate fit, and this is the cheapest one

    def to_dict(self) -> dict:
        return asdict(self)


def gate_threshold_for_budget(measured: Sequence[tuple[float, float, float]], budget: float) -> GateOperatingPoint:
    """The gate threshold that buys the most computation within ``budget``.

    ``measured`` holds ``(threshold, mean cost, accuracy)`` per candidate, each measured on calibration data
    (validation, never test) with the network run at that threshold; the decisions of later gates depend on
    earlier ones, so cost is measured, not assumed monotone in the threshold. Of the candidates whose cost is
    at most ``budget`` the costliest is chosen (more computation within the same budget is what a dynamic
    network trades for accuracy), the more accurate, then the lower threshold, among ties. Where none fits,
    the cheapest candidate, with ``within_budget=False``.
    """
    if not measured:
        raise ValueError("gate_threshold_for_budget needs at least one measured candidate")
    if not budget > 0 or not math.isfinite(budget):
        raise ValueError(f"budget must be a positive finite cost, got {budget!r}")
    fits = [m for m in measured if m[1] <= budget]
    if fits:
        t, cost, acc = max(fits, key=lambda m: (m[1], m[2], -m[0]))
    else:
        t, cost, acc = min(measured, key=lambda m: (m[1], -m[2], m[0]))
    return GateOperatingPoint(float(t), float(cost), float(acc), float(budget), bool(fits))


_ACC_TOL = 1e-12  # an accuracy this far below the floor still meets it (float rounding of k / n)


def _correct_needed(min_accuracy: float, n: int) -> int:
    """The fewest right answers out of ``n`` whose accuracy meets ``min_accuracy`` as :meth:`ThresholdSearch.evaluate`
    judges it: the search and the evaluation must agree on what is feasible, to the last sample (a floor of
    1e-9 on one sample needs one right answer, not zero)."""
    need = max(0, int(math.ceil(min_accuracy * n - 1e-9)))
    while need < n and (need / n if n else 0.0) < min_accuracy - _ACC_TOL:
        need += 1
    return need


class ThresholdSearch:
    """Find the cheapest thresholds whose accuracy on the calibration data is at least a floor.

    Args:
        costs: per-stage cost ``c_k`` of running stage ``k`` on one sample (FLOPs, ms, any unit).
        max_candidates: for three stages, how many first thresholds to try exhaustively (all when the
            data has fewer distinct confidences).
        max_sweeps: coordinate-descent passes over the thresholds.
    """

    def __init__(self, costs: Sequence[float], max_candidates: int = 2048, max_sweeps: int = 20) -> None:
        self.costs = np.asarray(costs, dtype=np.float64)
        if self.costs.ndim != 1 or len(self.costs) < 2:
            raise ValueError("a cascade needs costs for at least two stages")
        if (self.costs < 0).any():
            raise ValueError(f"stage costs must be >= 0, got {self.costs.tolist()}")
        self.cum_costs = np.cumsum(self.costs)
        self.max_candidates, self.max_sweeps = max_candidates, max_sweeps

    # ------------------------------------------------------------------------------------- evaluation
    def evaluate(self, confidences: Sequence[np.ndarray], correct: np.ndarray, thresholds: Sequence[float],
                 min_accuracy: float = 0.0) -> OperatingPoint:
        """Accuracy, expected cost and reach/exit rates of ``thresholds`` on this data."""
        correct = self._check(confidences, correct)
        exits = exit_stages(confidences, thresholds)
        n, k = correct.shape[1], correct.shape[0]
        acc = float(correct[exits, np.arange(n)].mean()) if n else 0.0
        exit_rate = np.bincount(exits, minlength=k) / max(n, 1)
        reach = 1.0 - np.concatenate([[0.0], np.cumsum(exit_rate)[:-1]])
        cost = float((self.costs * reach).sum())
        return OperatingPoint(tuple(float(t) for t in thresholds), acc, cost, tuple(reach.tolist()),
                              tuple(exit_rate.tolist()), bool(acc >= min_accuracy - _ACC_TOL), float(min_accuracy))

    def _check(self, confidences: Sequence[np.ndarray], correct: np.ndarray) -> np.ndarray:
        correct = np.asarray(correct, dtype=bool)
        k = len(self.costs)
        if correct.ndim != 2 or correct.shape[0] != k or len(confidences) != k - 1:
            raise ValueError(f"expected correct [{k}, n] and {k - 1} confidence arrays for {k} stages, got "
                             f"correct {list(correct.shape)} and {len(confidences)} confidence arrays")
        if any(len(c) != correct.shape[1] for c in confidences):
            raise ValueError("every confidence array needs one value per sample")
        return correct

    # ----------------------------------------------------------------------------------------- search
    def fit(self, confidences: Sequence[np.ndarray], correct: np.ndarray, min_accuracy: float) -> OperatingPoint:
        """The least-cost thresholds with accuracy >= ``min_accuracy`` on this data.

        Where no thresholds reach the floor, the most accurate ones found (``feasible`` False).
        """
        correct = self._check(confidences, correct)
        confs = [np.asarray(c, dtype=np.float64) for c in confidences]
        n = correct.shape[1]
        need = _correct_needed(min_accuracy, n)
        k = len(self.costs)
        if k == 2:
            t, _ = _best_split(confs[0], correct[0], correct[1], np.full(n, self.costs[1]), 0, need)
            thresholds = [t]
        elif k == 3:
            thresholds = self._nested_three(confs, correct, need)
        else:  # start with every sample at the last stage (its accuracy is usually the floor's reference)
            thresholds = [math.inf] * (k - 1)
        thresholds = self._coordinate_descent(confs, correct, need, thresholds)
        return self.evaluate(confs, correct, thresholds, min_accuracy)

    def frontier(self, confidences: Sequence[np.ndarray], correct: np.ndarray,
                 min_accuracies: Sequence[float]) -> list[OperatingPoint]:
        """One :meth:`fit` per accuracy floor: the cost/accuracy trade-off a user picks a point from."""
        return [self.fit(confidences, correct, a) for a in min_accuracies]

    def _coordinate_descent(self, confs: list[np.ndarray], correct: np.ndarray, need: int,
                            thresholds: list[float]) -> list[float]:
        n, k = correct.shape[1], correct.shape[0]
        idx = np.arange(n)
        thresholds = list(thresholds)
        for _ in range(self.max_sweeps):
            changed = False
            for b in range(k - 1):
                exits = exit_stages(confs, thresholds)
                reached = exits >= b
                # Where a sample deferred at b would exit with the later thresholds as they are.
                later = exit_stages(confs[b + 1:], thresholds[b + 1:], n) + b + 1
                down_cost = self.cum_costs[later] - self.cum_costs[b]
                base = int(correct[exits[~reached], idx[~reached]].sum())
                r = reached
                t, _ = _best_split(confs[b][r], correct[b][r], correct[later[r], idx[r]], down_cost[r], base, need)
                old = exit_stages(confs, thresholds)
                new_thresholds = thresholds[:b] + [t] + thresholds[b + 1:]
                if not np.array_equal(exit_stages(confs, new_thresholds), old):
                    thresholds, changed = new_thresholds, True
            if not changed:
                break
        return thresholds

    def _nested_three(self, confs: list[np.ndarray], correct: np.ndarray, need: int) -> list[float]:
        order = np.argsort(confs[0], kind="stable")
        s0 = confs[0][order]
        # j samples deferred at stage 0 (the j least confident); only where the confidence changes.
        valid = np.flatnonzero(np.concatenate([[True], s0[1:] > s0[:-1], [True]]))
        if len(valid) > self.max_candidates:
            valid = np.unique(valid[np.linspace(0, len(valid) - 1, self.max_candidates).round().astype(int)])
        c0 = correct[0][order]
        suffix_c0 = np.concatenate([np.cumsum(c0[::-1])[::-1], [0]])  # correct answers kept at stage 0
        c1, c2, s1 = correct[1][order], correct[2][order], confs[1][order]
        best: tuple[tuple[int, int, float], list[float]] | None = None
        for j in valid:
            t1, (correct_total, deferred) = _best_split(s1[:j], c1[:j], c2[:j], np.full(j, self.costs[2]),
                                                        int(suffix_c0[j]), need)
            feasible = correct_total >= need
            cost = j * self.costs[1] + deferred * self.costs[2]
            key = (0, 0, cost) if feasible else (1, -correct_total, cost)
            t0 = _threshold_at(s0, int(j))
            if best is None or key < best[0]:
                best = (key, [t0, t1])
        assert best is not None
        return best[1]


def _threshold_at(s_sorted: np.ndarray, j: int) -> float:
    """A threshold deferring exactly the ``j`` smallest of ``s_sorted`` (``s < t``)."""
    n = len(s_sorted)
    if j == 0:
        return -math.inf
    if j >= n:
        return math.inf
    t = 0.5 * (s_sorted[j - 1] + s_sorted[j])  # midway, so a new sample near the boundary is not favoured
    return float(t if s_sorted[j - 1] < t <= s_sorted[j] else s_sorted[j])


def _best_split(s: np.ndarray, answer_ok: np.ndarray, defer_ok: np.ndarray, defer_cost: np.ndarray,
                base_correct: int, need: int) -> tuple[float, tuple[int, int]]:
    """Exact one-threshold search over the samples reaching a stage.

    ``answer_ok``/``defer_ok``: correct if answered here / if deferred; ``defer_cost >= 0``: what
    deferring costs downstream; ``base_correct``: correct answers fixed elsewhere. Returns the threshold
    and (total correct, number deferred).
    """
    m = len(s)
    order = np.argsort(s, kind="stable")
    s = s[order]
    a = np.asarray(answer_ok, dtype=np.int64)[order]
    b = np.asarray(defer_ok, dtype=np.int64)[order]
    d = np.asarray(defer_cost, dtype=np.float64)[order]
    zero = np.zeros(1, dtype=np.int64)
    correct = base_correct + np.concatenate([zero, np.cumsum(b)]) + (a.sum() - np.concatenate([zero, np.cumsum(a)]))
    cost = np.concatenate([[0.0], np.cumsum(d)])
    valid = np.concatenate([[True], s[1:] > s[:-1], [True]]) if m else np.array([True])
    feasible = valid & (correct >= need)
    if feasible.any():
        # Cost never falls as j grows (defer_cost >= 0): the least feasible j is the cheapest.
        cand = np.flatnonzero(feasible)
        j = int(cand[np.argmin(cost[cand])])
    else:  # no threshold reaches the floor: the most accurate, cheapest among ties
        cand = np.flatnonzero(valid)
        top = cand[correct[cand] == correct[cand].max()]
        j = int(top[np.argmin(cost[top])])
    return _threshold_at(s, j), (int(correct[j]), j)
