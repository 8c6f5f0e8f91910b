"""The HTTP endpoint (FastAPI): predict, models, health, readiness, Prometheus metrics, run-time settings.

    POST /v1/models/{name}/predict   {"inputs": [[...], ...]} or {"input": [...]} or {"images": ["<base64 PNG/JPEG>"]}
                                     or {"tensor_b64": "<base64 float32 bytes, [n, *input_shape]>"}
                                     optional "deadline_ms", "priority"; answers one result per input
    GET  /v1/models                  the models, their input shape and published triage levels
    GET  /v1/settings                batching and triage knobs of every model
    PUT  /v1/settings/{name}         {"batching": {...}, "triage": {"mode": "auto"}} while serving
    GET  /healthz, /readyz, /metrics

Bad requests get a 4xx that says what is wrong: malformed JSON (400), wrong shape, dtype, NaN or inf
(422), a payload over ``max_body_bytes`` (413), an unknown model (404), a full queue (429 with
Retry-After), shutting down (503). With ``shed_lag_ms`` set, a predict request that arrives while the
event loop runs that late is answered 503 with Retry-After before its body is read (load shedding;
see ``serve.frontend``). The server keeps serving after any of them; a client that disconnects gets
nothing, and its inputs are still answered once inside the engine.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import time
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from serve.engine import EngineClosed, QueueFull, ServingEngine
from serve.frontend import LoopLagMonitor

__all__ = ["create_app"]


class PredictRequest(BaseModel):
    """One input (``input``), several (``inputs``), or base64 images (``images``); one of them."""

    input: list[Any] | None = Field(None, description="one input, nested lists of numbers in the model's input shape")
    tensor_b64: str | None = Field(None, description="inputs as raw little-endian float32 bytes, base64-encoded, "
                                                     "shaped [n, *input_shape] (the fast path: no number parsing)")
    inputs: list[Any] | None = Field(None, description="a batch of inputs")
    images: list[str] | None = Field(None, description="base64-encoded PNG or JPEG images")
    deadline_ms: float | None = Field(None, gt=0, description="answer within this many ms (default: the SLO)")
    priority: int = Field(0, description="higher is served first")
    labels: list[int] | None = Field(None, description="true labels, for accuracy accounting by load tools")


class SettingsUpdate(BaseModel):
    batching: dict[str, Any] | None = None
    triage: dict[str, Any] | None = None


def _to_tensor(req: PredictRequest, shape: tuple[int, ...], max_inputs: int) -> torch.Tensor:
    given = [k for k in ("input", "inputs", "images", "tensor_b64") if getattr(req, k) is not None]
    if len(given) != 1:
        raise HTTPException(422, f"give exactly one of input, inputs, images, tensor_b64 (got {given or 'none'})")
    if req.tensor_b64 is not None:
        try:
            raw = base64.b64decode(req.tensor_b64, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(422, "tensor_b64 is not valid base64") from None
        per_input = 4 * math.prod(shape)
        if len(raw) % per_input:
            raise HTTPException(422, f"tensor_b64 holds {len(raw)} bytes, not a whole number of float32 inputs of "
                                     f"shape {list(shape)} ({per_input} bytes each)")
        x = torch.frombuffer(bytearray(raw), dtype=torch.float32).view(-1, *shape)
    elif req.images is not None:
        x = torch.stack([_decode_image(s, shape) for s in req.images]) if req.images else torch.empty(0, *shape)
    else:
        data = [req.input] if req.input is not None else req.inputs
        try:
            x = torch.tensor(data, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as e:
            raise HTTPException(422, f"inputs must be nested lists of numbers of one shape: {e}") from None
    if x.ndim == len(shape):
        x = x.unsqueeze(0)
    if tuple(x.shape[1:]) != shape:
        raise HTTPException(422, f"each input must have shape {list(shape)}, got {list(x.shape[1:])}")
    if len(x) == 0:
        raise HTTPException(422, "no inputs given")
    if len(x) > max_inputs:
        raise HTTPException(413, f"{len(x)} inputs in one request; at most {max_inputs}")
    if not torch.isfinite(x).all():
        raise HTTPException(422, "inputs contain NaN or infinity")
    return x


def _decode_image(b64: str, shape: tuple[int, ...]) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms.v2 import functional as F

    try:
        img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
        img.load()
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError):
        raise HTTPException(422, "images must be base64-encoded PNG or JPEG files") from None
    c, h, w = shape
    img = img.convert("L" if c == 1 else "RGB").resize((w, h))
    return F.to_dtype(F.to_image(img), torch.float32, scale=True)


class FrontDoor:
    """ASGI middleware run before routing and before the body is read: refuses oversize bodies (413)
    and, while the event loop lags over ``shed_lag_ms``, sheds predict requests (503, Retry-After).
    Every answer carries ``Server-Timing: app;dur=<ms>``, the server's time from the parsed request
    head to the answer's head: the serving layer's cost without the client's or the network's.

    Plain ASGI rather than ``@app.middleware``: that wrapper costs an extra task per request.
    """

    def __init__(self, app, max_body_bytes: int, monitor: LoopLagMonitor, shed_lag_ms: float | None,
                 on_shed=None) -> None:
        self.app, self.max_body_bytes, self.monitor, self.shed_lag_ms = app, max_body_bytes, monitor, shed_lag_ms
        self.on_shed = on_shed or (lambda: None)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            size = dict(scope["headers"]).get(b"content-length", b"")
            if size.isdigit() and int(size) > self.max_body_bytes:
                await JSONResponse({"detail": f"request body over {self.max_body_bytes} bytes"},
                                   status_code=413)(scope, receive, send)
                return
            if self.shed_lag_ms is not None and scope["method"] == "POST" and scope["path"].endswith("/predict"):
                lag_ms = self.monitor.lag_s() * 1e3
                if lag_ms > self.shed_lag_ms:
                    self.on_shed()
                    await JSONResponse({"detail": f"overloaded: the server runs {lag_ms:.0f} ms behind "
                                                  f"(shedding above {self.shed_lag_ms:g} ms); retry later"},
                                       status_code=503, headers={"Retry-After": "1"})(scope, receive, send)
                    return
            t0 = time.perf_counter()

            async def timed_send(message) -> None:
                if message["type"] == "http.response.start":
                    dur = f"app;dur={(time.perf_counter() - t0) * 1e3:.3f}".encode()
                    message = {**message, "headers": [*message.get("headers", []), (b"server-timing", dur)]}
                await send(message)

            await self.app(scope, receive, timed_send)
            return
        await self.app(scope, receive, send)


def create_app(engines: dict[str, ServingEngine], max_body_bytes: int = 8 << 20, max_inputs: int = 1024,
               normalize: dict[str, tuple[list[float], list[float]]] | None = None,
               shed_lag_ms: float | None = None, lag_interval_ms: float = 5.0) -> FastAPI:
    """The app serving ``engines`` (name -> engine). Engines start with the app and drain when it stops.

    ``normalize``: per model, the (mean, std) per channel to apply to decoded images (the training
    transform); numeric ``inputs`` are taken as already normalised. ``shed_lag_ms``: shed predict
    requests while the event loop runs this many ms late (None: never). The loop's lag, sampled every
    ``lag_interval_ms``, also feeds every engine's auto triage and the ``serve_event_loop_lag_seconds``
    metric.
    """
    missing = [n for n, e in engines.items() if e.model.input_shape is None]
    if missing:
        raise ValueError(f"models {missing} have no input_shape: give their adapters one (load_run reads it from "
                         f"the run's data config)")
    monitor = LoopLagMonitor(lag_interval_ms / 1e3)
    registries = {id(e.metrics.registry): e.metrics for e in engines.values()}

    def count_shed() -> None:
        for m in registries.values():
            m.shed.inc()

    app = FastAPI(title="adaptive-inference serving", version="0.1.0", lifespan=_lifespan(engines, monitor))
    app.state.loop_lag = monitor
    app.add_middleware(FrontDoor, max_body_bytes=max_body_bytes, monitor=monitor, shed_lag_ms=shed_lag_ms,
                       on_shed=count_shed)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.include_router(_model_routes(engines, max_inputs, normalize or {}))
    app.include_router(_operation_routes(engines))
    return app


def _lifespan(engines: dict[str, ServingEngine], monitor: LoopLagMonitor):
    """Start the lag monitor and the engines with the app; drain the engines when it stops."""
    registries = {id(e.metrics.registry): e.metrics for e in engines.values()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await monitor.start()
        for m in registries.values():
            m.loop_lag.set_function(monitor.lag_s)
        for e in engines.values():
            e.front_lag_s = monitor.lag_s
            await e.start()
        yield
        for e in engines.values():
            await e.stop(drain=True)
        await monitor.stop()

    return lifespan


async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"detail": "malformed JSON body"}, status_code=400)
    return JSONResponse({"detail": [{"loc": e.get("loc"), "msg": e.get("msg")} for e in errors]}, status_code=422)


def _engine_of(engines: dict[str, ServingEngine], name: str) -> ServingEngine:
    if name not in engines:
        raise HTTPException(404, f"no model {name!r}; models: {sorted(engines)}")
    return engines[name]


def _model_routes(engines: dict[str, ServingEngine], max_inputs: int,
                  normalize: dict[str, tuple[list[float], list[float]]]) -> APIRouter:
    """Predict and the model list."""
    router = APIRouter()

    @router.post("/v1/models/{name}/predict")
    async def predict(name: str, req: PredictRequest) -> dict[str, Any]:
        engine = _engine_of(engines, name)
        x = _to_tensor(req, engine.model.input_shape, max_inputs)
        if req.images is not None and name in normalize:
            mean, std = normalize[name]
            x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        try:
            answers = await engine.submit(x, req.deadline_ms, req.priority)
        except QueueFull as e:
            raise HTTPException(429, str(e), headers={"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})
        except EngineClosed as e:
            raise HTTPException(503, str(e)) from None
        out = [a.to_dict() for a in answers]
        if req.labels is not None and len(req.labels) == len(out):
            for a, y in zip(out, req.labels):
                a["correct"] = a["label"] == y if a["label"] is not None else None
        return {"model": name, "outputs": out}

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"models": [e.describe() for e in engines.values()]}

    return router


def _operation_routes(engines: dict[str, ServingEngine]) -> APIRouter:
    """Run-time settings, health, readiness and Prometheus metrics."""
    router = APIRouter()

    @router.get("/v1/settings")
    async def settings() -> dict[str, Any]:
        return {name: e.settings() for name, e in engines.items()}

    @router.put("/v1/settings/{name}")
    async def update_settings(name: str, body: SettingsUpdate) -> dict[str, Any]:
        engine = _engine_of(engines, name)
        try:
            return engine.update(body.batching, body.triage)
        except (ValueError, TypeError) as e:
            raise HTTPException(422, str(e)) from None

    @router.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    async def readyz() -> Response:
        ready = all(e.ready for e in engines.values())
        return JSONResponse({"ready": ready, "models": {n: e.ready for n, e in engines.items()}},
                            status_code=200 if ready else 503)

    @router.get("/metrics")
    async def metrics() -> Response:
        registries = {id(e.metrics.registry): e.metrics.registry for e in engines.values()}
        body = b"".join(generate_latest(r) for r in registries.values())
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    return router
