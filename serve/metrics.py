"""The serving engine's Prometheus metrics, labelled by model: one set can serve every engine of a server."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["MS_BUCKETS", "EngineMetrics", "ModelMetrics"]

MS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class EngineMetrics:
    """Prometheus metrics, labelled by model: one instance can be shared by every engine of a server."""

    registry: CollectorRegistry
    queue_depth: Gauge
    queue_wait: Histogram
    batch_size: Histogram
    batch_seconds: Histogram
    exits: Counter
    blocks: Histogram
    latency: Histogram
    requests: Counter
    slo: Counter
    triage_level: Gauge
    degraded: Counter
    rejected: Counter
    flops: Counter
    loop_lag: Gauge
    shed: Counter
    cancelled: Counter
    triage_changes: Counter
    int8_ops: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> EngineMetrics:
        r = registry or CollectorRegistry()
        return cls(
            r,
            Gauge("serve_queue_depth", "Rows waiting, per model and stage", ["model", "stage"], registry=r),
            Histogram("serve_queue_wait_seconds", "Time a row waited in a stage's queue", ["model", "stage"],
                      buckets=MS_BUCKETS, registry=r),
            Histogram("serve_batch_size", "Rows per executed batch", ["model", "stage"],
                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r),
            Histogram("serve_batch_seconds", "Execution time of a batch", ["model", "stage"], buckets=MS_BUCKETS,
                      registry=r),
            Counter("serve_exits_total", "Inputs answered at each stage", ["model", "stage"], registry=r),
            Histogram("serve_blocks_executed", "Residual blocks executed per input (SkipNet)", ["model"],
                      buckets=tuple(range(0, 160, 4)), registry=r),
            Histogram("serve_request_latency_seconds", "Arrival to answer, per input", ["model"], buckets=MS_BUCKETS,
                      registry=r),
            Counter("serve_answers_total", "Answered inputs by status", ["model", "status"], registry=r),
            Counter("serve_slo_total", "Answered inputs within (met=yes) or past (met=no) the objective",
                    ["model", "met"], registry=r),
            Gauge("serve_triage_level", "Current triage level (0 = off)", ["model"], registry=r),
            Counter("serve_degraded_total", "Inputs answered at a triage level above 0", ["model"], registry=r),
            Counter("serve_rejected_total", "Inputs rejected because the queue was full", ["model"], registry=r),
            Counter("serve_flops_total", "FLOPs spent on answered inputs", ["model"], registry=r),
            Gauge("serve_event_loop_lag_seconds", "How late the front end's event loop runs (recent max)",
                  registry=r),
            Counter("serve_shed_total", "Requests answered 503 before parsing because the front end lagged",
                    registry=r),
            Counter("serve_cancelled_total", "Inputs withdrawn before they were computed: their client went away",
                    ["model"], registry=r),
            Counter("serve_triage_changes_total", "Triage level changes (direction up or down; reasons at "
                    "GET /v2/settings)", ["model", "direction"], registry=r),
            Counter("serve_int8_ops_total", "Int8 operations spent on answered inputs (not in serve_flops_total)",
                    ["model"], registry=r),
        )

    def bind(self, model: str, num_stages: int) -> ModelMetrics:
        """The children of one model (and each of its stages), looked up once: ``labels()`` takes a lock
        and builds a key on every call, which the engine would otherwise pay several times per input."""
        stages = [str(k) for k in range(num_stages)]

        def per_stage(metric) -> list[Any]:
            return [metric.labels(model, s) for s in stages]

        return ModelMetrics(
            per_stage(self.queue_depth), per_stage(self.queue_wait), per_stage(self.batch_size),
            per_stage(self.batch_seconds), per_stage(self.exits), self.blocks.labels(model),
            self.latency.labels(model),
            {s: self.requests.labels(model, s) for s in ("ok", "deadline_exceeded", "error")},
            {m: self.slo.labels(model, m) for m in ("yes", "no")}, self.triage_level.labels(model),
            self.degraded.labels(model), self.rejected.labels(model), self.flops.labels(model),
            self.cancelled.labels(model), {d: self.triage_changes.labels(model, d) for d in ("up", "down")},
            self.int8_ops.labels(model))


@dataclass
class ModelMetrics:
    """One model's metric children (:meth:`EngineMetrics.bind`); per-stage ones are lists by stage."""

    queue_depth: list[Any]
    queue_wait: list[Any]
    batch_size: list[Any]
    batch_seconds: list[Any]
    exits: list[Any]
    blocks: Any
    latency: Any
    answers: dict[str, Any]
    slo: dict[str, Any]
    triage_level: Any
    degraded: Any
    rejected: Any
    flops: Any
    cancelled: Any
    triage_changes: dict[str, Any]
    int8_ops: Any
