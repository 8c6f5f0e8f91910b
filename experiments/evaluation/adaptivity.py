"""Does a dynamic model's computation follow the input? Adaptivity metrics from per-input records.

For every dynamic method (SkipNet, random skipping, cascades), over the difficulty buckets that form
the trend (a ladder's "unsolved" bucket is set aside):

- ``distinct_patterns``: how many different skip patterns (or exit stages) the inputs took; 1 is a
  static network in disguise;
- ``gflops_mean`` / ``gflops_p95`` per bucket (``gops_mean`` / ``gops_p95``, float FLOPs and int8
  operations together, for a model with int8 layers), ``hardest_over_easiest`` (mean cost of the hardest
  bucket over the easiest) and ``shape`` (rises / flat / falls / mixed, strictly: see
  :func:`experiments.evaluation.report.trend_shape`);
- ``spearman_rho``: Spearman's rank correlation between each input's cost and its difficulty bucket
  (None when the cost or the difficulty is constant: there is nothing to rank);
- ``acc_vs_random_pts``: per bucket, its accuracy minus that of random skipping at its own per-block
  rates (the evaluation's ``kind: random_skip`` method that ``match``es it), in points; and over all
  inputs (``acc_vs_random_all_pts``) with its paired standard error and 95% interval
  (``acc_vs_random_se_pts``, ``acc_vs_random_ci_pts``), so that a gap the test split cannot tell from
  zero reads as such;
- ``exec_rate``: per bucket, each block's execution rate (the heat map's rows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from experiments.evaluation.difficulty import Buckets, severity_buckets
from experiments.evaluation.report import trend_shape
from experiments.stats import paired_difference

__all__ = ["adaptivity_metrics", "adaptivity_statements", "plot_skip_heatmaps", "run_adaptivity", "spearman_rho"]


def _ranks(v: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(1, len(v) + 1)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None if either side is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))


def _patterns(recs: Sequence[dict[str, Any]]) -> list[str]:
    return [r.get("pattern") or (f"exit{r['exit_stage']}" if r.get("exit_stage", -1) >= 0 else "") for r in recs]


def _exec_rates(patterns: list[str], bucket: np.ndarray, n_buckets: int) -> list[list[float]] | None:
    if not patterns or not all(p and set(p) <= {"0", "1"} for p in patterns):
        return None
    bits = np.array([[c == "1" for c in p] for p in patterns], dtype=np.float64)
    return [bits[bucket == k].mean(0).round(4).tolist() if (bucket == k).any() else [] for k in range(n_buckets)]


def _one(recs: list[dict[str, Any]], buckets: Buckets, keep: list[int]) -> dict[str, Any]:
    b = buckets.bucket[[r["index"] for r in recs]]
    # an int8 network's skipped work is int8 work: its cost is all its operations, float and int8
    int8 = np.array([r.get("int8_ops") or 0.0 for r in recs], dtype=np.float64)
    unit = "gops" if int8.any() else "gflops"
    cost = (np.array([r["flops"] for r in recs], dtype=np.float64) + int8) / 1e9
    correct = np.array([r["correct"] for r in recs], dtype=np.float64)
    in_trend = np.isin(b, keep)
    means = [float(cost[b == k].mean()) for k in keep if (b == k).any()]
    patterns = _patterns(recs)
    return {
        "distinct_patterns": len(set(patterns)) if any(patterns) else None,
        "buckets": [buckets.labels[k] for k in keep if (b == k).any()],
        f"{unit}_mean": means,
        f"{unit}_p95": [float(np.percentile(cost[b == k], 95)) for k in keep if (b == k).any()],
        "acc": [float(correct[b == k].mean()) for k in keep if (b == k).any()],
        "hardest_over_easiest": means[-1] / means[0] if means and means[0] > 0 else None,
        "shape": trend_shape(means),
        "spearman_rho": spearman_rho(cost[in_trend], b[in_trend]),
        "exec_rate": _exec_rates(patterns, b, len(buckets.labels)),
    }


def adaptivity_metrics(records: Sequence[dict[str, Any]], buckets: Buckets, kinds: dict[str, str],
                       random_of: dict[str, str] | None = None, set_aside: Sequence[str] = ()) -> dict[str, Any]:
    """The metrics above for every non-static method of ``records``.

    Args:
        records: per-input records (``method``, ``index``, ``flops``, ``correct``, and ``pattern`` or
            ``exit_stage``).
        buckets: the difficulty of every input.
        kinds: method -> kind (``static`` methods are skipped).
        random_of: SkipNet method -> the random-skipping method matched to it.
        set_aside: bucket labels left out of the trend (the ladder's unsolved inputs).
    """
    keep = [k for k, lab in enumerate(buckets.labels) if lab not in set_aside]
    out: dict[str, Any] = {}
    for m, kind in kinds.items():
        recs = [r for r in records if r["method"] == m]
        if kind == "static" or not recs:
            continue
        out[m] = {"kind": kind, **_one(recs, buckets, keep)}
    for m, rnd in (random_of or {}).items():
        if m in out and rnd in out and out[m]["buckets"] == out[rnd]["buckets"]:
            out[m]["random_skip"] = rnd
            out[m]["acc_vs_random_pts"] = [100.0 * (a - r) for a, r in zip(out[m]["acc"], out[rnd]["acc"])]
            out[m].update(_against_random(records, m, rnd))
    return out


def _against_random(records: Sequence[dict[str, Any]], m: str, rnd: str) -> dict[str, Any]:
    """``m``'s accuracy minus random skipping's over the inputs both answered, paired input by input."""
    def correct(method: str) -> dict[int, int]:
        return {int(r["index"]): int(r["correct"]) for r in records if r["method"] == method}

    mine, theirs = correct(m), correct(rnd)
    shared = sorted(set(mine) & set(theirs))
    if not shared:
        return {}
    p = paired_difference(torch.tensor([mine[i] for i in shared]), torch.tensor([theirs[i] for i in shared]))
    return {"acc_vs_random_all_pts": 100.0 * p.diff, "acc_vs_random_se_pts": 100.0 * p.std_error,
            "acc_vs_random_ci_pts": [100.0 * p.interval[0], 100.0 * p.interval[1]]}


def adaptivity_statements(metrics: dict[str, Any]) -> list[str]:
    """One line per method: patterns, Spearman's rho and the gap to random skipping (the cost's shape and
    hardest/easiest ratio are :func:`experiments.evaluation.report.trend_statements`')."""
    lines = []
    for m, a in metrics.items():
        rho = "undefined (constant cost)" if a["spearman_rho"] is None else f"{a['spearman_rho']:+.3f}"
        line = (f"{m}: {a['distinct_patterns'] if a['distinct_patterns'] is not None else 'n/a'} distinct patterns; "
                f"Spearman rho(cost, difficulty) {rho}")
        if "acc_vs_random_pts" in a:
            gaps = ", ".join(f"{g:+.1f}" for g in a["acc_vs_random_pts"])
            line += f"; accuracy minus random skipping per bucket (pts): {gaps}"
        if "acc_vs_random_all_pts" in a:
            lo, hi = a["acc_vs_random_ci_pts"]
            line += (f"; overall {a['acc_vs_random_all_pts']:+.2f} pts (paired standard error "
                     f"{a['acc_vs_random_se_pts']:.2f}, 95% interval {lo:+.2f} to {hi:+.2f})")
        lines.append(line)
    return lines


def plot_skip_heatmaps(metrics: dict[str, Any], buckets: Buckets, out: Path) -> list[Path]:
    """``skip_pattern_<method>.png``: each block's execution rate per difficulty bucket (blocks x buckets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for m, a in metrics.items():
        rates = a.get("exec_rate")
        if not rates or not any(rates):
            continue
        cols = [(k, r) for k, r in enumerate(rates) if r]
        grid = np.array([r for _, r in cols]).T  # blocks x buckets
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cols), 0.6 + 0.22 * grid.shape[0]))
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_xticks(range(len(cols)))
        ax.set_xticklabels([buckets.labels[k] for k, _ in cols], fontsize=7, rotation=30, ha="right")
        ax.set_yticks(range(grid.shape[0]))
        ax.set_yticklabels([str(i) for i in range(grid.shape[0])], fontsize=6)
        ax.set_ylabel("block")
        ax.set_title(f"{m}: execution rate per block and bucket", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        path = out / f"skip_pattern_{m}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def run_adaptivity(records: Sequence[dict[str, Any]], difficulty: Any = None) -> dict[str, Any] | None:
    """A training run's adaptivity from its test inputs (one method): by severity where the data set records
    integer levels, else over the whole test split as one bucket."""
    if not records:
        return None
    n = max(r["index"] for r in records) + 1
    levels = None if difficulty is None else np.asarray(difficulty)
    if levels is not None and len(levels) >= n and np.issubdtype(levels.dtype, np.integer):
        buckets = severity_buckets(levels[:n])  # a limited test run saw the loader's first n inputs
    else:
        buckets = Buckets(np.zeros(n, dtype=np.int64), ["0:all"], "all test inputs (no difficulty recorded)")
    name = records[0]["method"]
    return {"difficulty": buckets.definition, **adaptivity_metrics(records, buckets, {name: "skipnet"})[name]}
