"""Calibrate an IDK cascade of trained stages on validation data and verify it on test.

    python -m experiments.cascade experiment=mnist_cascade_2stage
    python -m experiments.cascade -m experiment=mnist_cascade_2stage,mnist_cascade_3stage   # compare

Steps: temperature scaling per stage (val), the exact least-cost thresholds whose validation accuracy
is within ``search.epsilon`` of the best stage's, the whole frontier over ``search.frontier_epsilons``,
test verification with confidence intervals, exact FLOPs per stage, and the measured wall time of the
compacted cascade on one large test batch against what its expected cost predicts.

The run folder gets ``metrics.json``, ``config.yaml``, ``frontier.csv``, ``stages.csv``,
``predictions.csv`` (per test sample: label, prediction, exit stage, confidence, FLOPs) and
``checkpoints/cascade.pt``. ``experiments.runs.load_run(<run folder>)`` loads the calibrated cascade
with its frontier (what the evaluation and the server do).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import hydra
import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import experiments  # noqa: F401  (sets PROJECT_ROOT)
from cascades.calibrate import CascadeRecords, collect, fit_temperatures
from cascades.model import IDKCascade
from experiments.data import batches_to_tensor
from experiments.report import machine_info, markdown_table, pick_device, write_csv
from experiments.runs import CHECKPOINTS, output_dir, write_run_record
from experiments.stats import mean_interval, wilson_interval
from experiments.utils import Stopwatch, extras, run_hydra, user_facing
from gating.calibration import CalibrationReport
from gating.cost import StageCosts, measure_interleaved
from gating.thresholds import OperatingPoint, ThresholdSearch, accuracy_floor, exit_stages

log = logging.getLogger(__name__)


@dataclass
class Fitted:
    """A cascade fitted on val: temperatures, records of both splits, stage costs and the chosen point."""

    calibration: list[CalibrationReport]
    val: CascadeRecords
    test: CascadeRecords
    costs: StageCosts
    reference: int
    search: ThresholdSearch
    floor: float
    point: OperatingPoint


@user_facing
def run_cascade(cfg: DictConfig) -> dict[str, Any]:
    """Calibrate, search, verify and time the configured cascade; returns the run record."""
    pl.seed_everything(cfg.seed, workers=True)
    device = pick_device(cfg.get("device", "auto"))
    watch, out = Stopwatch(), output_dir()
    datamodule = instantiate(cfg.data)
    cascade: IDKCascade = instantiate(cfg.cascade).to(device).eval()
    fit = fit_cascade(cfg, cascade, datamodule, device, watch)
    cascade.set_thresholds(fit.point.thresholds)
    result = verify(fit.test, fit.point.thresholds, fit.costs, fit.reference, cfg.confidence_level)
    frontier = trace_frontier(cfg, fit, cascade.names)
    # Wall time of the compacted cascade on one big test batch against the expected-cost prediction.
    latency = measure_wall_time(cascade, datamodule, device, fit.point.reach, cfg.latency) \
        if cfg.latency.enabled else None
    stage_rows = _stage_rows(cascade, fit)
    ckpt = write_outputs(out, cascade, fit, stage_rows, frontier)
    record = {
        "task": cfg.task_name, "run_name": cfg.get("run_name"), "output_dir": str(out), "cascade": cascade.name,
        "stages": stage_rows, "stage_flops": fit.costs.to_dict(), "reference_stage": cascade.names[fit.reference],
        "operating_point": {"val": point_summary(fit.point, cascade.names), "test": result},
        "calibration": [c.__dict__ for c in fit.calibration], "frontier": frontier, "latency": latency,
        "metrics": _metrics(fit, result, latency), "checkpoints": {"cascade": str(ckpt)}, "timings": watch.times,
        "machine": machine_info(device),
    }
    write_run_record(cfg, record)
    print_summary(record)
    return record


def fit_cascade(cfg: DictConfig, cascade: IDKCascade, datamodule: Any, device: torch.device,
                watch: Stopwatch) -> Fitted:
    """Temperature scaling per stage (val), every stage on every sample of val and test, and the exact
    least-cost thresholds whose val accuracy is within ``search.epsilon`` of the reference stage's."""
    with watch("calibrate_s"):
        calib = fit_temperatures(cascade, datamodule.val_dataloader(), device, cfg.calibration.n_bins) \
            if cfg.calibration.temperature_scaling else []
    with watch("collect_s"):
        val = collect(cascade, datamodule.val_dataloader(), device)
        test = collect(cascade, datamodule.test_dataloader(), device)
    example = next(iter(datamodule.test_dataloader()))[0][:1].to(device)
    costs = cascade.stage_costs(example)
    val_acc = val.stage_accuracy()
    ref = int(np.argmax(val_acc)) if cfg.search.reference == "best" else cascade.num_stages - 1
    search = ThresholdSearch(costs.stage, max_candidates=cfg.search.max_candidates)
    floor = accuracy_floor(val_acc[ref], cfg.search.epsilon, cfg.search.relative)
    with watch("search_s"):
        op = search.fit(val.confidences(), val.correct, floor)
    if not op.feasible:
        log.warning("no thresholds reach validation accuracy %.4f; using the most accurate found (%.4f)", floor,
                    op.accuracy)
    return Fitted(calib, val, test, costs, ref, search, floor, op)


def trace_frontier(cfg: DictConfig, fit: Fitted, names: Sequence[str]) -> list[dict[str, Any]]:
    """One operating point per epsilon of ``search.frontier_epsilons``, chosen on val, scored on test."""
    rows = []
    ref_acc = fit.val.stage_accuracy()[fit.reference]
    for eps in cfg.search.frontier_epsilons:
        p = fit.search.fit(fit.val.confidences(), fit.val.correct, accuracy_floor(ref_acc, eps, cfg.search.relative))
        t = verify(fit.test, p.thresholds, fit.costs, fit.reference, cfg.confidence_level)
        rows.append({"epsilon": eps, "feasible": p.feasible, "thresholds": p.to_dict()["thresholds"],
                     "val_acc": p.accuracy, "val_gflops_per_img": p.expected_cost / 1e9,
                     "test_acc": t["accuracy"], "test_gflops_per_img": t["expected_cost"] / 1e9,
                     "test_cost_cut_pct": t["cost_cut_pct"], **{f"test_exit_{n}": e for n, e in zip(names, t["exit"])}})
    return rows


def verify(records: CascadeRecords, thresholds: Sequence[float], costs: StageCosts,
           reference_stage: int, level: float = 0.95) -> dict[str, Any]:
    """Score thresholds on held-out records: accuracy and expected cost with confidence intervals,
    and the paired accuracy difference to the reference stage alone."""
    correct = records.correct
    n = correct.shape[1]
    exits = exit_stages(records.confidences(), thresholds)
    hit = correct[exits, np.arange(n)]
    per_sample = costs.per_sample(torch.from_numpy(exits))
    ref = correct[reference_stage]
    diff = torch.from_numpy(hit.astype(np.float64) - ref.astype(np.float64))
    op = ThresholdSearch(costs.stage).evaluate(records.confidences(), correct, thresholds)
    # The reference is that model run alone (what the cascade replaces), not the stages before it too.
    ref_cost = float(costs.stage[reference_stage])
    return {
        "n": n,
        "accuracy": float(hit.mean()),
        "accuracy_ci": list(wilson_interval(int(hit.sum()), n, level)),
        "reference_accuracy": float(ref.mean()),
        "accuracy_delta_pts": 100.0 * float(diff.mean()),
        "accuracy_delta_pts_ci": [100.0 * v for v in mean_interval(diff, level)],
        "expected_cost": float(per_sample.mean()),
        "expected_cost_ci": list(mean_interval(per_sample, level)),
        "reference_cost": ref_cost,
        "cost_cut_pct": 100.0 * (1.0 - float(per_sample.mean()) / ref_cost) if ref_cost else 0.0,
        "reach": list(op.reach),
        "exit": list(op.exit),
        "confidence_level": level,
    }


def point_summary(op: OperatingPoint, names: Sequence[str]) -> dict[str, Any]:
    """An operating point as a flat dict keyed by stage names."""
    d = op.to_dict()
    d["reach"] = dict(zip(names, op.reach))
    d["exit"] = dict(zip(names, op.exit))
    return d


def _stage_rows(cascade: IDKCascade, fit: Fitted) -> list[dict[str, Any]]:
    calib = fit.calibration
    return [{"stage": n, "gflops_per_img": c / 1e9, "val_acc": va, "test_acc": ta,
             "temperature": float(cascade.temperatures[k]),
             "val_ece_before": calib[k].ece_before if calib else None,
             "val_ece_after": calib[k].ece_after if calib else None}
            for k, (n, c, va, ta) in enumerate(zip(cascade.names, fit.costs.stage, fit.val.stage_accuracy(),
                                                   fit.test.stage_accuracy()))]


def _metrics(fit: Fitted, result: dict[str, Any], latency: dict[str, Any] | None) -> dict[str, float]:
    metrics = {
        "test/acc": result["accuracy"],
        "test/acc_ci_low": result["accuracy_ci"][0],
        "test/acc_ci_high": result["accuracy_ci"][1],
        "test/acc_delta_pts": result["accuracy_delta_pts"],
        "test/gflops_per_img": result["expected_cost"] / 1e9,
        "test/gflops_per_img_ci_low": result["expected_cost_ci"][0] / 1e9,
        "test/gflops_per_img_ci_high": result["expected_cost_ci"][1] / 1e9,
        "test/flops_cut_pct": result["cost_cut_pct"],
        "val/acc": fit.point.accuracy,
        "val/acc_floor": fit.floor,
        "val/gflops_per_img": fit.point.expected_cost / 1e9,
        "reference/test_acc": result["reference_accuracy"],
        "reference/gflops_per_img": result["reference_cost"] / 1e9,
    }
    if latency:
        metrics.update({f"latency/{k}": v for k, v in latency.items() if isinstance(v, (int, float))})
    return metrics


def write_outputs(out: Path, cascade: IDKCascade, fit: Fitted, stage_rows: list[dict[str, Any]],
                  frontier: list[dict[str, Any]]) -> Path:
    """``predictions.csv``, ``stages.csv``, ``frontier.csv`` and ``checkpoints/cascade.pt``; returns the latter."""
    test_exits = exit_stages(fit.test.confidences(), fit.point.thresholds)
    write_predictions(out / "predictions.csv", fit.test, test_exits, fit.costs)
    write_csv(out / "stages.csv", stage_rows)
    write_csv(out / "frontier.csv", frontier)
    ckpt = out / CHECKPOINTS / "cascade.pt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"cascade.{k}": v for k, v in cascade.state_dict().items()},
                "names": list(cascade.names), "thresholds": fit.point.to_dict()["thresholds"]}, ckpt)
    return ckpt


def measure_wall_time(cascade: IDKCascade, datamodule: Any, device: torch.device, reach_val: tuple[float, ...],
                      cfg: DictConfig) -> dict[str, Any]:
    """Time the compacted cascade on one batch of ``cfg.batch_size`` test images against its prediction.

    The prediction is what the expected cost says the batch takes: ``sum_k T_k(n * P(reach k))``, stage
    ``k`` (with its IDK decision) timed alone on the sub-batch it is expected to get, ``P(reach k)``
    from validation. Each stage is also timed on the whole batch (``stage_full_batch_ms``), and the
    prediction is repeated with the reach rates this batch really had (``predicted_batch_reach_ms``).
    """
    x, _ = batches_to_tensor(datamodule.test_dataloader(), cfg.batch_size)
    x = x.to(device)
    n = len(x)
    if n < cfg.batch_size:
        log.warning("the test split has %d images, fewer than latency.batch_size=%d", n, cfg.batch_size)
    with torch.no_grad():
        exits = cascade(x).exit_stage.cpu()
    batch_reach = [float((exits >= i).float().mean()) for i in range(cascade.num_stages)]
    expected_rows = [max(1, round(n * r)) if r > 0 else 0 for r in reach_val]
    batch_rows = [max(1, round(n * r)) if r > 0 else 0 for r in batch_reach]
    fns: dict[str, Any] = {"cascade": lambda: cascade(x)}
    for k, name in enumerate(cascade.names):
        fns[f"full:{name}"] = _timed_stage(cascade, k, x)
        for rows in (expected_rows[k], batch_rows[k]):
            if rows and f"rows{rows}:{name}" not in fns:
                fns[f"rows{rows}:{name}"] = _timed_stage(cascade, k, x[:rows])
    stats = measure_interleaved(fns, device, warmup=cfg.warmup, repeats=cfg.repeats, max_seconds=cfg.max_seconds)
    return _wall_time_summary(cascade.names, stats, n, device, expected_rows, batch_rows, batch_reach)


def _timed_stage(cascade: IDKCascade, k: int, xs: torch.Tensor):
    """Stage ``k`` with its IDK decision on ``xs``, as one timed call."""
    def run() -> None:
        _, probs, features = cascade.run_stage(k, xs)
        if k < cascade.num_stages - 1:
            cascade.decide(k, probs, features)
    return run


def _wall_time_summary(names: Sequence[str], stats: dict[str, Any], n: int, device: torch.device,
                       expected_rows: list[int], batch_rows: list[int], batch_reach: list[float]) -> dict[str, Any]:
    def predict(rows: list[int]) -> float:
        return sum(stats[f"rows{r}:{name}"].median_ms for r, name in zip(rows, names) if r)

    predicted, predicted_batch = predict(expected_rows), predict(batch_rows)
    measured = stats["cascade"].median_ms
    last_alone = stats[f"full:{names[-1]}"].median_ms
    return {
        "batch_size": n,
        "device": str(device),
        "expected_rows": dict(zip(names, expected_rows)),
        "batch_rows": dict(zip(names, batch_rows)),
        "stage_full_batch_ms": {name: stats[f"full:{name}"].median_ms for name in names},
        "stage_expected_rows_ms": {name: stats[f"rows{r}:{name}"].median_ms if r else 0.0
                                   for r, name in zip(expected_rows, names)},
        "last_stage_alone_ms": last_alone,
        "measured_ms": measured,
        "measured_p10_ms": stats["cascade"].p10_ms,
        "measured_p90_ms": stats["cascade"].p90_ms,
        "predicted_ms": predicted,
        "prediction_error_pct": 100.0 * (measured - predicted) / predicted,
        "predicted_batch_reach_ms": predicted_batch,
        "prediction_error_batch_reach_pct": 100.0 * (measured - predicted_batch) / predicted_batch,
        "speedup_vs_last_stage": last_alone / measured,
        "repeats": stats["cascade"].repeats,
        "batch_reach": batch_reach,
    }


def write_predictions(path: Path, records: Any, exits: np.ndarray, costs: StageCosts) -> None:
    n = len(records.labels)
    logits = torch.stack(records.logits)  # [K, n, C]
    idx = torch.from_numpy(exits)
    chosen = logits[idx, torch.arange(n)]
    probs = chosen.softmax(-1)
    flops = costs.per_sample(idx)
    rows = [{"index": i, "label": int(records.labels[i]), "pred": int(chosen[i].argmax()),
             "correct": int(chosen[i].argmax() == records.labels[i]), "exit_stage": int(exits[i]),
             "confidence": float(probs[i].max()), "flops": float(flops[i])} for i in range(n)]
    write_csv(path, rows)


def print_summary(record: dict[str, Any]) -> None:
    m = record["metrics"]
    print(f"\ncascade {record['cascade']} (reference stage: {record['reference_stage']})")
    print(markdown_table(record["stages"], ["stage", "gflops_per_img", "val_acc", "test_acc", "temperature"]))
    t = record["operating_point"]["test"]
    print(f"\ntest: acc {m['test/acc']:.4f} [{m['test/acc_ci_low']:.4f}, {m['test/acc_ci_high']:.4f}] "
          f"({m['test/acc_delta_pts']:+.2f} pts vs reference {m['reference/test_acc']:.4f}); "
          f"{m['test/gflops_per_img']:.5f} GFLOPs/img = {m['test/flops_cut_pct']:.1f}% less than the reference; "
          f"exit shares {[round(e, 4) for e in t['exit']]}")
    if record.get("latency"):
        lat = record["latency"]
        print(f"wall time, batch {lat['batch_size']} on {lat['device']}: measured {lat['measured_ms']:.1f} ms, "
              f"predicted {lat['predicted_ms']:.1f} ms ({lat['prediction_error_pct']:+.1f}%); "
              f"{lat['speedup_vs_last_stage']:.2f}x faster than the last stage alone")
    print("\nfrontier (thresholds from val, scored on test):")
    print(markdown_table(record["frontier"], ["epsilon", "val_acc", "test_acc", "test_gflops_per_img",
                                              "test_cost_cut_pct"]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="cascade.yaml")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    run_cascade(cfg)


if __name__ == "__main__":
    run_hydra(main)
