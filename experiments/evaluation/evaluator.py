"""The one evaluator: every model on every test input, with exact FLOPs and measured latency.

Models come as adapters (:mod:`gating.adapters`), the same ones the server runs. For each model's
main operating point (its first) it keeps a record per input (label, prediction, correct, confidence,
FLOPs, exit stage or blocks executed, batch-1 latency, share of batch time); for every operating point
it keeps accuracy, mean FLOPs and the measured time per input at the evaluation batch size. Records
are written as CSV so every table and figure can be recomputed without the models.

Latency is measured, never estimated from FLOPs: batch 1 times each input alone (after a warm-up,
median of ``repeats``); the batch figure times whole batches with real skipping and compaction, and
gives each input the share of its batch's time in proportion to its FLOPs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gating.adapters import BatchResult, ModelAdapter, Point
from gating.cost import is_quantized, measure_latency
from gating.errors import UserError
from skipnet import RandomSkipAdapter

log = logging.getLogger(__name__)

__all__ = ["EvaluationResult", "evaluate_models", "run_all"]


@dataclass
class EvaluationResult:
    """``records``: one dict per (model, input) at the main point; ``points``: one per operating point;
    ``outputs``: each model's outputs at its main point."""

    records: list[dict[str, Any]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, BatchResult] = field(default_factory=dict)


@torch.no_grad()
def run_all(model: ModelAdapter, x: torch.Tensor, batch_size: int, point: Point | None = None) -> BatchResult:
    """Run ``model`` over ``x`` in batches; outputs gathered on the CPU."""
    parts = [model.run(x[i:i + batch_size], point) for i in range(0, len(x), batch_size)]

    def cat(name: str) -> torch.Tensor | None:
        return torch.cat([getattr(p, name).cpu() for p in parts]) if getattr(parts[0], name) is not None else None

    return BatchResult(cat("logits"), cat("flops"), cat("exit_stage"), cat("executed"), cat("int8_ops"))


def _batch_ms_per_input(model: ModelAdapter, x: torch.Tensor, batch_size: int, device: torch.device,
                        repeats: int, max_seconds: float, point: Point) -> tuple[float, list[float]]:
    """Median time of one batch, per batch; returns (ms per input over the set, per-batch medians)."""
    per_batch = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        stats = measure_latency(lambda xb=xb: model.run(xb, point), device, warmup=1, repeats=repeats,
                                max_seconds=max_seconds, min_repeats=1)
        per_batch.append(stats.median_ms)
    return sum(per_batch) / len(x), per_batch


def _batch1_ms(model: ModelAdapter, x: torch.Tensor, n: int, device: torch.device, warmup: int, repeats: int,
               point: Point) -> np.ndarray:
    out = np.full(len(x), np.nan)
    with torch.no_grad():
        for i in range(min(warmup, len(x))):
            model.run(x[i:i + 1], point)
    for i in range(min(n, len(x))):
        xi = x[i:i + 1]
        out[i] = measure_latency(lambda xi=xi: model.run(xi, point), device, warmup=0, repeats=repeats).median_ms
    return out


def _match_random_skip(model: RandomSkipAdapter, res: EvaluationResult, names: list[str]) -> None:
    target = res.outputs.get(model.match_name or "")
    if target is None or target.executed is None:
        raise UserError(f"random-skip model {model.name!r} matches {model.match_name!r}, which must be one of the "
                        f"SkipNet models evaluated (models: {names})")
    model.match(target.executed)


def _point_row(model: ModelAdapter, point: Point, out: BatchResult, labels: torch.Tensor) -> dict[str, Any]:
    correct = out.logits.argmax(-1) == labels
    row: dict[str, Any] = {
        "method": model.name, "kind": model.kind, "point": point.label,
        "acc": float(correct.float().mean()),
        "gflops_per_img": float(out.flops.mean()) / 1e9,
        "gflops_p95": float(torch.quantile(out.flops, 0.95)) / 1e9,
    }
    if out.int8_ops is not None:  # int8 operations are not float FLOPs: counted apart, per input
        row["int8_gops_per_img"] = float(out.int8_ops.mean()) / 1e9
        row["int8_gops_p95"] = float(torch.quantile(out.int8_ops, 0.95)) / 1e9
    if out.executed is not None:
        row["blocks_per_img"] = float(out.executed.sum(1).mean())
    if out.exit_stage is not None:
        row["exit_shares"] = [round(float((out.exit_stage == s).float().mean()), 4) for s in range(model.num_stages)]
    return row


def _input_records(model: ModelAdapter, out: BatchResult, labels: torch.Tensor, b1: np.ndarray,
                   share: np.ndarray) -> list[dict[str, Any]]:
    probs = out.logits.float().softmax(-1)
    correct = probs.argmax(-1) == labels
    return [{
        "method": model.name, "kind": model.kind, "index": i, "label": int(labels[i]),
        "pred": int(probs[i].argmax()), "correct": int(correct[i]),
        "confidence": float(probs[i].max()), "flops": float(out.flops[i]),
        "int8_ops": float(out.int8_ops[i]) if out.int8_ops is not None else 0.0,
        "exit_stage": int(out.exit_stage[i]) if out.exit_stage is not None else -1,
        "blocks": float(out.executed[i].sum()) if out.executed is not None else math.nan,
        "pattern": "".join("1" if v else "0" for v in out.executed[i].tolist()) if out.executed is not None else "",
        "batch1_ms": float(b1[i]), "batch_share_ms": float(share[i]),
    } for i in range(len(labels))]


def _evaluate_point(model: ModelAdapter, point: Point, x: torch.Tensor, labels: torch.Tensor, device: torch.device,
                    batch_size: int, latency: Any, res: EvaluationResult) -> None:
    out = run_all(model, x, batch_size, point)
    row = _point_row(model, point, out, labels)
    per_batch: list[float] = []
    if latency.enabled:
        row["batch_ms_per_img"], per_batch = _batch_ms_per_input(model, x, batch_size, device, latency.batch_repeats,
                                                                 latency.max_seconds, point)
    if point is model.points[0]:  # the main point: per-input records
        res.outputs[model.name] = out
        nan = np.full(len(x), np.nan)
        b1, share = nan, nan
        if latency.enabled:
            n1 = latency.batch1_inputs if latency.batch1_inputs is not None else len(x)
            b1 = _batch1_ms(model, x, n1, device, latency.warmup, latency.repeats, point)
            row["batch1_ms_p50"], row["batch1_ms_mean"] = float(np.nanmedian(b1)), float(np.nanmean(b1))
            ops = out.flops + out.int8_ops if out.int8_ops is not None else out.flops  # an int8 model's work
            share = _shares(ops, per_batch, batch_size)
        res.records.extend(_input_records(model, out, labels, b1, share))
    res.points.append(row)
    log.info("%s %s: acc %.4f, %.5f GFLOPs/img", model.name, point.label, row["acc"], row["gflops_per_img"])


def evaluate_models(models: list[ModelAdapter], x: torch.Tensor, y: torch.Tensor, device: torch.device,
                    batch_size: int, latency: Any) -> EvaluationResult:
    """Evaluate every model at every operating point (the first with per-input records).

    ``latency``: ``enabled``, ``batch1_inputs`` (how many inputs to time at batch 1; all if null),
    ``warmup``, ``repeats``, ``batch_repeats``, ``max_seconds`` (per batch).
    """
    int8 = [m.name for m in models if any(is_quantized(n) for n in m.modules())]
    if int8 and device.type != "cpu":
        raise UserError(f"{int8} are int8 models, whose kernels run on the CPU only: evaluate with device=cpu")
    res = EvaluationResult()
    x, labels = x.to(device), y.cpu()
    names = [m.name for m in models]
    # Random skipping copies the rates of a SkipNet model, so it goes after the others.
    for model in sorted(models, key=lambda m: isinstance(m, RandomSkipAdapter)):
        model.to(device)
        if isinstance(model, RandomSkipAdapter) and model.rates is None:
            _match_random_skip(model, res, names)
        for point in model.points:
            _evaluate_point(model, point, x, labels, device, batch_size, latency, res)
        model.to(torch.device("cpu"))  # keep one model on the accelerator at a time
    return res


def _shares(flops: torch.Tensor, per_batch_ms: list[float], batch_size: int) -> np.ndarray:
    """Each input's share of its batch's time, in proportion to its operations (FLOPs, plus int8 ones)."""
    out = np.empty(len(flops))
    f = flops.double().numpy()
    for b, ms in enumerate(per_batch_ms):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        total = f[sl].sum()
        out[sl] = ms * f[sl] / total if total > 0 else ms / len(f[sl])
    return out
