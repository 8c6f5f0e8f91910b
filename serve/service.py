"""The one inference path behind every front end: a parsed protocol request in, protocol outputs out.

REST (``serve.app``) and gRPC (``serve.grpc_server``) parse their own wire formats into an
:class:`serve.oip.InferRequest` and call :meth:`InferenceService.infer`; everything after that (checks,
decoding off the event loop, queueing, the engine's failures mapped to protocol errors, the outputs)
happens here once.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from serve.engine import EngineClosed, ModelFailed, QueueFull, ServingEngine
from serve.oip import InferRequest, ProtocolError, Signature, Tensor, output_tensors, requested_outputs

__all__ = ["InferenceService", "InferResult"]


@dataclass
class InferResult:
    """The outputs of one request and the response parameters (our extensions)."""

    outputs: list[Tensor]
    parameters: dict[str, Any]


class InferenceService:
    """The served models by name: their engines and protocol signatures.

    Decoding (JSON numbers, binary tensors, image files) of anything but a small request runs on a
    small pool of its own threads, never on the device thread, so a large or slow request delays only
    itself. A request of at most ``inline_bytes`` (and no image files) is decoded on the event loop:
    its cost is bounded by that size (tens of microseconds) and is less than the two thread hops.
    """

    def __init__(self, engines: Mapping[str, ServingEngine], signatures: Mapping[str, Signature],
                 decode_threads: int = 2, inline_bytes: int = 16384) -> None:
        self.engines, self.signatures = dict(engines), dict(signatures)
        self.inline_bytes = inline_bytes
        self._decoder = ThreadPoolExecutor(max_workers=decode_threads, thread_name_prefix="serve-decode")

    def signature(self, name: str, version: str | None = None) -> Signature:
        """The model's signature; unknown names and versions are a 404 that lists the models."""
        if name not in self.signatures:
            raise ProtocolError(f"no model {name!r}; models: {sorted(self.signatures)}", 404, "NOT_FOUND")
        if version not in (None, "", "1"):
            raise ProtocolError(f"model {name!r} has no version {version!r}; versions: ['1']", 404, "NOT_FOUND")
        return self.signatures[name]

    def ready(self, name: str | None = None) -> bool:
        """Whether the model (None: every model) is serving."""
        engines = [self.engines[name]] if name is not None else list(self.engines.values())
        return all(e.ready for e in engines)

    async def decode(self, size: int, fn, *args):
        """Run a decoding step of a payload of ``size`` bytes: inline when small, else on the decoder threads."""
        if size <= self.inline_bytes:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._decoder, fn, *args)

    async def infer(self, name: str, req: InferRequest, version: str | None = None) -> InferResult:
        """Check, queue and answer one request; every failure is a :class:`ProtocolError`."""
        sig = self.signature(name, version)
        requested = requested_outputs(req, sig)
        deadline_ms, priority = req.deadline_ms(), req.priority()
        t = req.inputs[0] if req.inputs else None
        small = t is not None and t.datatype != "BYTES" and math.prod(t.shape) * 4 <= self.inline_bytes
        x = torch.from_numpy(await self.decode(0 if small else self.inline_bytes + 1, sig.batch, req))
        engine = self.engines[name]
        try:
            answers = await engine.submit(x, deadline_ms, priority)
        except QueueFull as e:
            raise ProtocolError(str(e), 429, "RESOURCE_EXHAUSTED",
                                {"Retry-After": str(max(1, int(-(-e.retry_after_s // 1))))}) from None
        except EngineClosed as e:
            raise ProtocolError(str(e), 503, "UNAVAILABLE") from None
        except ModelFailed as e:
            raise ProtocolError(str(e), 500, "INTERNAL") from None
        late = sum(a.status != "ok" for a in answers)
        if late:
            raise ProtocolError(f"{late} of {len(answers)} inputs missed the request's deadline of "
                                f"{deadline_ms if deadline_ms is not None else engine.batching.slo_ms:g} ms",
                                504, "DEADLINE_EXCEEDED")
        rows = [{"label": a.label, "confidence": a.confidence, "exit_stage": a.exit_stage,
                 "blocks_executed": a.blocks_executed, "gflops": a.flops / 1e9, "int8_gops": a.int8_ops / 1e9,
                 "triage_level": a.triage_level}
                for a in answers]
        params = {"engine_ms": round(max(a.latency_ms for a in answers), 3),
                  "compute_ms": round(max(a.compute_ms for a in answers), 3),
                  "queue_ms": round(max(a.queue_ms for a in answers), 3),
                  "triage_level": max(a.triage_level for a in answers)}
        return InferResult(output_tensors(rows, requested), params)

    def close(self) -> None:
        self._decoder.shutdown(wait=False, cancel_futures=True)
