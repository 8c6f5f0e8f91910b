"""Open-loop load for the HTTP endpoint: Poisson arrivals and on/off bursts, to loopback only.

Requests are sent at their scheduled times whether or not earlier ones have been answered (closed-loop
clients wait, and so hide the tail). Each request carries one or more inputs and their labels; the report gives
throughput, latency percentiles, SLO attainment, goodput, and the rejected, expired and degraded
counts, and the accuracy of what was answered.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np

__all__ = ["LoadReport", "burst_arrivals", "encode_bodies", "poisson_arrivals", "run_load", "summarize"]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SHED = (429, 503)  # refused by the server under load (full queue, or shedding): counted as rejected


def poisson_arrivals(rate: float, duration_s: float, seed: int = 0) -> list[float]:
    """Arrival times (s from start) of a Poisson process at ``rate`` per second."""
    rng, t, out = random.Random(seed), 0.0, []
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(t)


def burst_arrivals(rate: float, duration_s: float, burst_start_s: float, burst_s: float, burst_factor: float,
                   seed: int = 0) -> list[float]:
    """Poisson arrivals at ``rate``, times ``burst_factor`` during ``[burst_start_s, burst_start_s + burst_s)``."""
    rng, t, out = random.Random(seed), 0.0, []
    while t < duration_s:
        r = rate * burst_factor if burst_start_s <= t < burst_start_s + burst_s else rate
        t += rng.expovariate(r)
        if t < duration_s:
            out.append(t)
    return out


@dataclass
class LoadReport:
    """What one load run measured (latencies in ms, rates per second)."""

    sent: int
    answered_ok: int
    rejected: int
    expired: int
    errors: int
    duration_s: float
    offered_rps: float
    throughput_rps: float
    goodput_rps: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    slo_ms: float
    slo_attainment: float
    degraded: int
    accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def run_load(url: str, model: str, inputs: Sequence[list], labels: Sequence[int] | None,
                   arrivals: Sequence[float], slo_ms: float, deadline_ms: float | None = None,
                   timeout_s: float = 30.0, max_connections: int = 512, inputs_per_request: int = 1,
                   encoding: str = "json") -> LoadReport:
    """Send one request per arrival time (cycling through ``inputs``) and measure the answers.

    Each request carries ``inputs_per_request`` inputs (Clipper's ``input_batch``), which spreads the
    HTTP cost over several inputs; counts and rates are per input. An input counts towards SLO
    attainment when it is answered ``ok`` within ``slo_ms`` (client-side time of its request);
    rejected (429 or 503), expired and failed inputs count as misses. ``encoding="b64"`` sends the inputs as
    base64 float32 bytes (``tensor_b64``) instead of JSON numbers.
    """
    if encoding not in ("json", "b64"):
        raise ValueError(f"encoding must be json or b64, got {encoding!r}")
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only targets loopback, not {host!r}")
    # Encode the bodies before the clock starts: the generator must not be the bottleneck it measures.
    bodies = encode_bodies(inputs, labels, len(arrivals), inputs_per_request, encoding, deadline_ms)
    path = f"{url.rstrip('/')}/v1/models/{model}/predict"
    # No cyclic GC while measuring: a full collection over this process (torch included) paused the
    # client for 100-220 ms on 2 cores, delaying sends and answers alike. The run's garbage is freed after.
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        results, duration = await _send_all(path, bodies, arrivals, inputs_per_request, timeout_s, max_connections)
    finally:
        if gc_was_enabled:
            gc.enable()
    return summarize(results, arrivals, duration, slo_ms)


def encode_bodies(inputs: Sequence[list], labels: Sequence[int] | None, n_requests: int, inputs_per_request: int,
                  encoding: str, deadline_ms: float | None) -> list[bytes]:
    """The JSON body of every request; request ``i`` carries the inputs from ``(i * k) % n`` on."""
    k = inputs_per_request
    cache: dict[int, bytes] = {}  # few distinct bodies

    def body_of(i: int) -> bytes:
        start = (i * k) % len(inputs)
        if start not in cache:
            idx = [(start + j) % len(inputs) for j in range(k)]
            if encoding == "b64":
                raw = np.asarray([inputs[j] for j in idx], dtype="<f4").tobytes()
                body: dict[str, Any] = {"tensor_b64": base64.b64encode(raw).decode()}
            else:
                body = {"inputs": [inputs[j] for j in idx]}
            if labels is not None:
                body["labels"] = [int(labels[j]) for j in idx]
            if deadline_ms is not None:
                body["deadline_ms"] = deadline_ms
            cache[start] = json.dumps(body).encode()
        return cache[start]

    return [body_of(i) for i in range(n_requests)]


async def _send_all(path: str, bodies: list[bytes], arrivals: Sequence[float], k: int, timeout_s: float,
                    max_connections: int) -> tuple[list[dict[str, Any]], float]:
    """Send each body at its arrival time, whatever earlier ones are doing; one result per input."""
    results: list[dict[str, Any]] = []
    headers = {"content-type": "application/json"}
    # aiohttp, not httpx: the generator shares the cores with the server it measures, and httpx's
    # connection pool costs more CPU per request as concurrency grows, which turned every overload
    # into a collapse of the client itself.
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()

        async def one(i: int) -> None:
            # Latency counts from the scheduled send time: a late client must not hide the wait.
            t0 = start + arrivals[i]
            try:
                async with session.post(path, data=bodies[i], headers=headers) as r:
                    payload = await r.read()
                ms = (time.perf_counter() - t0) * 1e3
                if r.status == 200:
                    for a in json.loads(payload)["outputs"]:
                        results.append({"code": 200, "ms": ms, "status": a["status"], "degraded": a["degraded"],
                                        "correct": a.get("correct")})
                else:
                    results.extend({"code": r.status, "ms": ms} for _ in range(k))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                results.extend({"code": -1, "ms": (time.perf_counter() - t0) * 1e3} for _ in range(k))

        tasks = []
        for i, t in enumerate(arrivals):
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[dict[str, Any]], arrivals: Sequence[float], duration: float,
              slo_ms: float) -> LoadReport:
    """The report of one run from its per-input results."""
    ok = [r for r in results if r["code"] == 200 and r["status"] == "ok"]
    lat = np.array([r["ms"] for r in ok]) if ok else np.array([np.nan])
    met = sum(1 for r in ok if r["ms"] <= slo_ms)
    graded = [r["correct"] for r in ok if r.get("correct") is not None]
    span = max(arrivals[-1] if arrivals else duration, 1e-9)  # offered_rps and the rates below are inputs/s
    return LoadReport(
        sent=len(results), answered_ok=len(ok), rejected=sum(r["code"] in SHED for r in results),
        expired=sum(r["code"] == 200 and r["status"] == "deadline_exceeded" for r in results),
        errors=sum(r["code"] not in (200, *SHED) for r in results), duration_s=duration,
        offered_rps=len(results) / span, throughput_rps=len(ok) / duration, goodput_rps=met / duration,
        p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
        p99_ms=float(np.percentile(lat, 99)), slo_ms=slo_ms,
        slo_attainment=met / max(len(results), 1), degraded=sum(bool(r.get("degraded")) for r in ok),
        accuracy=float(np.mean(graded)) if graded else None,
    )
