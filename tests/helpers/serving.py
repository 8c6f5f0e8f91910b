"""Serving fixtures shared by the engine, protocol and fault tests: small models and a real server."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time

import httpx
import torch

from cascades import CascadeAdapter, build_cascade
from gating.adapters import ModelAdapter, Point, StageResult
from gating.idk import MaxProbIDK
from models import create_model
from serve.app import create_app
from serve.engine import BatchingConfig, ServingEngine

ADMIN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}


class FakeCascade(ModelAdapter):
    """Two stages; stage 0 answers rows whose first value is >= 0 (at triage level >= 1: every row).
    Records the size of every batch per stage, and sleeps ``delay_s`` per batch. ``fail_next``: the
    next batch raises (``"raise"``) or gives NaN logits (``"nan"``)."""

    kind = "cascade"

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__("fake", [Point("default"), Point("first_stage", {"first_stage": True})], (3,), 2)
        self.delay_s = delay_s
        self.batches: list[tuple[int, int]] = []
        self.fail_next: str | None = None

    @property
    def num_stages(self) -> int:
        return 2

    def modules(self) -> list[torch.nn.Module]:
        return []

    def stage(self, k: int, x: torch.Tensor, point=None) -> StageResult:
        self.batches.append((k, len(x)))
        if self.delay_s:
            time.sleep(self.delay_s)
        failure, self.fail_next = self.fail_next, None
        if failure == "raise":
            raise RuntimeError("injected fault")
        first_stage = self.point(point).settings.get("first_stage", False)
        done = torch.ones(len(x), dtype=torch.bool) if k == 1 or first_stage else x[:, 0] >= 0
        logits = torch.stack([x[:, 1], -x[:, 1]], 1)
        if failure == "nan":
            logits = logits * float("nan")
        return StageResult(done, logits, torch.full((len(x),), 10.0 * (k + 1), dtype=torch.float64), None, x)


def tiny_cascade() -> CascadeAdapter:
    """A real 2-stage cascade (linear -> tiny CNN) on 1x8x8 inputs, seeded, warmed up."""
    torch.manual_seed(0)
    stages = {"lin": create_model("linear", num_classes=10, in_chans=1, image_size=8),
              "cnn": create_model("tiny_cnn", num_classes=10, in_chans=1, width=4)}
    cascade = build_cascade(stages, MaxProbIDK(), thresholds=[0.15]).eval()
    adapter = CascadeAdapter(cascade, name="cascade", input_shape=(1, 8, 8), num_classes=10)
    adapter.run(torch.zeros(1, 1, 8, 8))  # cost tables, before any deadline runs
    return adapter


def make_app(max_queue: int = 4096, delay_s: float = 0.0, shed_lag_ms: float | None = None,
             fake: FakeCascade | None = None, **kwargs):
    """The app serving ``cascade`` (a real tiny cascade) and ``fake`` (:class:`FakeCascade`)."""
    batching = BatchingConfig(max_batch_size=16, max_delay_ms=1, max_queue=max_queue)
    engines = {"cascade": ServingEngine(tiny_cascade(), batching),
               "fake": ServingEngine(fake or FakeCascade(delay_s),
                                     BatchingConfig(max_batch_size=2, max_delay_ms=0, max_queue=max_queue,
                                                    slo_ms=10000))}
    kwargs.setdefault("admin_token", ADMIN)
    return create_app(engines, max_body_bytes=200_000, max_inputs=64, shed_lag_ms=shed_lag_ms, **kwargs)


def png(value: int = 128, size: tuple[int, int] = (8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


def png_b64(value: int = 128, size: tuple[int, int] = (8, 8)) -> str:
    return base64.b64encode(png(value, size)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(app, header_timeout_s: float | None = None):
    """``app`` under a real uvicorn on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    from serve.frontend import header_timeout_protocol

    port = free_port()
    extra = {"http": header_timeout_protocol(header_timeout_s)} if header_timeout_s else {}
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **extra))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def infer_json(x, name: str = "input", datatype: str = "FP32", **extra) -> dict:
    """A protocol JSON infer body for the array-like ``x``."""
    x = torch.as_tensor(x)
    return {"inputs": [{"name": name, "shape": list(x.shape), "datatype": datatype,
                        "data": x.reshape(-1).tolist()}], **extra}
