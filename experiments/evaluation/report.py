"""Tables and figures from per-input records: per difficulty bucket, and across operating points.

Everything here reads the records only (``records.csv`` and ``points.csv`` can be reloaded), so a
figure can be redrawn without running a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from experiments.evaluation.difficulty import Buckets
from experiments.report import markdown_table
from gating.thresholds import pareto_front

__all__ = ["BUCKET_COLUMNS", "PARETO_COLUMNS", "bucket_table", "cost_trend", "latency_frontiers", "pareto_table",
           "plot_all", "print_report", "render_report", "trend_statements"]

BUCKET_COLUMNS = ["method", "bucket", "count", "acc", "gflops_mean", "gflops_p95", "int8_gops_mean", "int8_gops_p95",
                  "blocks_mean", "exit_shares",
                  "batch1_ms_p50", "batch1_ms_p95", "batch_share_ms_mean"]
PARETO_COLUMNS = ["method", "point", "acc", "acc_delta_pts", "gflops_per_img", "int8_gops_per_img", "flops_cut_pct",
                  "ops_cut_pct", "batch_ms_per_img", "speedup", "batch1_ms_p50", "blocks_per_img", "exit_shares",
                  "frontier_batch1", "frontier_batch"]


def _pct(v: np.ndarray, q: float) -> float:
    v = v[~np.isnan(v)]
    return float(np.percentile(v, q)) if len(v) else math.nan


def bucket_table(records: Sequence[dict[str, Any]], buckets: Buckets,
                 num_stages: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """One row per (method, bucket): count, accuracy, mean/p95 GFLOPs (and int8 GOPs for a model with
    int8 layers), blocks or exit shares, latency.

    ``num_stages`` gives a cascade's stage count, so every row lists a share for every stage.
    """
    rows = []
    methods = list(dict.fromkeys(r["method"] for r in records))
    for m in methods:
        recs = [r for r in records if r["method"] == m]
        b = buckets.bucket[[r["index"] for r in recs]]
        flops = np.array([r["flops"] for r in recs]) / 1e9
        int8 = np.array([r.get("int8_ops") or 0.0 for r in recs], dtype=float) / 1e9
        correct = np.array([r["correct"] for r in recs])
        blocks = np.array([r["blocks"] for r in recs], dtype=float)
        exits = np.array([r["exit_stage"] for r in recs])
        b1 = np.array([r["batch1_ms"] for r in recs], dtype=float)
        share = np.array([r["batch_share_ms"] for r in recs], dtype=float)
        for k, label in enumerate(buckets.labels):
            sel = b == k
            if not sel.any():
                continue
            row: dict[str, Any] = {
                "method": m, "bucket": label, "count": int(sel.sum()), "acc": float(correct[sel].mean()),
                "gflops_mean": float(flops[sel].mean()), "gflops_p95": _pct(flops[sel], 95),
            }
            if int8.any():
                row["int8_gops_mean"], row["int8_gops_p95"] = float(int8[sel].mean()), _pct(int8[sel], 95)
            if not np.isnan(blocks).all():
                row["blocks_mean"] = float(blocks[sel].mean())
            if (exits >= 0).any():
                n_stages = (num_stages or {}).get(m, int(exits.max()) + 1)
                row["exit_shares"] = [round(float((exits[sel] == s).mean()), 3) for s in range(n_stages)]
            row["batch1_ms_p50"] = _pct(b1[sel], 50)
            row["batch1_ms_p95"] = _pct(b1[sel], 95)
            row["batch_share_ms_mean"] = float(np.nanmean(share[sel])) if not np.isnan(share[sel]).all() else math.nan
            rows.append(row)
    return rows


def trend_shape(values: Sequence[float], rel_tol: float = 1e-6) -> str:
    """``"rises"`` (each value above the one before), ``"flat"`` (all equal within ``rel_tol``), ``"falls"``
    (each below the one before), or ``"mixed"``. Equal neighbours in a sequence that is not flat make it
    mixed: a cost that stays put between two buckets does not rise there."""
    if len(values) < 2:
        return "flat"
    scale = max(abs(v) for v in values) or 1.0
    steps = [(b - a) / scale for a, b in zip(values, values[1:])]
    if all(abs(d) <= rel_tol for d in steps):
        return "flat"
    if all(d > rel_tol for d in steps):
        return "rises"
    if all(d < -rel_tol for d in steps):
        return "falls"
    return "mixed"


def cost_trend(table: Sequence[dict[str, Any]], kinds: dict[str, str],
               set_aside: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Per dynamic method: mean cost per bucket, easy to hard, and whether it rises strictly.

    The cost is GFLOPs (``gflops_by_bucket``); for a model with int8 layers it is all its operations,
    float FLOPs and int8 operations together (``gops_by_bucket``), since its skipped work is int8 work.
    Buckets named in ``set_aside`` (the ladder's "unsolved": no model is right, so no amount of
    computation is the right amount) are reported but not part of the trend.
    """
    out = {}
    for m, kind in kinds.items():
        if kind in ("static",):
            continue
        rows = [r for r in table if r["method"] == m]
        unit = "gops" if any(r.get("int8_gops_mean") for r in rows) else "gflops"
        costs = [_bucket_ops(r) for r in rows if r["bucket"] not in set_aside]
        shape = trend_shape(costs)
        out[m] = {"kind": kind, f"{unit}_by_bucket": costs, "shape": shape, "monotone_rising": shape == "rises",
                  "hardest_over_easiest": costs[-1] / costs[0] if costs and costs[0] > 0 else math.nan,
                  "set_aside": {r["bucket"]: {f"{unit}_mean": _bucket_ops(r), "count": r["count"]}
                                for r in rows if r["bucket"] in set_aside}}
    return out


def pareto_table(points: Sequence[dict[str, Any]], reference: str | None,
                 front: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    """Every operating point with its accuracy, cost and time, relative to the reference method, and
    whether it is on each latency frontier (``front``: :func:`latency_frontiers` of ``points``)."""
    ref = next((p for p in points if p["method"] == reference and p["point"] == "default"), None)
    front = latency_frontiers(points) if front is None else front
    rows = []
    for p in points:
        row = {k: p.get(k) for k in ("method", "kind", "point", "acc", "gflops_per_img", "int8_gops_per_img",
                                     "gflops_p95", "batch_ms_per_img", "batch1_ms_p50", "blocks_per_img",
                                     "exit_shares")}
        if ref is not None:
            row["acc_delta_pts"] = 100.0 * (p["acc"] - ref["acc"])
            if p.get("int8_gops_per_img") or ref.get("int8_gops_per_img"):
                # int8 operations are not FLOPs: the cut is of all operations, float and int8 together
                row["ops_cut_pct"] = 100.0 * (1 - _ops(p) / _ops(ref))
            else:
                row["flops_cut_pct"] = 100.0 * (1 - p["gflops_per_img"] / ref["gflops_per_img"])
            if p.get("batch_ms_per_img") and ref.get("batch_ms_per_img"):
                row["speedup"] = ref["batch_ms_per_img"] / p["batch_ms_per_img"]
        for key, axis in (("frontier_batch1", "batch1"), ("frontier_batch", "batch")):
            if front[axis]:
                row[key] = _label(p) in front[axis]
        rows.append(row)
    return rows


def _ops(p: dict[str, Any]) -> float:
    return p["gflops_per_img"] + (p.get("int8_gops_per_img") or 0.0)


def _bucket_ops(row: dict[str, Any]) -> float:
    """A bucket row's mean cost in G operations: float FLOPs plus int8 operations (an int8 model's work)."""
    return row["gflops_mean"] + (row.get("int8_gops_mean") or 0.0)


def _label(p: dict[str, Any]) -> str:
    return p["method"] if p["point"] == "default" else f"{p['method']}@{p['point']}"


LATENCY_AXES = {"batch1": "batch1_ms_p50", "batch": "batch_ms_per_img"}


def latency_frontiers(points: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """The accuracy/latency Pareto frontier on each measured axis, fastest first, as point labels
    (``method``, or ``method@point`` for a further operating point): ``batch1`` (median latency of one
    input alone; main points only, the others are not timed at batch 1) and ``batch`` (measured ms per
    input at the evaluation batch size). An axis no point was timed on has an empty frontier."""
    out = {}
    for axis, key in LATENCY_AXES.items():
        timed = [p for p in points if p.get(key) is not None and not math.isnan(p[key])]
        out[axis] = [_label(p) for p in pareto_front(timed, cost=lambda p, k=key: p[k], accuracy=lambda p: p["acc"])]
    return out


def frontier_statements(front: dict[str, list[str]], batch_size: int) -> list[str]:
    """One sentence per latency axis naming its frontier (:func:`latency_frontiers`)."""
    what = {"batch1": "median latency at batch 1", "batch": f"measured ms per input at batch {batch_size}"}
    return [f"Latency frontier ({what[a]}; test accuracy against it, fastest first): {', '.join(front[a])}"
            for a in LATENCY_AXES if front[a]]


def plot_all(points: Sequence[dict[str, Any]], table: Sequence[dict[str, Any]], buckets: Buckets, out: Path,
             batch_size: int) -> list[Path]:
    """accuracy_vs_gflops.png, accuracy_vs_latency.png (the latency frontiers at batch 1 and at the
    evaluation batch size) and bucket_cost.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    methods = list(dict.fromkeys(p["method"] for p in points))
    int8 = any(p.get("int8_gops_per_img") for p in points)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in methods:
        pts = sorted((_ops(p), 100 * p["acc"]) for p in points if p["method"] == m)
        ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xlabel("G operations per image (float FLOPs + int8 ops, exact)" if int8 else "GFLOPs per image (exact)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_gflops.png", dpi=120)
    plt.close(fig)
    paths.append(out / "accuracy_vs_gflops.png")
    latency = _plot_latency_frontiers(points, out / "accuracy_vs_latency.png", batch_size)
    if latency is not None:
        paths.append(latency)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        rows = {r["bucket"]: _bucket_ops(r) for r in table if r["method"] == m}
        xs = [k + j * width for k, lab in enumerate(buckets.labels) if lab in rows]
        ax.bar(xs, [rows[lab] for lab in buckets.labels if lab in rows], width, label=m)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(buckets.labels))])
    ax.set_xticklabels(buckets.labels, fontsize=8)
    ax.set_yscale("log")
    int8 = any(r.get("int8_gops_mean") for r in table)
    ax.set_ylabel("mean G operations per image (float FLOPs + int8 ops)" if int8 else "mean GFLOPs per image")
    ax.set_xlabel(f"difficulty bucket ({buckets.definition})", fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "bucket_cost.png", dpi=120)
    plt.close(fig)
    paths.append(out / "bucket_cost.png")
    return paths


def _plot_latency_frontiers(points: Sequence[dict[str, Any]], path: Path, batch_size: int) -> Path | None:
    """Test accuracy against measured latency, one panel per axis timed: every point, named, the
    frontier marked (o, joined) and the dominated ones crossed (x)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    front = latency_frontiers(points)  # the points are all a plot has (figures are redrawn from records)
    axes_timed = [a for a in LATENCY_AXES if front[a]]
    if not axes_timed:
        return None
    titles = {"batch1": "median latency at batch 1 (ms)", "batch": f"ms per input at batch {batch_size}"}
    fig, axes = plt.subplots(1, len(axes_timed), figsize=(7 * len(axes_timed), 5), squeeze=False)
    for ax, axis in zip(axes[0], axes_timed):
        key = LATENCY_AXES[axis]
        timed = [p for p in points if p.get(key) is not None and not math.isnan(p[key])]
        on = set(front[axis])
        # The accurate end is where the choice is: points more than 3 points below the best are left out
        # of the drawing (they stay in the tables), so that they do not squash it.
        floor = max(100 * p["acc"] for p in timed) - 3.0
        below = [p for p in timed if 100 * p["acc"] < floor]
        timed = [p for p in timed if 100 * p["acc"] >= floor]
        for p in timed:
            ax.scatter(p[key], 100 * p["acc"], marker="o" if _label(p) in on else "x",
                       color="C0" if _label(p) in on else "C7")
            ax.annotate(_label(p), (p[key], 100 * p["acc"]), fontsize=7, xytext=(3, 2), textcoords="offset points")
        f = sorted((p for p in timed if _label(p) in on), key=lambda p: p[key])
        ax.plot([p[key] for p in f], [100 * p["acc"] for p in f], "--", lw=1, color="C0")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # log minor tick labels overlap on a narrow range
        title = f"{'batch 1' if axis == 'batch1' else f'batch {batch_size}'}: frontier o, dominated x"
        if below:
            title += f"\n({len(below)} point{'s' if len(below) != 1 else ''} below {floor:.1f}% not drawn)"
        ax.set(xlabel=titles[axis], ylabel="test accuracy (%)", title=title)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------- rendering
def trend_statements(trend: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per dynamic method on how its cost follows difficulty (a flat or falling sequence
    is said to be so)."""
    verbs = {"rises": "rises strictly", "flat": "is FLAT", "falls": "FALLS",
             "mixed": "does NOT rise strictly"}
    def one(m: str, t: dict[str, Any]) -> str:
        unit = "gops" if "gops_by_bucket" in t else "gflops"
        what = "G operations (float + int8)" if unit == "gops" else "GFLOPs"
        return (f"{m}: mean {what} per image {verbs[t.get('shape', 'mixed')]} from the easiest to the hardest "
                f"bucket ({' -> '.join(f'{c:.4g}' for c in t[f'{unit}_by_bucket'])}; hardest/easiest "
                f"{t['hardest_over_easiest']:.2f}x)"
                + "".join(f"; set aside, {b} ({v['count']} inputs no model gets right): {v[f'{unit}_mean']:.4g}"
                          for b, v in t["set_aside"].items()))

    return [one(m, t) for m, t in trend.items()]


def _columns(rows: Sequence[dict[str, Any]], wanted: Sequence[str]) -> list[str]:
    return [c for c in wanted if any(r.get(c) is not None for r in rows)]


def render_report(head: dict[str, Any], tables: dict[str, Any], statements: Sequence[str],
                  plots: Sequence[Path]) -> str:
    """``report.md``: the per-bucket table, the cost statements, the operating points and the plots."""
    return "\n".join([
        f"# Evaluation: {head['run_name']}", "",
        f"Test inputs: {head['n']}. Difficulty: {head['difficulty']}. Device: {head['device']}. "
        f"Batch size {head['batch_size']}.", "",
        "## Per difficulty bucket (main operating point of each method)", "",
        markdown_table(tables["buckets"], _columns(tables["buckets"], BUCKET_COLUMNS)), "",
        "## Cost by difficulty", "", *[f"- {s}" for s in statements], "",
        "## Operating points", "",
        markdown_table(tables["pareto"], _columns(tables["pareto"], PARETO_COLUMNS)), "",
        "## Plots", "", *[f"![{p.stem}]({p.name})" for p in plots], "",
    ])


def print_report(buckets: Buckets, tables: dict[str, Any], statements: Sequence[str], out: Path) -> None:
    """The same tables on stdout."""
    print(f"\nper difficulty bucket ({buckets.definition}):")
    print(markdown_table(tables["buckets"], _columns(tables["buckets"], BUCKET_COLUMNS)))
    print("\n" + "\n".join(statements))
    print("\noperating points:")
    print(markdown_table(tables["pareto"], _columns(tables["pareto"], PARETO_COLUMNS)))
    print(f"\nreport, records and plots: {out}")
