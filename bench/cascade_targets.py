"""IDK-cascade targets on finished ``experiments.cascade`` runs: accuracy kept, FLOPs cut, wall time
as predicted, and whether a multi-stage cascade beats the best two-stage one.

    python bench/cascade_targets.py                                   # prints the table, writes JSON
    python bench/cascade_targets.py output=docs/results/cascades_mnist_cpu.json

A two-stage cascade passes when its test accuracy is within ``max_acc_drop_pts`` of the reference
stage alone, its expected FLOPs per image are at least ``min_flops_cut_pct`` lower, and the measured
wall time of its compacted batch is within ``max_wall_time_error_pct`` of the prediction from its
expected cost. A multi-stage cascade "beats" the best two-stage one (the cheapest passing one) when it
passes the same accuracy test at lower expected FLOPs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import experiments  # noqa: F401
from experiments.report import markdown_table, write_json
from experiments.runs import newest_run
from experiments.utils import run_hydra, user_facing
from gating.errors import UserError

DECIDERS = ("max_prob", "entropy", "learned", "agreement")  # run names end with the decider (configs/decider)


def newest_record(runs_dir: Path, name: str) -> dict[str, Any] | None:
    run = newest_run(runs_dir / name)
    return json.loads((run / "metrics.json").read_text()) if run else None


def row(name: str, rec: dict[str, Any], targets: DictConfig) -> dict[str, Any]:
    m, lat = rec["metrics"], rec.get("latency") or {}
    acc_ok = m["test/acc_delta_pts"] >= -targets.max_acc_drop_pts - 1e-9
    cut_ok = m["test/flops_cut_pct"] >= targets.min_flops_cut_pct
    err = lat.get("prediction_error_pct")
    time_ok = err is not None and abs(err) <= targets.max_wall_time_error_pct
    return {
        "run": name,
        "decider": next((d for d in DECIDERS if name.endswith("_" + d)), ""),
        "stages": len(rec["stages"]),
        "test_acc": m["test/acc"],
        "ref_acc": m["reference/test_acc"],
        "delta_pts": m["test/acc_delta_pts"],
        "gflops_per_img": m["test/gflops_per_img"],
        "flops_cut_pct": m["test/flops_cut_pct"],
        "exit_shares": [round(e, 4) for e in rec["operating_point"]["test"]["exit"]],
        "measured_ms": lat.get("measured_ms"),
        "predicted_ms": lat.get("predicted_ms"),
        "time_err_pct": err,
        "speedup_vs_ref": lat.get("speedup_vs_last_stage"),
        "acc_ok": acc_ok,
        "cut_ok": cut_ok,
        "time_ok": time_ok,
        "device": lat.get("device"),
    }


@user_facing
def check(cfg: DictConfig) -> dict[str, Any]:
    """Score every listed run against the targets; print the table, write the JSON."""
    rows = read_rows(cfg)
    best_two = compare_to_best_two_stage(rows)
    result = {"targets": dict(cfg.targets), "rows": rows["two_stage"] + rows["multi_stage"] + rows["others"],
              "best_two_stage": best_two and best_two["run"]}
    print_targets(result, rows["multi_stage"], best_two)
    write_json(cfg.output, result)
    print(f"\nwrote {cfg.output}")
    return result


def read_rows(cfg: DictConfig) -> dict[str, list[dict[str, Any]]]:
    """A row per listed run, by group; the two- and multi-stage runs must exist."""
    runs_dir = Path(cfg.runs_dir)
    rows: dict[str, list[dict[str, Any]]] = {"two_stage": [], "multi_stage": [], "others": []}
    for group in rows:
        for name in cfg[group]:
            rec = newest_record(runs_dir, name)
            if rec is None:
                if group != "others":
                    raise UserError(f"no finished run {name!r} under {runs_dir}: run python -m experiments.cascade "
                                    f"for it first (see configs/bench/cascade_targets.yaml)")
                continue
            rows[group].append(row(name, rec, cfg.targets))
    return rows


def compare_to_best_two_stage(rows: dict[str, list[dict[str, Any]]]) -> dict[str, Any] | None:
    """Mark each multi-stage run that beats the cheapest accurate two-stage one; returns that one."""
    passing_two = [r for r in rows["two_stage"] if r["acc_ok"]]
    best_two = min(passing_two, key=lambda r: r["gflops_per_img"]) if passing_two else None
    for r in rows["multi_stage"]:
        same = [t for t in passing_two if t["decider"] == r["decider"]]
        best_same = min(same, key=lambda t: t["gflops_per_img"]) if same else None
        r["beats_best_two_stage"] = bool(best_two and r["acc_ok"] and r["gflops_per_img"] < best_two["gflops_per_img"])
        r["beats_best_two_stage_same_decider"] = bool(best_same and r["acc_ok"]
                                                      and r["gflops_per_img"] < best_same["gflops_per_img"])
    return best_two


def print_targets(result: dict[str, Any], multi_stage: list[dict[str, Any]], best_two: dict[str, Any] | None) -> None:
    cols = ["run", "stages", "test_acc", "ref_acc", "delta_pts", "gflops_per_img", "flops_cut_pct", "exit_shares",
            "measured_ms", "predicted_ms", "time_err_pct", "speedup_vs_ref", "acc_ok", "cut_ok", "time_ok"]
    print(markdown_table(result["rows"], cols))
    if best_two:
        print(f"\nbest two-stage cascade keeping accuracy: {best_two['run']} "
              f"({best_two['gflops_per_img']:.5f} GFLOPs/img)")
    for r in multi_stage:
        print(f"{r['run']} ({r['gflops_per_img']:.5f} GFLOPs/img, {r['delta_pts']:+.2f} pts): "
              f"{'beats' if r['beats_best_two_stage'] else 'does not beat'} it; "
              f"{'beats' if r['beats_best_two_stage_same_decider'] else 'does not beat'} the best two-stage "
              f"cascade with its own decider ({r['decider']})")


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench/cascade_targets.yaml")
def main(cfg: DictConfig) -> None:
    check(cfg)


if __name__ == "__main__":
    run_hydra(main)
