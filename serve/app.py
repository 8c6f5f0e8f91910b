"""The HTTP endpoint (FastAPI): the Open Inference Protocol (v2) REST API, plus our documented extensions.

The protocol's routes (``serve.oip`` holds the tensor formats)::

    GET  /v2                                        server metadata (name, version, extensions)
    GET  /v2/health/live, /v2/health/ready          liveness, readiness (503 while not ready)
    GET  /v2/models/{name}[/versions/{v}]           model metadata: inputs, outputs, datatypes, shapes
    GET  /v2/models/{name}[/versions/{v}]/ready     model readiness (503 while not ready)
    POST /v2/models/{name}[/versions/{v}]/infer     inference: JSON, or JSON + binary tensors with
                                                    Inference-Header-Content-Length

Extensions (ours, beside the protocol): ``GET /v2/models/{name}/levels`` (the model's triage levels,
each priced on val), ``GET /v2/settings`` and ``PUT /v2/settings/{name}`` (batching and triage knobs
while serving; the PUT needs ``Authorization: Bearer <admin_token>``), ``GET /metrics`` (Prometheus
text), ``GET /healthz`` and ``GET /readyz`` (probes).

Every error is the protocol's ``{"error": "..."}`` with a status that says what went wrong: 400 a bad
request (malformed JSON, wrong datatype or shape, NaN), 401/403 a missing or wrong admin token, 404 an
unknown model or route, 408 a body sent too slowly, 413 a body or batch over the limits, 422 a bad
setting, 429 a full queue (Retry-After), 500 a model that failed on the request's batch, 503 shutting
down or shedding load (Retry-After), 504 the request's deadline passed. Bodies are bounded while they
stream in (any transfer encoding), decoded off the event loop, and a request whose client goes away is
withdrawn from the queues.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import time
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.batching import BATCHING_BOUNDS
from serve.engine import ServingEngine
from serve.frontend import LoopLagMonitor
from serve.oip import ProtocolError, Signature, parse_json_request, rest_response, server_metadata
from serve.service import InferenceService
from serve.triage import TRIAGE_BOUNDS, TRIAGE_MODES

__all__ = ["VERSION", "create_app", "infer_handler"]

VERSION = "0.2.0"
log = logging.getLogger(__name__)
_INFER_PATH = re.compile(r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


# ------------------------------------------------------------------------------- documented shapes
class ErrorBody(BaseModel):
    error: str = Field(description="what is wrong, and what to do")


class LiveBody(BaseModel):
    live: bool


class ReadyBody(BaseModel):
    ready: bool


class ModelReadyBody(BaseModel):
    name: str
    ready: bool


class ServerMetadataBody(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadataBody(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


Scalar = bool | int | float | str


class InferInputTensor(BaseModel):
    name: Literal["input", "image"] = Field(description="'input' (FP32/FP16/UINT8 [n, C, H, W]) or 'image' "
                                                        "(BYTES [n], base64 PNG/JPEG files in JSON)")
    shape: list[Annotated[int, Field(ge=0, lt=2**31)]]
    datatype: Literal["FP32", "FP16", "UINT8", "BYTES"]
    parameters: dict[str, Scalar] | None = None
    data: list[Any] | None = Field(None, description="flat or nested, row-major; absent with binary_data_size")


class InferRequestedOutput(BaseModel):
    name: str
    parameters: dict[str, Scalar] | None = None


class InferRequestBody(BaseModel):
    id: str | None = None
    parameters: dict[str, Scalar] | None = Field(None, description="deadline_ms, priority, binary_data_output")
    inputs: list[InferInputTensor] = Field(min_length=1, max_length=1, description="one tensor")
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Scalar] | None = None
    data: list[Any] | None = None


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Scalar] | None = Field(None, description="engine_ms, compute_ms, queue_ms, triage_level")
    outputs: list[InferOutputTensor]


def _settings_model(name: str, bounds: dict[str, tuple[type, float, float]], **extra: Any) -> type[BaseModel]:
    """A strict request model from the engine's own bounds (one source of truth for types and ranges)."""
    fields: dict[str, Any] = dict(extra)
    for key, (kind, lo, hi) in bounds.items():
        if kind is bool:
            fields[key] = (bool | None, None)
        elif kind is int:  # JSON Schema's integer includes 100.0: accept it, never a bool or 100.5
            fields[key] = (Annotated[int, BeforeValidator(_integral)] | None, Field(None, ge=lo, le=hi))
        else:
            fields[key] = (float | None, Field(None, ge=lo, le=hi))
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=True, allow_inf_nan=False), **fields)


def _integral(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


BatchingUpdate = _settings_model("BatchingUpdate", BATCHING_BOUNDS)
TriageUpdate = _settings_model("TriageUpdate", TRIAGE_BOUNDS, mode=(Literal[TRIAGE_MODES] | None, None))


class SettingsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batching: BatchingUpdate | None = None  # type: ignore[valid-type]
    triage: TriageUpdate | None = None  # type: ignore[valid-type]


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON Schema with its ``$defs`` inlined, to sit in an OpenAPI document as it is."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return walk(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route can answer with."""
    return {code: {"model": ErrorBody, "description": _REASONS[code]} for code in codes}


_REASONS = {400: "bad request", 401: "no admin token given", 403: "wrong admin token, or none configured",
            404: "unknown model, version or route", 405: "method not allowed", 408: "body sent too slowly",
            413: "body or batch over the limits", 422: "a setting of the wrong type or out of bounds",
            429: "queue full (Retry-After)", 500: "the model failed on the request's batch",
            503: "not ready, shutting down, or shedding load (Retry-After)", 504: "the request's deadline passed"}
COMMON = (404, 405, 408, 413, 503)  # what the front door and routing can answer on any route


# ------------------------------------------------------------------------------------ front door
class FrontDoor:
    """ASGI middleware run before routing: reads the body under a byte limit (whatever the transfer
    encoding: chunked bodies are counted as they stream in) and a time limit (a trickled body gets 408),
    sheds ``infer`` requests while the event loop lags over ``shed_lag_ms`` (503, Retry-After), cancels
    the request's work when its client disconnects, and stamps ``Server-Timing: app;dur=<ms>``: the
    server's time from the parsed request head to the answer's head.

    Plain ASGI rather than ``@app.middleware``: that wrapper costs an extra task per request.

    ``infer``: the handler of ``POST /v2/models/{name}[/versions/{v}]/infer``, which the front door calls
    itself, past FastAPI's middleware stack, router and dependency solver (about 0.1 ms per request
    here, a tenth of the serving overhead target); the same handler backs the documented FastAPI route.
    """

    def __init__(self, app, max_body_bytes: int, monitor: LoopLagMonitor, shed_lag_ms: float | None,
                 on_shed=None, body_timeout_s: float = 10.0, infer=None) -> None:
        self.app, self.max_body_bytes, self.monitor, self.shed_lag_ms = app, max_body_bytes, monitor, shed_lag_ms
        self.on_shed = on_shed or (lambda: None)
        self.body_timeout_s = body_timeout_s
        self.infer = infer

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        size = headers.get(b"content-length", b"")
        if size.isdigit() and int(size) > self.max_body_bytes:
            await _error(413, f"request body over {self.max_body_bytes} bytes")(scope, receive, send)
            return
        if self.shed_lag_ms is not None and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            lag_ms = self.monitor.lag_s() * 1e3
            if lag_ms > self.shed_lag_ms:
                self.on_shed()
                await _error(503, f"overloaded: the server runs {lag_ms:.0f} ms behind (shedding above "
                                  f"{self.shed_lag_ms:g} ms); retry later", {"Retry-After": "1"})(scope, receive, send)
                return
        t0 = time.perf_counter()
        body = await self._read_body(receive)
        if isinstance(body, JSONResponse):
            await body(scope, receive, send)
        elif body is not None:  # None: the client went away mid-body, and gets nothing
            route = _INFER_PATH.fullmatch(scope["path"]) if self.infer and scope["method"] == "POST" else None
            if route is not None:
                header = headers.get(b"inference-header-content-length")
                app = self._infer_app(route["name"], route["version"], body,
                                      None if header is None else header.decode("latin-1"))
            else:
                app = self.app
            await self._serve(app, scope, body, receive, _timed(send, t0))

    def _infer_app(self, name: str, version: str | None, body: bytes, header: str | None):
        """An ASGI app answering one infer request (its body already read) through :attr:`infer`, errors
        as the app's handlers give them."""
        async def app(scope, receive, send) -> None:
            try:
                response = await self.infer(name, version, body, header)
            except ProtocolError as e:
                response = _error(e.status, e.message, e.headers)
            except Exception:  # what ServerErrorMiddleware does for the routed app, as the protocol's error
                log.exception("infer on %r failed", name)
                response = _error(500, "internal server error")
            await response(scope, receive, send)

        return app

    async def _read_body(self, receive) -> bytes | JSONResponse | None:
        """The whole body; or the error answer (413 over the limit, 408 too slow); or None if the client left."""
        chunks, total = [], 0
        deadline = time.monotonic() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return _error(408, f"the request body took over {self.body_timeout_s:g} s to arrive")
            if message["type"] == "http.disconnect":
                return None
            total += len(message.get("body", b""))
            if total > self.max_body_bytes:
                return _error(413, f"request body over {self.max_body_bytes} bytes")
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _serve(self, app, scope, body: bytes, receive, send) -> None:
        """Run the app on the buffered body; a disconnect while it runs cancels it (and so its queued rows)."""
        gone = asyncio.Event()
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        app_task = asyncio.ensure_future(app(scope, replay, send))

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()
            app_task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await app_task
        except asyncio.CancelledError:
            if not gone.is_set():  # the server itself is cancelling us
                raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher


def _timed(send, t0: float):
    async def timed_send(message) -> None:
        if message["type"] == "http.response.start":
            dur = f"app;dur={(time.perf_counter() - t0) * 1e3:.3f}".encode()
            message = {**message, "headers": [*message.get("headers", []), (b"server-timing", dur)]}
        await send(message)

    return timed_send


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ------------------------------------------------------------------------------------------ the app
def create_app(engines: dict[str, ServingEngine], max_body_bytes: int = 8 << 20, max_inputs: int = 1024,
               normalize: dict[str, tuple[list[float], list[float]]] | None = None,
               shed_lag_ms: float | None = None, lag_interval_ms: float = 5.0, admin_token: str | None = None,
               body_timeout_s: float = 10.0, max_image_bytes: int = 1 << 20, grpc_host: str = "127.0.0.1",
               grpc_port: int | None = None) -> FastAPI:
    """The app serving ``engines`` (name -> engine). Engines start with the app and drain when it stops.

    ``normalize``: per model, the (mean, std) per channel applied to UINT8 pixels and image files (the
    training transform); FP32/FP16 inputs are taken as already normalised. ``shed_lag_ms``: shed infer
    requests while the event loop runs this many ms late (None: never); the lag, sampled every
    ``lag_interval_ms``, also feeds auto triage and ``serve_event_loop_lag_seconds``. ``admin_token``:
    the bearer token the settings PUT needs (None: settings cannot be changed over HTTP).
    ``grpc_port``: also serve the protocol over gRPC on ``grpc_host:grpc_port`` (0: any free port), on the
    same event loop and inference path, started and stopped with the app (``app.state.grpc_port`` is
    the bound port). ``app.state.service`` is the :class:`serve.service.InferenceService`.
    """
    missing = [n for n, e in engines.items() if e.model.input_shape is None]
    if missing:
        raise ValueError(f"models {missing} have no input_shape: give their adapters one (load_run reads it from "
                         f"the run's data config)")
    norm = normalize or {}
    signatures = {}
    for n, e in engines.items():
        mean, std = norm.get(n, (None, None))
        signatures[n] = Signature(n, tuple(e.model.input_shape), e.model.kind, max_inputs,
                                  tuple(mean) if mean else None, tuple(std) if std else None, max_image_bytes)
    service = InferenceService(engines, signatures)
    monitor = LoopLagMonitor(lag_interval_ms / 1e3)
    registries = {id(e.metrics.registry): e.metrics for e in engines.values()}

    def count_shed() -> None:
        for m in registries.values():
            m.shed.inc()

    grpc = None if grpc_port is None else {"host": grpc_host, "port": grpc_port, "max_message_bytes": max_body_bytes}
    app = FastAPI(title="adaptive-inference serving", version=VERSION, lifespan=_lifespan(service, monitor, grpc),
                  description=__doc__)
    app.state.loop_lag, app.state.service = monitor, service
    infer = infer_handler(service)
    app.add_middleware(FrontDoor, max_body_bytes=max_body_bytes, monitor=monitor, shed_lag_ms=shed_lag_ms,
                       on_shed=count_shed, body_timeout_s=body_timeout_s, infer=infer)
    app.add_exception_handler(ProtocolError, _protocol_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _bad_request)
    app.include_router(_protocol_routes(service, infer))
    app.include_router(_extension_routes(service, admin_token))
    return app


def _lifespan(service: InferenceService, monitor: LoopLagMonitor, grpc: dict[str, Any] | None):
    """Start the lag monitor, the engines and the gRPC server with the app; when it stops, stop taking
    gRPC calls (answering those in flight), then drain the engines."""
    engines = service.engines
    registries = {id(e.metrics.registry): e.metrics for e in engines.values()}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await monitor.start()
        for m in registries.values():
            m.loop_lag.set_function(monitor.lag_s)
        for e in engines.values():
            e.front_lag_s = monitor.lag_s
            await e.start()
        server = None
        if grpc is not None:
            from serve.grpc_server import start_grpc_server

            server, app.state.grpc_port = await start_grpc_server(service, version=VERSION, **grpc)
        yield
        if server is not None:
            await server.stop(grace=5.0)
        for e in engines.values():
            await e.stop(drain=True)
        await monitor.stop()
        service.close()

    return lifespan


async def _protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, "malformed JSON body")
    where = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}" for e in errors)
    return _error(422, f"invalid settings: {where}")


# ----------------------------------------------------------------------------------------- routes
def _protocol_routes(service: InferenceService, infer_fn) -> APIRouter:
    """The Open Inference Protocol's REST routes."""
    router = APIRouter(tags=["Open Inference Protocol v2"], responses=_errors(*COMMON))
    names = sorted(service.signatures)

    @router.get("/v2", response_model=ServerMetadataBody)
    async def metadata() -> dict[str, Any]:
        return server_metadata(VERSION)

    @router.get("/v2/health/live", response_model=LiveBody)
    @router.get("/healthz", response_model=LiveBody, tags=["extensions"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/v2/health/ready", response_model=ReadyBody, responses={503: {"model": ReadyBody}})
    @router.get("/readyz", response_model=ReadyBody, responses={503: {"model": ReadyBody}}, tags=["extensions"])
    async def ready() -> Response:
        ok = service.ready()
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @router.get("/v2/models/{name}", response_model=ModelMetadataBody)
    @router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadataBody)
    async def model_metadata(name: str = Path(examples=names), version: str | None = None) -> dict[str, Any]:
        return service.signature(name, version).metadata()

    @router.get("/v2/models/{name}/ready", response_model=ModelReadyBody, responses={503: {"model": ModelReadyBody}})
    @router.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReadyBody,
                responses={503: {"model": ModelReadyBody}})
    async def model_ready(name: str = Path(examples=names), version: str | None = None) -> Response:
        service.signature(name, version)
        ok = service.ready(name)
        return JSONResponse({"name": name, "ready": ok}, status_code=200 if ok else 503)

    infer_doc = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_schema(InferRequestBody)},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "JSON header (Inference-Header-Content-Length bytes), "
                                                    "then the binary tensors"}}}}
    infer_responses = {200: {"model": InferResponseBody, "content": {"application/octet-stream": {
        "schema": {"type": "string", "format": "binary"}}}}, **_errors(400, 429, 500, 504)}

    @router.post("/v2/models/{name}/infer", response_model=InferResponseBody, openapi_extra=infer_doc,
                 responses=infer_responses)
    @router.post("/v2/models/{name}/versions/{version}/infer", response_model=InferResponseBody,
                 openapi_extra=infer_doc, responses=infer_responses)
    async def infer(request: Request, name: str = Path(examples=names), version: str | None = None) -> Response:
        # The front door answers these itself with the same handler; this route documents them.
        body = await request.body()
        return await infer_fn(name, version, body, request.headers.get("inference-header-content-length"))

    return router


def infer_handler(service: InferenceService):
    """``POST /v2/models/{name}[/versions/{version}]/infer``: ``(name, version, body, the
    Inference-Header-Content-Length header or None) -> Response``; errors raise :class:`ProtocolError`."""
    async def infer(name: str, version: str | None, body: bytes, header: str | None) -> Response:
        sig = service.signature(name, version)
        if header is not None and not header.isdigit():
            raise ProtocolError(f"Inference-Header-Content-Length must be a byte count, got {header!r}")
        req = await service.decode(len(body), parse_json_request, body, int(header) if header else None, sig)
        result = await service.infer(name, req, version)
        content, json_size = rest_response(name, req, result.outputs, result.parameters)
        if json_size is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={"Inference-Header-Content-Length": str(json_size)})

    return infer


def _extension_routes(service: InferenceService, admin_token: str | None) -> APIRouter:
    """Our extensions: triage levels, run-time settings (admin token), Prometheus metrics, probes."""
    router = APIRouter(tags=["extensions"], responses=_errors(*COMMON))
    engines = service.engines
    names = sorted(service.signatures)

    def admin(request: Request) -> None:
        given = request.headers.get("authorization", "")
        if admin_token is None:
            raise ProtocolError("this server was started without admin_token: settings cannot be changed over "
                                "HTTP (start it with admin_token=... or SERVE_ADMIN_TOKEN set)", 403,
                                "PERMISSION_DENIED")
        if not given.startswith("Bearer "):
            raise ProtocolError("changing settings needs 'Authorization: Bearer <admin_token>'", 401,
                                "UNAUTHENTICATED", {"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given[7:].encode(), admin_token.encode()):
            raise ProtocolError("wrong admin token", 403, "PERMISSION_DENIED")

    @router.get("/v2/models/{name}/levels")
    async def levels(name: str = Path(examples=names)) -> dict[str, Any]:
        """The model's kind, stages and triage levels, each priced on the validation split at start-up."""
        service.signature(name)
        return engines[name].describe()

    @router.get("/v2/settings")
    async def settings() -> dict[str, Any]:
        """Batching and triage knobs of every model, its current triage level and recent changes."""
        return {name: e.settings() for name, e in engines.items()}

    @router.put("/v2/settings/{name}", dependencies=[Depends(admin)], responses=_errors(400, 401, 403, 422))
    async def update_settings(body: SettingsUpdate, name: str = Path(examples=names)) -> dict[str, Any]:
        """Change a model's knobs while serving (typed and bounded; a bad value changes nothing)."""
        service.signature(name)
        try:
            return engines[name].update(body.batching.model_dump(exclude_none=True) if body.batching else None,
                                        body.triage.model_dump(exclude_none=True) if body.triage else None)
        except (ValueError, TypeError) as e:
            raise ProtocolError(str(e), 422) from None

    @router.get("/metrics", response_class=PlainTextResponse,
                responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                                 "description": "Prometheus text exposition format"}})
    async def metrics() -> Response:
        regs = {id(e.metrics.registry): e.metrics.registry for e in engines.values()}
        return PlainTextResponse(b"".join(generate_latest(r) for r in regs.values()), media_type=CONTENT_TYPE_LATEST)

    return router
