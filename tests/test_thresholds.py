"""Threshold search: exact against brute force, fast, and consistent with its own evaluation."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gating.thresholds import ThresholdSearch, accuracy_floor, exit_stages, gate_threshold_for_budget, pareto_front


def _candidates(conf: np.ndarray) -> list[float]:
    """Every distinct policy of one threshold: below all, between/at each value, above all."""
    return [-math.inf, *np.unique(conf).tolist(), math.inf]


def _brute_force(search: ThresholdSearch, confs, correct, floor):
    """The least cost over every combination of thresholds; ties on cost break to higher accuracy."""
    best = None
    for ts in itertools.product(*[_candidates(c) for c in confs]):
        op = search.evaluate(confs, correct, list(ts), floor)
        if op.feasible and (best is None or op.expected_cost < best.expected_cost - 1e-9):
            best = op
    return best


def _random_problem(rng: np.random.Generator, n: int, k: int, distinct: int):
    """Confidences on a coarse grid (so ties happen) loosely tied to correctness, like real stages."""
    correct = np.zeros((k, n), dtype=bool)
    confs = []
    skill = np.linspace(0.5, 0.95, k)
    for s in range(k):
        correct[s] = rng.random(n) < skill[s]
    for s in range(k - 1):
        noise = rng.integers(0, distinct, n)
        confs.append(((noise + distinct * correct[s] * rng.random(n).round()) / (2 * distinct)).astype(np.float64))
    costs = np.cumsum(rng.uniform(0.1, 5.0, k))  # later stages cost more
    return confs, correct, costs.tolist()


def _fit_and_brute_force(seed: int, n: int, k: int, distinct: int, floor: float):
    confs, correct, costs = _random_problem(np.random.default_rng(seed), n, k, distinct)
    search = ThresholdSearch(costs)
    return search, confs, correct, search.fit(confs, correct, floor), _brute_force(search, confs, correct, floor)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), distinct=st.integers(1, 12),
       floor=st.floats(0.0, 1.0))
@example(seed=0, n=1, distinct=1, floor=1e-9)  # a floor just above 0 on one sample needs one right answer
def test_two_stage_search_matches_brute_force(seed, n, distinct, floor):
    search, confs, correct, got, want = _fit_and_brute_force(seed, n, 2, distinct, floor)
    if want is None:  # nothing reaches the floor: the search says so and returns its most accurate point
        assert not got.feasible
        best_acc = max(search.evaluate(confs, correct, [t]).accuracy for t in _candidates(confs[0]))
        assert got.accuracy == pytest.approx(best_acc)
    else:
        assert got.feasible
        assert got.expected_cost == pytest.approx(want.expected_cost)
    # What fit reports is what its thresholds do.
    again = search.evaluate(confs, correct, got.thresholds, floor)
    assert again.accuracy == pytest.approx(got.accuracy) and again.expected_cost == pytest.approx(got.expected_cost)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 18), distinct=st.integers(1, 6),
       floor=st.floats(0.0, 1.0))
def test_three_stage_search_matches_brute_force(seed, n, distinct, floor):
    _, _, _, got, want = _fit_and_brute_force(seed, n, 3, distinct, floor)
    assert got.feasible == (want is not None)
    if want is not None:
        assert got.expected_cost == pytest.approx(want.expected_cost)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 10), distinct=st.integers(1, 4))
def test_four_stage_coordinate_descent_is_feasible_and_no_worse_than_deferring_everything(seed, n, distinct):
    confs, correct, costs = _random_problem(np.random.default_rng(seed), n, 4, distinct)
    search = ThresholdSearch(costs)
    floor = correct[-1].mean()  # everything to the last stage is always feasible
    got = search.fit(confs, correct, floor)
    assert got.feasible
    assert got.expected_cost <= sum(costs) + 1e-9
    want = _brute_force(search, confs, correct, floor)
    assert got.expected_cost >= want.expected_cost - 1e-9  # never better than the optimum (sanity of evaluate)


def test_exact_search_is_fast_on_100k_samples():
    rng = np.random.default_rng(0)
    n = 100_000
    conf = rng.random(n)
    correct = np.stack([rng.random(n) < conf, rng.random(n) < 0.99])
    search = ThresholdSearch([1.0, 20.0])
    search.fit([conf], correct, 0.5)  # warm-up (imports, allocations)
    t0 = time.perf_counter()
    op = search.fit([conf], correct, 0.97)
    elapsed = time.perf_counter() - t0
    assert op.feasible
    assert elapsed < 1.0, f"two-stage exact search took {elapsed:.2f} s for {n} samples"


def test_thresholds_behave_at_the_edges():
    conf = np.array([0.2, 0.2, 0.9, 0.9])
    correct = np.array([[False, False, True, True], [True, True, True, True]])
    search = ThresholdSearch([1.0, 10.0])
    perfect = search.fit([conf], correct, 1.0)  # the two 0.2s must go on
    assert perfect.thresholds[0] == pytest.approx(0.55) and perfect.exit == (0.5, 0.5)
    assert exit_stages([conf], [math.inf]).tolist() == [1, 1, 1, 1]
    assert exit_stages([conf], [-math.inf]).tolist() == [0, 0, 0, 0]
    cheapest = search.fit([conf], correct, 0.0)
    assert cheapest.thresholds[0] == -math.inf and cheapest.expected_cost == 1.0
    assert accuracy_floor(0.99, 0.005) == pytest.approx(0.985)
    assert accuracy_floor(0.99, 0.01, relative=True) == pytest.approx(0.9801)


def test_frontier_is_monotone_and_pareto_filters_dominated_points():
    rng = np.random.default_rng(1)
    confs, correct, costs = _random_problem(rng, 500, 2, 50)
    search = ThresholdSearch(costs)
    floors = [0.6, 0.7, 0.8, 0.85, 0.9]
    points = search.frontier(confs, correct, floors)
    feasible = [p for p in points if p.feasible]
    assert [p.expected_cost for p in feasible] == sorted(p.expected_cost for p in feasible)
    front = pareto_front(points)
    assert all(a.accuracy < b.accuracy and a.expected_cost <= b.expected_cost for a, b in zip(front, front[1:]))

    # Any record, by the readers given: measured models (accuracy, ms); dominated and tied-slower ones drop.
    models = {"big": (0.99, 10.0), "pruned": (0.985, 5.0), "int8": (0.99, 4.0), "tiny": (0.98, 1.0),
              "slow_tiny": (0.98, 2.0), "bad": (0.97, 3.0)}
    names = pareto_front(list(models), cost=lambda n: models[n][1], accuracy=lambda n: models[n][0])
    assert names == ["tiny", "int8"]


def test_search_rejects_mismatched_inputs():
    search = ThresholdSearch([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="3 stages"):
        search.fit([np.zeros(3)], np.zeros((3, 3), bool), 0.5)
    with pytest.raises(ValueError, match="at least two"):
        ThresholdSearch([1.0])


def test_gate_threshold_for_budget_buys_the_most_computation_within_it():
    # (threshold, cost, accuracy); cost is not monotone in the threshold (0.6 costs more than 0.5)
    measured = [(0.3, 0.60, 0.97), (0.4, 0.52, 0.96), (0.5, 0.41, 0.95), (0.6, 0.45, 0.94), (0.7, 0.30, 0.90)]
    p = gate_threshold_for_budget(measured, 0.50)
    assert (p.threshold, p.cost, p.accuracy, p.within_budget) == (0.6, 0.45, 0.94, True)
    assert gate_threshold_for_budget(measured, 0.52).threshold == 0.4  # a cost at the budget fits
    assert gate_threshold_for_budget(measured, 1.0).threshold == 0.3
    # equal cost: the more accurate, then the lower threshold
    assert gate_threshold_for_budget([(0.2, 0.5, 0.9), (0.3, 0.5, 0.95), (0.4, 0.5, 0.95)], 0.5).threshold == 0.3
    none = gate_threshold_for_budget(measured, 0.1)  # nothing fits: the cheapest, said so
    assert (none.threshold, none.within_budget, none.budget) == (0.7, False, 0.1)
    assert none.to_dict()["within_budget"] is False
    with pytest.raises(ValueError, match="at least one"):
        gate_threshold_for_budget([], 0.5)
    with pytest.raises(ValueError, match="positive finite"):
        gate_threshold_for_budget(measured, 0.0)
