"""The asyncio serving core: one model adapter on one device, dynamic batching and re-batching per stage.

Each stage of the model has its own queue, ordered by priority, then earliest deadline. A batch for
stage ``k`` takes requests from that queue only. Inputs a cascade stage defers move to the next stage's
queue with their original deadline, and run there in one batch with the deferred inputs of other
requests. Only one batch runs at a time, on a single worker thread that owns the device, so the event
loop stays free to accept requests, answer expired ones and publish metrics.

- Batching: up to ``max_batch_size`` rows, waiting at most ``max_delay_ms`` for a batch to fill. In
  ``adaptive`` mode the batch size follows Clipper's AIMD on measured batch latency
  (:class:`serve.batching.AdaptiveBatchLimit`, one per stage).
- Deadlines: a request still unanswered at its deadline is answered at once with status
  ``deadline_exceeded`` (a timer, not after the running batch); its rows are dropped from the queues.
- Bounded queue: past ``max_queue`` queued rows, :meth:`ServingEngine.submit` raises
  :class:`QueueFull` with a ``retry_after_s`` hint; it never blocks.
- Triage: ``off``, ``on`` (a fixed level) or ``auto``. Auto raises the level when the queued work
  (the oldest wait, or the front end's event-loop lag ``front_lag_s``, and the backlog at the level's
  measured pace) is predicted to miss the objective, or to come near it while the arrivals outrun the
  level's pace; it lowers the level once the costlier one keeps up with the arrivals and is predicted
  well inside the objective: at once after a transient backlog, at most once per ``hold_s`` after
  load the level could not carry (:class:`serve.triage.TriageController`);
  each change is published with its reason.
  The levels are the model's priced operating points, costliest first
  (:meth:`gating.adapters.ModelAdapter.triage_levels`).
- Exactly one answer per accepted request, and :meth:`ServingEngine.stop` drains in-flight work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import heapq
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from gating.adapters import ModelAdapter
from serve.batching import AdaptiveBatchLimit, BatchingConfig
from serve.metrics import EngineMetrics
from serve.triage import TriageConfig, TriageController

log = logging.getLogger(__name__)

__all__ = ["Answer", "BatchingConfig", "DeviceWorker", "EngineClosed", "EngineMetrics", "ModelFailed", "QueueFull",
           "ServingEngine", "TriageConfig"]


class QueueFull(Exception):
    """The queue is full: retry after ``retry_after_s`` seconds (HTTP 429)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"queue full; retry after {retry_after_s:.2f} s")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down and accepts no new work (HTTP 503)."""


class ModelFailed(Exception):
    """The model raised, or gave NaN or infinite logits, on the batch a row was in (HTTP 500).

    Only that batch's rows get it; the engine goes on with the next batch.
    """


class DeviceWorker:
    """The one thread that runs every tensor computation for a device: model loading, warm-up and batches.

    All engines serving on one device share it, so batches of different models never compete for the
    cores. Keeping tensor work off the event loop's thread matters on CPUs too: once two threads
    have each run multi-threaded (OpenMP) ops, their thread pools contend. On 2 cores a batch-1
    ResNet-38 then took 11 ms instead of 2.6 ms.

    A plain thread and queue rather than ``run_in_executor``: a result goes back to the event loop as
    one ``call_soon_threadsafe``, without a concurrent future chained to an asyncio one (48 against
    70 microseconds a round trip here, paid once or twice per request).
    """

    def __init__(self, name: str = "device") -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name=f"serve-{name}", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the caller, who decides
                result, error = None, e
            done(result, error)

    def run(self, fn, *args):
        """Run ``fn(*args)`` on the device thread and wait for it (for setup, outside the event loop)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((fn, args, lambda r, e: future.set_result(r) if e is None else future.set_exception(e)))
        return future.result()

    async def call(self, fn, *args):
        """Await ``fn(*args)`` run on the device thread."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((fn, args, lambda r, e: loop.call_soon_threadsafe(_settle, future, r, e)))
        return await future

    def shutdown(self) -> None:
        """Finish the queued jobs, then stop the thread."""
        self._jobs.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


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
    triage_level: int = 0            # the highest triage level of the stages it ran through
    int8_ops: float = 0.0            # int8 operations (not in flops: an int8 model's work)

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
    int8_ops: float = 0.0
    queue_s: float = 0.0
    compute_s: float = 0.0
    degraded: bool = False
    level: int = 0
    timer: asyncio.TimerHandle | None = None

    def key(self) -> tuple:
        return (-self.priority, self.deadline, self.seq)


class ServingEngine:
    """Serve one model (a :class:`gating.adapters.ModelAdapter`) on one device (see the module docstring).

    The engine composes the queues and the device worker with two pure parts: an
    :class:`~serve.batching.AdaptiveBatchLimit` per stage and a :class:`~serve.triage.TriageController`.
    """

    def __init__(self, model: ModelAdapter, batching: BatchingConfig | None = None,
                 triage: TriageConfig | None = None, device: torch.device | str = "cpu",
                 metrics: EngineMetrics | None = None, worker: DeviceWorker | None = None) -> None:
        self.model = model
        self.levels = model.triage_levels()
        self.batching = batching or BatchingConfig()
        self.triage = triage or TriageConfig()
        self.batching.validate()
        self.triage.validate()
        self.device = torch.device(device)
        self.metrics = metrics or EngineMetrics.create()
        self._m = self.metrics.bind(model.name, model.num_stages)
        self._queues: list[list[tuple[tuple, _Row]]] = [[] for _ in range(model.num_stages)]
        self._queued = 0
        self._seq = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._owns_worker = worker is None
        self.worker = worker or DeviceWorker(model.name)
        self._closing = False
        self._running_batch = False
        self._limits = [AdaptiveBatchLimit(self.batching) for _ in range(model.num_stages)]
        self._ms_per_row = 1.0  # the recent batch pace, for Retry-After hints
        self._stream = None  # the engine's CUDA stream, made on the device thread at the first batch
        self._triage = TriageController(self.triage, len(self.levels), self.batching.slo_ms, time.monotonic(),
                                        [p.val_gops_per_img for p in self.levels], self.batching.max_batch_size)
        # The front end's own delay (seconds), which queue waits cannot see: set by the app to its
        # event-loop lag (serve.frontend.LoopLagMonitor); auto triage treats it as waiting.
        self.front_lag_s: Callable[[], float] = lambda: 0.0
        self._m.triage_level.set(self._triage.level)

    # ----------------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name=f"serve-{self.model.name}")

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
        return self._triage.level

    @property
    def level_changes(self):
        """``(time, level, reason)`` of each triage change (bounded)."""
        return self._triage.changes

    def describe(self) -> dict[str, Any]:
        """The model as ``GET /v1/models`` shows it: kind, input shape, stages, priced triage levels."""
        return self.model.describe()

    # ----------------------------------------------------------------------------------- requests
    async def submit(self, x: torch.Tensor, deadline_ms: float | None = None, priority: int = 0) -> list[Answer]:
        """Queue a batch of inputs ``[n, *input_shape]``; returns one :class:`Answer` per input.

        Raises :class:`QueueFull` (retry later), :class:`EngineClosed`, or :class:`ModelFailed` when a
        batch holding one of the inputs failed. Cancelling the call (a client that went away) withdraws
        the inputs still queued: no batch computes them.
        """
        if self._closing or self._task is None:
            raise EngineClosed(f"model {self.model.name!r} is not serving")
        n = len(x)
        if self._queued + n > self.batching.max_queue:
            self._m.rejected.inc(n)
            raise QueueFull(self._retry_after())
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        deadline = now + (deadline_ms if deadline_ms is not None else self.batching.slo_ms) / 1e3
        self._triage.arrive(now, n)
        rows = []
        for i in range(n):
            row = _Row(x[i], deadline, priority, now, loop.create_future(), next(self._seq), enqueued=now)
            row.timer = loop.call_at(deadline, self._answer_expired, row)
            rows.append(row)
            self._push(0, row)
        self._poke()
        answers: list = []
        try:
            for r in rows:  # each future awaited in turn: gather would wrap them in one more future per request
                try:
                    answers.append(await r.future)
                except ModelFailed as e:  # every row's outcome is retrieved, so a failed batch is reported once
                    answers.append(e)
        except asyncio.CancelledError:
            withdrawn = 0
            for r in rows:  # the unanswered ones are cancelled here: a queued row is dropped when popped
                r.future.cancel()
                withdrawn += r.future.cancelled()
                if r.timer:
                    r.timer.cancel()
            self._m.cancelled.inc(withdrawn)
            raise
        for a in answers:  # the first failure is the request's
            if isinstance(a, BaseException):
                raise a
        return answers

    def _retry_after(self) -> float:
        # Time to work off the queue at the recent batch pace, at least one delay period.
        return max(self.batching.max_delay_ms / 1e3, self._queued * self._ms_per_row / 1e3)

    def _push(self, stage: int, row: _Row) -> None:
        row.stage = stage
        row.enqueued = time.monotonic()
        heapq.heappush(self._queues[stage], (row.key(), row))
        self._queued += 1
        self._m.queue_depth[stage].set(len(self._queues[stage]))

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _answer_expired(self, row: _Row) -> None:
        if row.future.done():
            return
        now = time.monotonic()
        row.future.set_result(Answer("deadline_exceeded", flops=row.flops, degraded=row.degraded,
                                     latency_ms=(now - row.arrival) * 1e3, queue_ms=row.queue_s * 1e3,
                                     compute_ms=row.compute_s * 1e3, triage_level=row.level))
        self._m.answers["deadline_exceeded"].inc()
        self._m.slo["no"].inc()

    # ----------------------------------------------------------------------------------- scheduling
    def _pop_batch(self, stage: int) -> list[_Row]:
        q = self._queues[stage]
        out: list[_Row] = []
        limit = max(1, self._limits[stage].limit)
        while q and len(out) < limit:
            _, row = heapq.heappop(q)
            self._queued -= 1
            if not row.future.done():  # an expired row was already answered: drop it
                out.append(row)
        self._m.queue_depth[stage].set(len(q))
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
            full = len(q) >= self._limits[k].limit
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
        while True:
            now = time.monotonic()
            stage, wake_at = self._pick_stage(now)
            if stage is None:
                self._wake.clear()
                if math.isinf(wake_at):  # the usual idle wait; wait_for would add a task and two loop turns
                    await self._wake.wait()
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), max(0.0, wake_at - now))
                except asyncio.TimeoutError:
                    pass
                continue
            rows = self._pop_batch(stage)
            if not rows:
                continue
            self._running_batch = True
            try:
                await self._run_batch(stage, rows)
            except Exception as e:  # a failing batch answers its rows with the error and the server goes on
                log.exception("batch of %d rows at stage %d failed", len(rows), stage)
                error = e if isinstance(e, ModelFailed) else ModelFailed(
                    f"model {self.model.name!r} failed on a batch of {len(rows)} rows at stage {stage}: "
                    f"{type(e).__name__}: {e}")
                self._m.answers["error"].inc(len(rows))
                for r in rows:
                    if not r.future.done():
                        r.future.set_exception(error)
                        if r.timer:
                            r.timer.cancel()
            finally:
                self._running_batch = False

    async def _run_batch(self, stage: int, rows: list[_Row]) -> None:
        level = self._triage.level
        start = time.monotonic()
        wait = self._m.queue_wait[stage]
        for r in rows:
            r.queue_s += start - r.enqueued
            wait.observe(start - r.enqueued)
        out = await self.worker.call(self._execute, stage, [r.x for r in rows], level)
        self._after_batch(stage, level, len(rows), time.monotonic() - start)
        now = time.monotonic()
        for i, r in enumerate(rows):
            r.flops += float(out.flops[i])
            r.int8_ops += float(out.int8_ops[i]) if out.int8_ops is not None else 0.0
            r.compute_s += out.compute_s
            r.degraded = r.degraded or level > 0
            r.level = max(r.level, level)
            if r.future.done():  # answered as expired while the batch ran
                continue
            if out.done[i]:
                blocks = float(out.blocks[i]) if out.blocks is not None else None
                self._answer(r, Answer("ok", out.label[i], out.confidence[i], stage, blocks, r.flops, r.degraded,
                                       (now - r.arrival) * 1e3, r.queue_s * 1e3, r.compute_s * 1e3, r.level,
                                       r.int8_ops),
                             stage)
            else:
                r.x = out.next_x[i] if out.next_x is not None else r.x
                self._push(stage + 1, r)
        self._update_triage(now)

    def _execute(self, stage: int, rows: list[torch.Tensor], level: int) -> _BatchOut:
        """On the device thread: batch the rows, run the stage, and reduce the answers; also returns the
        seconds the model took on the stacked batch (what calling it directly would cost; stacking and
        moving the rows count as the engine's own overhead).

        On a GPU the batch is assembled in page-locked host memory and copied without blocking, the
        work runs on the engine's own stream, and the per-row answers come back in one copy (the rows
        a cascade defers stay on the device for their next stage).
        """
        with torch.inference_mode(), self._on_stream():
            x = torch.stack(rows)
            if self.device.type == "cuda" and x.device.type == "cpu":
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
            t0 = time.perf_counter()
            res = self.model.stage(stage, x, self.levels[level])
            conf, label = res.logits.float().softmax(-1).max(-1)
            columns = [res.done.double(), conf.double(), label.double(),
                       torch.isfinite(res.logits).all().double().expand(len(rows))]
            if res.executed is not None:
                columns.append(res.executed.sum(1).double())
            host = torch.stack([c.to(x.device) for c in columns]).cpu()  # one copy; synchronises the stream
        out_s = time.perf_counter() - t0
        if not bool(host[3, 0]):
            raise ModelFailed(f"model {self.model.name!r} gave NaN or infinite logits on a batch of {len(rows)} "
                              f"rows at stage {stage}")
        done, confidence, labels = host[0].bool().tolist(), host[1].tolist(), host[2].long().tolist()
        blocks = host[4].tolist() if res.executed is not None else None
        out = _BatchOut(done, res.flops.cpu().tolist(), confidence, labels, blocks, res.next_x,
                        res.int8_ops.cpu().tolist() if res.int8_ops is not None else None)
        out.compute_s = out_s
        return out

    def _on_stream(self):
        """The engine's own CUDA stream as a context (a no-op on the CPU)."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._stream)

    def _answer(self, row: _Row, answer: Answer, stage: int) -> None:
        if row.timer:
            row.timer.cancel()
        row.future.set_result(answer)
        m = self._m
        m.answers["ok"].inc()
        m.exits[stage].inc()
        m.latency.observe(answer.latency_ms / 1e3)
        m.slo["yes" if answer.latency_ms <= self.batching.slo_ms else "no"].inc()
        m.flops.inc(answer.flops)
        if answer.int8_ops:
            m.int8_ops.inc(answer.int8_ops)
        if answer.blocks_executed is not None:
            m.blocks.observe(answer.blocks_executed)
        if answer.degraded:
            m.degraded.inc()

    def _after_batch(self, stage: int, level: int, n: int, batch_s: float) -> None:
        self._m.batch_size[stage].observe(n)
        self._m.batch_seconds[stage].observe(batch_s)
        self._ms_per_row = batch_s * 1e3 / n
        self._limits[stage].after_batch(n, batch_s)
        self._triage.record_batch(level, stage, n, batch_s)

    def _update_triage(self, now: float) -> None:
        # How long the most urgent queued rows have waited in their queue: the threat to the objective
        # (a row just deferred to the next stage has not waited, whatever its own service time).
        # Requests still waiting for the front end are as late as its event loop.
        if self.triage.mode != "auto":
            return
        oldest = min((q[0][1].enqueued for q in self._queues if q), default=now)
        before = self._triage.level
        level = self._triage.observe(now, max(now - oldest, self.front_lag_s()) * 1e3, self._queued,
                                     max(1, self._limits[0].limit))
        if level != before:
            self._m.triage_level.set(level)
            self._m.triage_changes["up" if level > before else "down"].inc()

    # ----------------------------------------------------------------------------------- settings
    def settings(self) -> dict[str, Any]:
        return {"batching": asdict(self.batching), "triage": asdict(self.triage), "triage_level": self._triage.level,
                "batch_limits": [lim.limit for lim in self._limits],
                "triage_changes": self._triage.history(time.monotonic())}

    def update(self, batching: dict[str, Any] | None = None, triage: dict[str, Any] | None = None) -> dict[str, Any]:
        """Change knobs while serving; unknown keys or bad values raise ``ValueError`` and change nothing."""
        b = _updated(self.batching, batching or {})
        t = _updated(self.triage, triage or {})
        b.validate()
        t.validate()
        self.batching, self.triage = b, t
        self._triage.configure(t, b.slo_ms, time.monotonic())
        self._m.triage_level.set(self._triage.level)
        for lim in self._limits:
            lim.configure(b)
        self._poke()
        return self.settings()


@dataclass
class _BatchOut:
    """One executed batch, reduced to plain lists on the device thread."""

    done: list[bool]
    flops: list[float]
    confidence: list[float]
    label: list[int]
    blocks: list[float] | None
    next_x: torch.Tensor | None
    int8_ops: list[float] | None = None
    compute_s: float = 0.0


def _updated(obj: Any, changes: dict[str, Any]) -> Any:
    """A copy of the dataclass ``obj`` with ``changes``; unknown keys raise ``ValueError`` (types and
    bounds are the config's own ``validate``)."""
    values = dict(vars(obj))
    for k, v in changes.items():
        if k not in values:
            raise ValueError(f"unknown setting {k!r}; known: {sorted(values)}")
        values[k] = v
    return type(obj)(**values)
