"""Open-loop load for the protocol endpoint (``POST /v2/models/{name}/infer``): Poisson arrivals and on/off
bursts, to loopback only.

Requests are sent at their scheduled times whether or not earlier ones have been answered (closed-loop
clients wait, and so hide the tail). Each request carries one or more inputs and their labels; the report gives
throughput, latency percentiles, SLO attainment, goodput, and the rejected, expired and degraded
counts, and the accuracy of what was answered.
"""

from __future__ import annotations

import asyncio
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

from serve.oip import DTYPES

__all__ = ["ENCODINGS", "EncodedRequest", "LoadReport", "burst_arrivals", "encode_bodies", "encode_grpc",
           "encode_infer", "poisson_arrivals", "read_outputs", "run_load", "summarize"]

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SHED = (429, 503)  # refused by the server under load (full queue, or shedding): counted as rejected
EXPIRED = 504      # the request's deadline passed before its inputs were answered


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
                   encoding: str = "json", grpc_port: int | None = None) -> LoadReport:
    """Send one protocol ``infer`` request per arrival time (cycling through ``inputs``) and measure the answers.

    Each request carries ``inputs_per_request`` inputs (Clipper's ``input_batch``), which spreads the
    HTTP cost over several inputs; counts and rates are per input. An input counts towards SLO
    attainment when it is answered within ``slo_ms`` (client-side time of its request); rejected (429
    or 503; gRPC RESOURCE_EXHAUSTED or UNAVAILABLE), expired (504; DEADLINE_EXCEEDED) and failed
    inputs count as misses. ``encoding="binary"`` sends the tensor and asks for the outputs with the
    protocol's binary tensor extension instead of JSON numbers; ``"grpc"`` calls ``ModelInfer`` on the
    server's ``grpc_port`` with raw tensor contents.
    Accuracy is the answered labels against ``labels``, on the client.
    """
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only targets loopback, not {host!r}")
    if encoding == "grpc" and grpc_port is None:
        raise ValueError("encoding='grpc' needs the server's grpc_port")
    if encoding == "grpc" and deadline_ms is None:
        # A gRPC call's own timeout (timeout_s, for the client's safety) would become the request's
        # deadline; REST requests without one get the server's default (its slo_ms), so say it here.
        deadline_ms = slo_ms
    # Encode the bodies before the clock starts: the generator must not be the bottleneck it measures.
    requests = encode_bodies(inputs, labels, len(arrivals), inputs_per_request, encoding, deadline_ms, model)
    path = f"{url.rstrip('/')}/v2/models/{model}/infer" if encoding != "grpc" else f"{host}:{grpc_port}"
    # No cyclic GC while measuring: a full collection over this process (torch included) paused the
    # client for 100-220 ms on 2 cores, delaying sends and answers alike. The run's garbage is freed after.
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        send = _send_all_grpc if encoding == "grpc" else _send_all
        results, duration = await send(path, requests, arrivals, inputs_per_request, timeout_s, max_connections)
    finally:
        if gc_was_enabled:
            gc.enable()
    return summarize(results, arrivals, duration, slo_ms)


ENCODINGS = ("json", "binary", "grpc")


@dataclass
class EncodedRequest:
    """One request's body and headers, and the labels of its inputs (None: unlabelled)."""

    body: bytes
    headers: dict[str, str]
    labels: list[int] | None


def encode_infer(x: np.ndarray, encoding: str = "binary", outputs: Sequence[str] | None = None,
                 parameters: dict[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """A protocol ``infer`` body for the float32 batch ``x`` and its headers; ``binary`` sends the tensor
    and asks for the outputs in the binary tensor extension."""
    x = np.ascontiguousarray(x, dtype="<f4")
    tensor: dict[str, Any] = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    doc: dict[str, Any] = {"inputs": [tensor], "parameters": dict(parameters or {})}
    if outputs is not None:
        doc["outputs"] = [{"name": n} for n in outputs]
    if encoding == "binary":
        raw = x.tobytes()
        tensor["parameters"] = {"binary_data_size": len(raw)}
        doc["parameters"]["binary_data_output"] = True
        head = json.dumps(doc).encode()
        return head + raw, {"content-type": "application/octet-stream",
                            "inference-header-content-length": str(len(head))}
    tensor["data"] = x.reshape(-1).tolist()
    return json.dumps(doc).encode(), {"content-type": "application/json"}


def encode_bodies(inputs: Sequence[list], labels: Sequence[int] | None, n_requests: int, inputs_per_request: int,
                  encoding: str, deadline_ms: float | None, model_name: str = "") -> list[EncodedRequest]:
    """Every request's protocol body; request ``i`` carries the inputs from ``(i * k) % n`` on."""
    k = inputs_per_request
    cache: dict[int, EncodedRequest] = {}  # few distinct bodies
    params = {} if deadline_ms is None else {"deadline_ms": deadline_ms}

    def body_of(i: int) -> EncodedRequest:
        start = (i * k) % len(inputs)
        if start not in cache:
            idx = [(start + j) % len(inputs) for j in range(k)]
            x = np.asarray([inputs[j] for j in idx], dtype="<f4")
            if encoding == "grpc":
                body, headers = encode_grpc(model_name, x, ["label", "triage_level"], params), {}
            else:
                body, headers = encode_infer(x, encoding, ["label", "triage_level"], params)
            cache[start] = EncodedRequest(body, headers, [int(labels[j]) for j in idx] if labels is not None else None)
        return cache[start]

    return [body_of(i) for i in range(n_requests)]


def encode_grpc(model: str, x: np.ndarray, outputs: Sequence[str], parameters: dict[str, Any]) -> bytes:
    """A serialised gRPC ``ModelInferRequest`` for the float32 batch ``x``, its tensor as raw contents."""
    from serve.proto import grpc_predict_v2_pb2 as pb

    x = np.ascontiguousarray(x, dtype="<f4")
    req = pb.ModelInferRequest(model_name=model, outputs=[{"name": n} for n in outputs])
    req.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    for k, v in parameters.items():
        req.parameters[k].double_param = float(v)
    return req.SerializeToString()


# gRPC status -> the HTTP status the report counts it as
_GRPC_AS_HTTP = {"RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": EXPIRED}


async def _send_all_grpc(target: str, requests: list[EncodedRequest], arrivals: Sequence[float], k: int,
                         timeout_s: float, max_connections: int) -> tuple[list[dict[str, Any]], float]:
    """As :func:`_send_all`, over one gRPC channel (HTTP/2 multiplexes the calls)."""
    import grpc

    from serve.proto import grpc_predict_v2_pb2 as pb

    results: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        start = time.perf_counter()

        async def one(i: int) -> None:
            t0 = start + arrivals[i]
            req = requests[i]
            try:
                res = await call(req.body, timeout=timeout_s)
                ms = (time.perf_counter() - t0) * 1e3
                out = {o.name: np.frombuffer(raw, dtype=DTYPES[o.datatype])
                       for o, raw in zip(res.outputs, res.raw_output_contents)}
                for j, (label, level) in enumerate(zip(out["label"], out["triage_level"])):
                    correct = bool(label == req.labels[j]) if req.labels is not None else None
                    results.append({"code": 200, "ms": ms, "status": "ok", "degraded": bool(level > 0),
                                    "correct": correct})
            except grpc.aio.AioRpcError as e:
                code = _GRPC_AS_HTTP.get(e.code().name, -1)
                results.extend({"code": code, "ms": (time.perf_counter() - t0) * 1e3} for _ in range(k))

        await _at_arrivals(start, arrivals, one)
        return results, time.perf_counter() - start


async def _at_arrivals(start: float, arrivals: Sequence[float], one) -> None:
    """Start ``one(i)`` at ``start + arrivals[i]`` whatever earlier calls are doing; wait for them all."""
    tasks = []
    for i, t in enumerate(arrivals):
        delay = start + t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    await asyncio.gather(*tasks)


def read_outputs(payload: bytes, header_length: str | None) -> dict[str, np.ndarray]:
    """The outputs of a protocol ``infer`` response (JSON, or JSON + binary tensors) as arrays by name."""
    head = payload[:int(header_length)] if header_length else payload
    offset = len(head)
    out = {}
    for t in json.loads(head)["outputs"]:
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            out[t["name"]] = np.frombuffer(payload[offset:offset + size], dtype=DTYPES[t["datatype"]])
            offset += size
        else:
            out[t["name"]] = np.asarray(t["data"])
    return out


async def _send_all(path: str, requests: list[EncodedRequest], arrivals: Sequence[float], k: int, timeout_s: float,
                    max_connections: int) -> tuple[list[dict[str, Any]], float]:
    """Send each request at its arrival time, whatever earlier ones are doing; one result per input."""
    results: list[dict[str, Any]] = []
    # aiohttp, not httpx: the generator shares the cores with the server it measures, and httpx's
    # connection pool costs more CPU per request as concurrency grows, which turned every overload
    # into a collapse of the client itself.
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        start = time.perf_counter()

        async def one(i: int) -> None:
            # Latency counts from the scheduled send time: a late client must not hide the wait.
            t0 = start + arrivals[i]
            req = requests[i]
            try:
                async with session.post(path, data=req.body, headers=req.headers) as r:
                    payload = await r.read()
                    header_length = r.headers.get("Inference-Header-Content-Length")
                ms = (time.perf_counter() - t0) * 1e3
                if r.status == 200:
                    out = read_outputs(payload, header_length)
                    for j, (label, level) in enumerate(zip(out["label"], out["triage_level"])):
                        correct = bool(label == req.labels[j]) if req.labels is not None else None
                        results.append({"code": 200, "ms": ms, "status": "ok", "degraded": bool(level > 0),
                                        "correct": correct})
                else:
                    results.extend({"code": r.status, "ms": ms} for _ in range(k))
            except (aiohttp.ClientError, asyncio.TimeoutError):
                results.extend({"code": -1, "ms": (time.perf_counter() - t0) * 1e3} for _ in range(k))

        await _at_arrivals(start, arrivals, one)
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
        expired=sum(r["code"] == EXPIRED for r in results),
        errors=sum(r["code"] not in (200, EXPIRED, *SHED) for r in results), duration_s=duration,
        offered_rps=len(results) / span, throughput_rps=len(ok) / duration, goodput_rps=met / duration,
        p50_ms=float(np.percentile(lat, 50)), p95_ms=float(np.percentile(lat, 95)),
        p99_ms=float(np.percentile(lat, 99)), slo_ms=slo_ms,
        slo_attainment=met / max(len(results), 1), degraded=sum(bool(r.get("degraded")) for r in ok),
        accuracy=float(np.mean(graded)) if graded else None,
    )
