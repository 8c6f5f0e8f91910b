"""The asyncio serving core: one model on one device, dynamic batching and re-batching per stage.

Each stage of the model has its own queue, ordered by priority, then earliest deadline. A batch for
stage ``k`` takes requests from that queue only. Inputs a cascade stage defers move to the next stage's
queue with their original deadline, and run there in one batch with the deferred inputs of other
requests. Only one batch runs at a time, on a single worker thread that owns the device, so the event
loop stays free to accept requests, answer expired ones and publish metrics.

- Batching: up to ``max_batch_size`` rows, waiting at most ``max_delay_ms`` for a batch to fill. In
  ``adaptive`` mode the batch size follows Clipper's AIMD on measured batch latency: add one while a
  batch takes less than ``target_batch_ms``, cut by 10% when it takes more.
- Deadlines: a request still unanswered at its deadline is answered at once with status
  ``deadline_exceeded`` (a timer, not after the running batch); its rows are dropped from the queues.
- Bounded queue: past ``max_queue`` queued rows, :meth:`ServingEngine.submit` raises
  :class:`QueueFull` with a ``retry_after_s`` hint; it never blocks.
- Triage: ``off``, ``on`` (a fixed level) or ``auto``. Auto raises the level when queue waiting, or
  the front end's event-loop lag (``front_lag_s``), threatens the latency objective, and lowers it
  with hysteresis when both have been calm for ``hold_s``.
- Exactly one answer per accepted request, and :meth:`ServingEngine.stop` drains in-flight work.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from serve.servable import Servable

log = logging.getLogger(__name__)

__all__ = ["Answer", "BatchingConfig", "DeviceWorker", "EngineClosed", "EngineMetrics", "QueueFull", "ServingEngine",
           "TriageConfig"]

MS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class QueueFull(Exception):
    """The queue is full: retry after ``retry_after_s`` seconds (HTTP 429)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"queue full; retry after {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down and accepts no new work (HTTP 503)."""


class DeviceWorker:
    """The one thread that runs every tensor computation for a device: model loading, warm-up and batches.

    All engines serving on one device share it, so batches of different models never compete for the
    cores. Keeping tensor work off the event loop's thread matters on CPUs too: once two threads
    have each run multi-threaded (OpenMP) ops, their thread pools contend. On 2 cores a batch-1
    ResNet-38 then took 11 ms instead of 2.6 ms.
    """

    def __init__(self, name: str = "device") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"serve-{name}")

    def run(self, fn, *args):
        """Run ``fn(*args)`` on the device thread and wait for it (for setup, outside the event loop)."""
        return self._pool.submit(fn, *args).result()

    async def call(self, fn, *args):
        """Await ``fn(*args)`` run on the device thread."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)


@dataclass
class BatchingConfig:
    """Batching knobs, changeable while serving."""

    max_batch_size: int = 64
    max_delay_ms: float = 2.0
    adaptive: bool = False
    target_batch_ms: float = 25.0     # adaptive: the batch latency AIMD aims under
    slo_ms: float = 100.0             # default deadline of a request, and the objective triage protects
    max_queue: int = 4096             # queued rows (all stages) before rejecting


@dataclass
class TriageConfig:
    """Triage knobs: ``mode`` off | on | auto; ``level`` used by ``on``; auto thresholds on the oldest
    queued row's wait as a fraction of ``slo_ms``, one level up at most every ``step_s``, one level down
    after ``hold_s`` of calm."""

    mode: str = "off"
    level: int = 1
    enter_wait_fraction: float = 0.3
    exit_wait_fraction: float = 0.1
    hold_s: float = 1.0
    step_s: float = 0.0               # auto: at least this long between two raises (0: at every batch)


@dataclass
class Answer:
    """The answer for one input."""

    status: str                      # ok | deadline_exceeded
    label: int | None = None
    confidence: float | None = None
    exit_stage: int | None = None
    blocks_executed: float | None = None
    flops: float = 0.0
    degraded: bool = False
    latency_ms: float = 0.0          # arrival in the engine to answer
    queue_ms: float = 0.0            # waiting in stage queues
    compute_ms: float = 0.0          # running the model on the batches it was in (device thread)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Row:
    x: torch.Tensor
    deadline: float
    priority: int
    arrival: float
    future: asyncio.Future
    seq: int
    stage: int = 0
    enqueued: float = 0.0
    flops: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    degraded: bool = False
    timer: asyncio.TimerHandle | None = None

    def key(self) -> tuple:
        return (-self.priority, self.deadline, self.seq)


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
        )


class ServingEngine:
    """Serve one :class:`~serve.servable.Servable` on one device (see the module docstring)."""

    def __init__(self, servable: Servable, batching: BatchingConfig | None = None,
                 triage: TriageConfig | None = None, device: torch.device | str = "cpu",
                 metrics: EngineMetrics | None = None, worker: DeviceWorker | None = None) -> None:
        self.servable = servable
        self.batching = batching or BatchingConfig()
        self.triage = triage or TriageConfig()
        self.device = torch.device(device)
        self.metrics = metrics or EngineMetrics.create()
        self._queues: list[list[tuple[tuple, _Row]]] = [[] for _ in range(servable.num_stages)]
        self._queued = 0
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._owns_worker = worker is None
        self.worker = worker or DeviceWorker(servable.name)
        self._closing = False
        self._running_batch = False
        self._batch_limit = [self.batching.max_batch_size] * servable.num_stages
        self._level = 0
        self._calm_since: float | None = None
        # The front end's own delay (seconds), which queue waits cannot see: set by the app to its
        # event-loop lag (serve.frontend.LoopLagMonitor); auto triage treats it as waiting.
        self.front_lag_s: Callable[[], float] = lambda: 0.0
        # (time, level) of each triage change; bounded, as servers run for days.
        self.level_changes: collections.deque[tuple[float, int]] = collections.deque(maxlen=1000)
        self._set_level(self._fixed_level())

    # ----------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=f"serve-{self.servable.name}")

    async def stop(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting work; with ``drain`` answer everything in flight first."""
        self._closing = True
        if drain:
            t_end = time.monotonic() + timeout_s
            while (self._queued or self._running_batch) and time.monotonic() < t_end:
                self._poke()
                await asyncio.sleep(0.005)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for q in self._queues:  # whatever is left (no drain, or drain timed out) is answered as expired
            for _, row in q:
                self._answer_expired(row)
            q.clear()
        self._queued = 0
        if self._owns_worker:
            self.worker.shutdown()

    @property
    def ready(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    @property
    def queue_depth(self) -> int:
        return self._queued

    @property
    def triage_level(self) -> int:
        return self._level

    # ----------------------------------------------------------------------------------- requests
    async def submit(self, x: torch.Tensor, deadline_ms: float | None = None, priority: int = 0) -> list[Answer]:
        """Queue a batch of inputs ``[n, *input_shape]``; returns one :class:`Answer` per input.

        Raises :class:`QueueFull` (retry later) or :class:`EngineClosed`.
        """
        if self._closing or self._task is None:
            raise EngineClosed(f"model {self.servable.name!r} is not serving")
        n = len(x)
        if self._queued + n > self.batching.max_queue:
            self.metrics.rejected.labels(self.servable.name).inc(n)
            raise QueueFull(self._retry_after())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + (deadline_ms if deadline_ms is not None else self.batching.slo_ms) / 1e3
        rows = []
        for i in range(n):
            row = _Row(x[i], deadline, priority, now, loop.create_future(), next(self._seq), enqueued=now)
            row.timer = loop.call_at(deadline, self._answer_expired, row)
            rows.append(row)
            self._push(0, row)
        self._poke()
        return list(await asyncio.gather(*(r.future for r in rows)))

    def _retry_after(self) -> float:
        # Time to work off the queue at the recent batch pace, at least one delay period.
        return max(self.batching.max_delay_ms / 1e3, self._queued * self._ms_per_row_estimate() / 1e3)

    def _ms_per_row_estimate(self) -> float:
        return getattr(self, "_last_ms_per_row", 1.0)

    def _push(self, stage: int, row: _Row) -> None:
        row.stage = stage
        row.enqueued = time.monotonic()
        heapq.heappush(self._queues[stage], (row.key(), row))
        self._queued += 1
        self.metrics.queue_depth.labels(self.servable.name, str(stage)).set(len(self._queues[stage]))

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _answer_expired(self, row: _Row) -> None:
        if row.future.done():
            return
        now = time.monotonic()
        row.future.set_result(Answer("deadline_exceeded", flops=row.flops, degraded=row.degraded,
                                     latency_ms=(now - row.arrival) * 1e3, queue_ms=row.queue_s * 1e3,
                                     compute_ms=row.compute_s * 1e3))
        name = self.servable.name
        self.metrics.requests.labels(name, "deadline_exceeded").inc()
        self.metrics.slo.labels(name, "no").inc()

    # ----------------------------------------------------------------------------------- scheduling
    def _pop_batch(self, stage: int) -> list[_Row]:
        q = self._queues[stage]
        out: list[_Row] = []
        limit = max(1, self._batch_limit[stage])
        while q and len(out) < limit:
            _, row = heapq.heappop(q)
            self._queued -= 1
            if not row.future.done():  # an expired row was already answered: drop it
                out.append(row)
        self.metrics.queue_depth.labels(self.servable.name, str(stage)).set(len(q))
        return out

    def _pick_stage(self, now: float) -> tuple[int | None, float]:
        """The stage to run now (ready queue whose head is most urgent), or the time to look again."""
        best, best_key, wake_at = None, None, math.inf
        delay = self.batching.max_delay_ms / 1e3
        for k, q in enumerate(self._queues):
            while q and q[0][1].future.done():  # expired heads
                heapq.heappop(q)
                self._queued -= 1
            if not q:
                continue
            head = q[0][1]
            ready_at = head.enqueued + delay  # the head is the most urgent row, and with one priority the oldest
            full = len(q) >= self._batch_limit[k]
            # Waiting longer than the head's deadline allows would only expire it.
            urgent = head.deadline - now <= 2 * delay
            if full or urgent or now >= ready_at or self._closing:
                if best_key is None or head.key() < best_key:
                    best, best_key = k, head.key()
            else:
                wake_at = min(wake_at, ready_at)
        return best, wake_at

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            stage, wake_at = self._pick_stage(now)
            if stage is None:
                self._wake.clear()
                timeout = None if math.isinf(wake_at) else max(0.0, wake_at - now)
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            rows = self._pop_batch(stage)
            if not rows:
                continue
            self._running_batch = True
            try:
                await self._run_batch(loop, stage, rows)
            except Exception as e:  # a failing batch answers its rows with the error and the server goes on
                log.exception("batch of %d rows at stage %d failed", len(rows), stage)
                for r in rows:
                    if not r.future.done():
                        r.future.set_exception(e)
                        if r.timer:
                            r.timer.cancel()
            finally:
                self._running_batch = False

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, stage: int, rows: list[_Row]) -> None:
        name, level = self.servable.name, self._level
        start = time.monotonic()
        for r in rows:
            r.queue_s += start - r.enqueued
            self.metrics.queue_wait.labels(name, str(stage)).observe(start - r.enqueued)
        res, conf, label, compute_s = await self.worker.call(self._execute, stage, [r.x for r in rows], level)
        batch_s = time.monotonic() - start
        self._after_batch(stage, len(rows), batch_s)
        conf, label = conf.tolist(), label.tolist()
        done = res.done.tolist()
        now = time.monotonic()
        for i, r in enumerate(rows):
            r.flops += float(res.flops[i])
            r.compute_s += compute_s
            r.degraded = r.degraded or level > 0
            if r.future.done():  # answered as expired while the batch ran
                continue
            if done[i]:
                self._answer(r, Answer(
                    "ok", label[i], conf[i], stage,
                    float(res.blocks[i]) if res.blocks is not None else None, r.flops, r.degraded,
                    (now - r.arrival) * 1e3, r.queue_s * 1e3, r.compute_s * 1e3), stage)
            else:
                r.x = res.next_x[i] if res.next_x is not None else r.x
                self._push(stage + 1, r)
        self._update_triage(now)

    def _execute(self, stage: int, rows: list[torch.Tensor], level: int):
        """On the device thread: batch the rows, run the stage, and reduce the answers; also returns the
        seconds the model took on the stacked batch (what calling it directly would cost; stacking and
        moving the rows count as the engine's own overhead)."""
        with torch.inference_mode():
            x = torch.stack(rows).to(self.device, non_blocking=True)
            t0 = time.perf_counter()
            res = self.servable.stage(stage, x, level)
            conf, label = res.logits.float().softmax(-1).max(-1)
            if res.next_x is not None:
                res.next_x = res.next_x.cpu()
            res.done, res.flops = res.done.cpu(), res.flops.cpu()
            if res.blocks is not None:
                res.blocks = res.blocks.cpu()
            conf, label = conf.cpu(), label.cpu()  # synchronises a GPU, so the time below is complete
        return res, conf, label, time.perf_counter() - t0

    def _answer(self, row: _Row, answer: Answer, stage: int) -> None:
        if row.timer:
            row.timer.cancel()
        row.future.set_result(answer)
        name = self.servable.name
        m = self.metrics
        m.requests.labels(name, "ok").inc()
        m.exits.labels(name, str(stage)).inc()
        m.latency.labels(name).observe(answer.latency_ms / 1e3)
        m.slo.labels(name, "yes" if answer.latency_ms <= self.batching.slo_ms else "no").inc()
        m.flops.labels(name).inc(answer.flops)
        if answer.blocks_executed is not None:
            m.blocks.labels(name).observe(answer.blocks_executed)
        if answer.degraded:
            m.degraded.labels(name).inc()

    def _after_batch(self, stage: int, n: int, batch_s: float) -> None:
        name = self.servable.name
        self.metrics.batch_size.labels(name, str(stage)).observe(n)
        self.metrics.batch_seconds.labels(name, str(stage)).observe(batch_s)
        self._last_ms_per_row = batch_s * 1e3 / n
        b = self.batching
        if b.adaptive:  # Clipper's AIMD on measured batch latency
            limit = self._batch_limit[stage]
            if batch_s * 1e3 > b.target_batch_ms:
                limit = max(1, int(limit * 0.9))
            elif n >= limit:
                limit = min(b.max_batch_size, limit + 1)
            self._batch_limit[stage] = limit
        else:
            self._batch_limit[stage] = b.max_batch_size

    # ----------------------------------------------------------------------------------- triage
    def _fixed_level(self) -> int:
        if self.triage.mode == "on":
            return max(0, min(self.triage.level, len(self.servable.levels) - 1))
        return 0

    def _set_level(self, level: int) -> None:
        if level != self._level or not self.level_changes:
            self.level_changes.append((time.monotonic(), level))
        self._level = level
        self.metrics.triage_level.labels(self.servable.name).set(level)

    def _update_triage(self, now: float) -> None:
        if self.triage.mode != "auto":
            return
        # How long the most urgent queued rows have waited in their queue: the threat to the objective
        # (a row just deferred to the next stage has not waited, whatever its own service time).
        oldest = min((q[0][1].enqueued for q in self._queues if q), default=now)
        # Requests still waiting for the front end are as late as its event loop.
        wait_ms = max(now - oldest, self.front_lag_s()) * 1e3
        slo = self.batching.slo_ms
        top = len(self.servable.levels) - 1
        if wait_ms > self.triage.enter_wait_fraction * slo:
            self._calm_since = None
            last_change = self.level_changes[-1][0] if self.level_changes else -math.inf
            if self._level < top and now - last_change >= self.triage.step_s:
                self._set_level(self._level + 1)
        elif wait_ms < self.triage.exit_wait_fraction * slo:
            if self._calm_since is None:
                self._calm_since = now
            elif now - self._calm_since >= self.triage.hold_s and self._level > 0:
                self._set_level(self._level - 1)
                self._calm_since = now
        else:
            self._calm_since = None

    # ----------------------------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"batching": asdict(self.batching), "triage": asdict(self.triage), "triage_level": self._level,
                "batch_limits": list(self._batch_limit),
                "triage_changes": [{"s_ago": round(now - t, 3), "level": lv}
                                   for t, lv in list(self.level_changes)[-100:]]}

    def update(self, batching: dict[str, Any] | None = None, triage: dict[str, Any] | None = None) -> dict[str, Any]:
        """Change knobs while serving; unknown keys or bad values raise ``ValueError``."""
        new = {}
        for obj, changes in ((self.batching, batching or {}), (self.triage, triage or {})):
            values = dict(vars(obj))
            for k, v in changes.items():
                if k not in values:
                    raise ValueError(f"unknown setting {k!r}; known: {sorted(values)}")
                values[k] = v if isinstance(v, type(values[k])) else type(values[k])(v)
            new[id(obj)] = type(obj)(**values)
        b, t = new[id(self.batching)], new[id(self.triage)]
        if t.mode not in ("off", "on", "auto"):
            raise ValueError(f"triage mode must be off, on or auto, got {t.mode!r}")
        if b.max_batch_size < 1 or b.max_delay_ms < 0 or b.max_queue < 1 or b.slo_ms <= 0:
            raise ValueError("max_batch_size and max_queue must be >= 1, max_delay_ms >= 0 and slo_ms > 0")
        self.batching, self.triage = b, t  # validated first, so a bad request changes nothing
        if self.triage.mode != "auto":
            self._set_level(self._fixed_level())
        self._batch_limit = [min(b, self.batching.max_batch_size) if self.batching.adaptive
                             else self.batching.max_batch_size for b in self._batch_limit]
        self._poke()
        return self.settings()
