"""The one evaluator: every method on every test input, with exact FLOPs and measured latency.

For each method's main operating point it keeps a record per input (label, prediction, correct,
confidence, FLOPs, exit stage or blocks executed, batch-1 latency, share of batch time); for every
operating point it keeps accuracy, mean FLOPs and the measured time per input at the evaluation batch
size. Records are written as CSV so every table and figure can be recomputed without the models.

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

from experiments.evaluation.methods import Method, MethodOutput, RandomSkipMethod
from gating.cost import measure_latency

log = logging.getLogger(__name__)

__all__ = ["EvaluationResult", "evaluate_methods", "run_all"]


@dataclass
class EvaluationResult:
    """``records``: one dict per (method, input) at the main point; ``points``: one per operating point."""

    records: list[dict[str, Any]] = field(default_factory=list)
    points: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, MethodOutput] = field(default_factory=dict)


@torch.no_grad()
def run_all(method: Method, x: torch.Tensor, batch_size: int, **point: Any) -> MethodOutput:
    """Run ``method`` over ``x`` in batches; outputs gathered on the CPU."""
    parts = [method.run(x[i:i + batch_size], **point) for i in range(0, len(x), batch_size)]
    cat = (lambda name: torch.cat([getattr(p, name).cpu() for p in parts])
           if getattr(parts[0], name) is not None else None)
    return MethodOutput(cat("logits"), cat("flops"), cat("exit_stage"), cat("executed"))


def _batch_ms_per_input(method: Method, x: torch.Tensor, batch_size: int, device: torch.device, repeats: int,
                        max_seconds: float, **point: Any) -> tuple[float, list[float]]:
    """Median time of one batch, per batch; returns (ms per input over the set, per-batch medians)."""
    per_batch = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        stats = measure_latency(lambda xb=xb: method.run(xb, **point), device, warmup=1, repeats=repeats,
                                max_seconds=max_seconds, min_repeats=1)
        per_batch.append(stats.median_ms)
    return sum(per_batch) / len(x), per_batch


def _batch1_ms(method: Method, x: torch.Tensor, n: int, device: torch.device, warmup: int, repeats: int,
               **point: Any) -> np.ndarray:
    out = np.full(len(x), np.nan)
    with torch.no_grad():
        for i in range(min(warmup, len(x))):
            method.run(x[i:i + 1], **point)
    for i in range(min(n, len(x))):
        xi = x[i:i + 1]
        out[i] = measure_latency(lambda xi=xi: method.run(xi, **point), device, warmup=0, repeats=repeats).median_ms
    return out


def evaluate_methods(methods: list[Method], x: torch.Tensor, y: torch.Tensor, device: torch.device,
                     batch_size: int, latency: Any) -> EvaluationResult:
    """Evaluate every method (main point with per-input records, other points as summaries).

    ``latency``: ``enabled``, ``batch1_inputs`` (how many inputs to time at batch 1; all if null),
    ``warmup``, ``repeats``, ``batch_repeats``, ``max_seconds`` (per batch).
    """
    res = EvaluationResult()
    x = x.to(device)
    labels = y.cpu()
    by_name: dict[str, Method] = {m.name: m for m in methods}
    # Random skipping copies the rates of a SkipNet method, so it goes after the others.
    for method in sorted(methods, key=lambda m: isinstance(m, RandomSkipMethod)):
        method.to(device)
        if isinstance(method, RandomSkipMethod) and method.rates is None:
            target = res.outputs.get(method.match_name or "")
            if target is None or target.executed is None:
                from gating.errors import UserError

                raise UserError(f"random-skip method {method.name!r} matches {method.match_name!r}, which must be "
                                f"one of the SkipNet methods evaluated (methods: {list(by_name)})")
            method.match(target.executed)
        for point in method.points:
            kwargs = {k: v for k, v in point.items() if k != "label"}
            out = run_all(method, x, batch_size, **kwargs)
            correct = (out.logits.argmax(-1) == labels)
            row: dict[str, Any] = {
                "method": method.name, "kind": method.kind, "point": point["label"],
                "acc": float(correct.float().mean()),
                "gflops_per_img": float(out.flops.mean()) / 1e9,
                "gflops_p95": float(torch.quantile(out.flops, 0.95)) / 1e9,
            }
            if out.executed is not None:
                row["blocks_per_img"] = float(out.executed.sum(1).mean())
            if out.exit_stage is not None:
                k = getattr(method, "num_stages", int(out.exit_stage.max()) + 1)
                row["exit_shares"] = [round(float((out.exit_stage == s).float().mean()), 4) for s in range(k)]
            if latency.enabled:
                ms_per_img, per_batch = _batch_ms_per_input(method, x, batch_size, device, latency.batch_repeats,
                                                            latency.max_seconds, **kwargs)
                row["batch_ms_per_img"] = ms_per_img
            is_main = point["label"] == method.main_point
            if is_main:
                res.outputs[method.name] = out
                b1 = _batch1_ms(method, x, latency.batch1_inputs if latency.batch1_inputs is not None else len(x),
                                device, latency.warmup, latency.repeats, **kwargs) \
                    if latency.enabled else np.full(len(x), np.nan)
                if latency.enabled:
                    row["batch1_ms_p50"] = float(np.nanmedian(b1))
                    row["batch1_ms_mean"] = float(np.nanmean(b1))
                share = _shares(out.flops, per_batch, batch_size) if latency.enabled else np.full(len(x), np.nan)
                probs = out.logits.float().softmax(-1)
                for i in range(len(x)):
                    res.records.append({
                        "method": method.name, "kind": method.kind, "index": i, "label": int(labels[i]),
                        "pred": int(probs[i].argmax()), "correct": int(correct[i]),
                        "confidence": float(probs[i].max()), "flops": float(out.flops[i]),
                        "exit_stage": int(out.exit_stage[i]) if out.exit_stage is not None else -1,
                        "blocks": float(out.executed[i].sum()) if out.executed is not None else math.nan,
                        "batch1_ms": float(b1[i]), "batch_share_ms": float(share[i]),
                    })
            res.points.append(row)
            log.info("%s %s: acc %.4f, %.5f GFLOPs/img", method.name, point["label"], row["acc"], row["gflops_per_img"])
        method.to(torch.device("cpu"))  # keep one model on the accelerator at a time
    return res


def _shares(flops: torch.Tensor, per_batch_ms: list[float], batch_size: int) -> np.ndarray:
    """Each input's share of its batch's time, in proportion to its FLOPs."""
    out = np.empty(len(flops))
    f = flops.double().numpy()
    for b, ms in enumerate(per_batch_ms):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        total = f[sl].sum()
        out[sl] = ms * f[sl] / total if total > 0 else ms / len(f[sl])
    return out
