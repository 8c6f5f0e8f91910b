"""Do two evaluation runs agree? Two seeds, two clones, two machines: the same study, compared per model.

    python -m experiments.agreement a=logs/study_s12345/eval/runs/mnist_c_eval_dynamic \\
        b=logs/study_s1/eval/runs/mnist_c_eval_dynamic

For every model both runs evaluated (at its own operating point), from their ``records.csv`` (one row per
test input): test accuracy and GFLOPs per image in each run, the differences, and whether they are within
``tolerance_pts`` and ``tolerance_flops_pct``. The accuracy difference comes with its paired standard error
over the shared test inputs (:func:`experiments.stats.paired_difference`) and ``chance_beyond_tol``: how often
two equally accurate models that disagree as these two do would still differ by more than the tolerance on
this test split. A tolerance the test split cannot resolve is then visible as such. Where the runs recorded
adaptivity (per-difficulty cost), the hardest/easiest cost ratio and Spearman's rho of each run are shown.

Writes ``agreement.md`` and ``metrics.json`` in its run folder.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

import experiments  # noqa: F401  (sets PROJECT_ROOT)
from experiments.report import markdown_table
from experiments.runs import find_run, output_dir, write_run_record
from experiments.stats import paired_difference
from experiments.utils import run_hydra, user_facing
from gating.errors import UserError

RECORDS = "records.csv"


def read_records(run: str | Path) -> tuple[dict[str, list[dict[str, str]]], dict[str, Any]]:
    """An evaluation run's per-input rows by model (in test order), and its record."""
    folder = find_run(run)
    path = folder / RECORDS
    if not path.is_file():
        raise UserError(f"{str(folder)!r} has no {RECORDS}: give an experiments.eval run folder (it writes one "
                        f"row per test input and model)")
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[row["method"]].append(row)
    for model in rows:
        rows[model].sort(key=lambda r: int(r["index"]))
    return rows, json.loads((folder / "metrics.json").read_text())


def compare_model(a: list[dict[str, str]], b: list[dict[str, str]], tolerance_pts: float,
                  tolerance_flops_pct: float, level: float) -> dict[str, Any]:
    """One model's row: accuracy and cost in each run, the differences, and the paired error."""
    if [r["label"] for r in a] != [r["label"] for r in b]:
        raise UserError("the two runs did not score the same test inputs (labels differ in order or number): "
                        "compare evaluations of the same data split")
    p = paired_difference(torch.tensor([int(r["correct"]) for r in a]),
                          torch.tensor([int(r["correct"]) for r in b]), level)
    gflops_a = sum(float(r["flops"]) for r in a) / len(a) / 1e9
    gflops_b = sum(float(r["flops"]) for r in b) / len(b) / 1e9
    flops_diff_pct = 100 * abs(gflops_a - gflops_b) / ((gflops_a + gflops_b) / 2) if gflops_a + gflops_b else 0.0
    return {
        "acc_a_pct": 100 * p.acc_a, "acc_b_pct": 100 * p.acc_b, "acc_diff_pts": 100 * p.diff,
        "acc_diff_se_pts": 100 * p.std_error, "acc_diff_lo_pts": 100 * p.interval[0],
        "acc_diff_hi_pts": 100 * p.interval[1], "disagree": p.only_a + p.only_b,
        "chance_beyond_tol": p.chance_beyond(tolerance_pts / 100),
        "gflops_a_per_img": gflops_a, "gflops_b_per_img": gflops_b, "flops_diff_pct": flops_diff_pct,
        "acc_within_tol": abs(100 * p.diff) <= tolerance_pts, "flops_within_tol": flops_diff_pct <= tolerance_flops_pct,
    }


def _adaptivity(row: dict[str, Any], model: str, rec_a: dict[str, Any], rec_b: dict[str, Any]) -> None:
    for tag, rec in (("a", rec_a), ("b", rec_b)):
        ad = (rec.get("adaptivity") or {}).get(model)
        if ad:
            row[f"ratio_{tag}"] = ad.get("hardest_over_easiest")
            row[f"rho_{tag}"] = ad.get("spearman_rho")


COLUMNS = ["model", "acc_a_pct", "acc_b_pct", "acc_diff_pts", "acc_diff_se_pts", "chance_beyond_tol",
           "gflops_a_per_img", "gflops_b_per_img", "flops_diff_pct", "acc_within_tol", "flops_within_tol"]


@user_facing
def agreement(cfg: DictConfig) -> dict[str, Any]:
    """Compare the two evaluation runs ``cfg.a`` and ``cfg.b``; returns (and writes) the record."""
    if not cfg.tolerance_pts >= 0 or not cfg.tolerance_flops_pct >= 0 or not 0 < cfg.level < 1:
        raise UserError(f"tolerance_pts and tolerance_flops_pct must be >= 0 and level in (0, 1); got "
                        f"{cfg.tolerance_pts}, {cfg.tolerance_flops_pct}, {cfg.level}")
    run_a, run_b = find_run(cfg.a), find_run(cfg.b)
    (rows_a, rec_a), (rows_b, rec_b) = read_records(run_a), read_records(run_b)
    shared = [m for m in rows_a if m in rows_b]
    models = list(cfg.models) if cfg.get("models") else shared
    missing = [m for m in models if m not in shared]
    if missing or not models:
        raise UserError(f"models {missing or models} are not in both runs; both have {shared}")
    table = []
    for m in models:
        row = {"model": m, **compare_model(rows_a[m], rows_b[m], cfg.tolerance_pts, cfg.tolerance_flops_pct,
                                           cfg.level)}
        _adaptivity(row, m, rec_a, rec_b)
        table.append(row)
    cols = COLUMNS + [c for c in ("ratio_a", "ratio_b", "rho_a", "rho_b") if any(c in r for r in table)]
    text = markdown_table(table, cols, floatfmt=".4g")
    print(f"a = {run_a}\nb = {run_b}\n{text}")
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.md").write_text(text + "\n")
    record = {"task": cfg.task_name, "run_name": cfg.get("run_name"), "output_dir": str(out),
              "a": str(run_a), "b": str(run_b), "tolerance_pts": cfg.tolerance_pts,
              "tolerance_flops_pct": cfg.tolerance_flops_pct, "level": cfg.level, "models": table}
    write_run_record(cfg, record)
    return record


@hydra.main(version_base="1.3", config_path="../configs", config_name="agreement.yaml")
def main(cfg: DictConfig) -> None:
    agreement(cfg)


if __name__ == "__main__":
    run_hydra(main)
