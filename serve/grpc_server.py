"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), on the same inference path.

The service is KServe's ``grpc_predict_v2.proto`` (``serve/proto``); Triton's client calls it unchanged
(its proto is a superset with the same messages and method names). Requests become an
:class:`serve.oip.InferRequest` and go through the one :class:`serve.service.InferenceService` the REST
app uses; its :class:`serve.oip.ProtocolError` maps to the gRPC status of the same name. Tensors come
in ``raw_input_contents`` or typed ``contents``; outputs go back in ``raw_output_contents`` (what Triton
sends, and what its client reads). A call's gRPC deadline is the request's deadline unless
``parameters.deadline_ms`` says otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
import numpy as np

from serve.oip import DTYPES, InferRequest, ProtocolError, Tensor, array_from_raw, bytes_elements, server_metadata
from serve.proto import grpc_predict_v2_pb2 as pb
from serve.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from serve.service import InferenceService

__all__ = ["GRPCInferenceServicer", "start_grpc_server"]

_CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "INT32": "int_contents", "INT64": "int64_contents",
             "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _params(m) -> dict[str, Any]:
    return {k: _param(v) for k, v in m.items()}


def _set_param(target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


def parse_grpc_request(msg: pb.ModelInferRequest, sig) -> InferRequest:
    """A ``ModelInferRequest`` as an :class:`InferRequest`, sizes checked against the model's signature."""
    if msg.raw_input_contents and len(msg.raw_input_contents) != len(msg.inputs):
        raise ProtocolError(f"{len(msg.raw_input_contents)} raw_input_contents for {len(msg.inputs)} inputs")
    inputs = []
    for i, t in enumerate(msg.inputs):
        tensor = Tensor(t.name, t.datatype, list(t.shape), None, _params(t.parameters))
        if tensor.datatype not in (*DTYPES, "BYTES"):
            raise ProtocolError(f"inputs[{i}]: unknown datatype {tensor.datatype!r}")
        sig.check_shape(tensor)
        count = math.prod(tensor.shape)
        if msg.raw_input_contents:
            raw = msg.raw_input_contents[i]
            tensor.data = (bytes_elements(raw, count, f"inputs[{i}]") if tensor.datatype == "BYTES"
                           else array_from_raw(raw, tensor, f"inputs[{i}]"))
        else:
            tensor.data = _from_contents(t, tensor, count, i)
        inputs.append(tensor)
    outputs = [(o.name, _params(o.parameters)) for o in msg.outputs] or None
    return InferRequest(inputs, outputs, _params(msg.parameters), msg.id)


def _from_contents(t, tensor: Tensor, count: int, i: int) -> Any:
    field = _CONTENTS.get(tensor.datatype)
    if field is None:
        raise ProtocolError(f"inputs[{i}]: {tensor.datatype} data must come in raw_input_contents")
    values = getattr(t.contents, field)
    if len(values) != count:
        raise ProtocolError(f"inputs[{i}]: {len(values)} elements for shape {tensor.shape} ({count} expected)")
    if tensor.datatype == "BYTES":
        return list(values)
    if tensor.datatype == "UINT8" and any(v > 255 for v in values):
        raise ProtocolError(f"inputs[{i}]: UINT8 data must be 0..255")
    return np.asarray(values, dtype=DTYPES[tensor.datatype]).reshape(tensor.shape)


class GRPCInferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's six methods over one :class:`InferenceService`."""

    def __init__(self, service: InferenceService, version: str) -> None:
        self.service, self.version = service, version

    async def ServerLive(self, request, context):  # noqa: N802 (the protocol's method names)
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):  # noqa: N802
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def ModelReady(self, request, context):  # noqa: N802
        await self._guard(context, self.service.signature, request.name, request.version)
        return pb.ModelReadyResponse(ready=self.service.ready(request.name))

    async def ServerMetadata(self, request, context):  # noqa: N802
        return pb.ServerMetadataResponse(**server_metadata(self.version))

    async def ModelMetadata(self, request, context):  # noqa: N802
        sig = await self._guard(context, self.service.signature, request.name, request.version)
        meta = sig.metadata()
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=[tensors(**t) for t in meta["inputs"]],
                                        outputs=[tensors(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request, context):  # noqa: N802
        try:
            sig = self.service.signature(request.model_name, request.model_version)
            size = request.ByteSize()
            req = await self.service.decode(size, parse_grpc_request, request, sig)
            remaining = context.time_remaining()
            if "deadline_ms" not in req.parameters and "timeout" not in req.parameters and remaining is not None:
                req.parameters["deadline_ms"] = max(remaining * 1e3, 1e-3)
            result = await self.service.infer(request.model_name, req, request.model_version)
        except ProtocolError as e:
            await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for k, v in result.parameters.items():
            _set_param(response.parameters[k], v)
        for t in result.outputs:
            response.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
            response.raw_output_contents.append(np.ascontiguousarray(t.data).tobytes())
        return response

    async def _guard(self, context, fn, *args):
        try:
            return fn(*args)
        except ProtocolError as e:
            await context.abort(getattr(grpc.StatusCode, e.grpc_code), e.message)


async def start_grpc_server(service: InferenceService, host: str, port: int, version: str,
                            max_message_bytes: int) -> tuple[grpc.aio.Server, int]:
    """Start the gRPC server on the running event loop; returns it and the bound port (``port=0``: any).

    Messages over ``max_message_bytes`` are refused by gRPC itself (RESOURCE_EXHAUSTED) before they are
    parsed.
    """
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    server = grpc.aio.server(options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(GRPCInferenceServicer(service, version), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    await server.start()
    return server, bound
