"""The Open Inference Protocol (v2): requests and answers as tensors, shared by the REST and gRPC front ends.

This module is the protocol's codec and nothing else: it turns a REST body (JSON, with the binary
tensor extension) or a gRPC ``ModelInferRequest`` into an :class:`InferRequest` of numpy tensors, checks
them against a model's :class:`Signature` into the batch the engine runs, and turns the engine's
answers into protocol outputs. Every problem a client can cause is a :class:`ProtocolError` that names
it, with the HTTP status and gRPC code both front ends answer with; nothing a client sends is
allocated before its size is known to be within bounds.

Inputs (one tensor per request):

- ``input``: ``FP32`` or ``FP16`` in the model's input shape ``[n, C, H, W]``, taken as normalised as the
  model was trained; or ``UINT8`` pixels ``[n, C, H, W]`` in 0..255, scaled to [0, 1] and normalised as
  the training data was (the model's ``normalize``).
- ``image``: ``BYTES`` ``[n]``, each element a PNG or JPEG file of exactly the model's size; its size is
  read from the file's header and checked before any pixel is decoded.

Outputs, one row per input (all when the request names none): ``label`` INT64, ``confidence`` FP32,
``exit_stage`` INT32 (the cascade stage that answered), ``blocks_executed`` FP32 (SkipNet models
only), ``gflops`` FP64 (the row's exact float cost), ``int8_gops`` FP64 (its int8 operations, 0 for a float
model), ``triage_level`` INT32 (0 = as calibrated).
Request ``parameters`` we read: ``deadline_ms`` (or Triton's ``timeout`` in microseconds),
``priority``, ``binary_data_output``. Response ``parameters`` (maxima over the rows): ``engine_ms``
(arrival in the engine to answer), ``compute_ms`` (the model's time on the batches the rows were in),
``queue_ms``, ``triage_level``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

__all__ = ["DTYPES", "OUTPUTS", "InferRequest", "ProtocolError", "Signature", "Tensor", "array_from_raw",
           "bytes_elements", "output_tensors", "parse_json_request", "requested_outputs", "rest_response",
           "server_metadata"]

# The protocol's tensor datatypes we read or write, as little-endian numpy types.
DTYPES: dict[str, str] = {"BOOL": "?", "UINT8": "u1", "INT32": "<i4", "INT64": "<i8", "FP16": "<f2",
                          "FP32": "<f4", "FP64": "<f8"}
INPUT_DTYPES = ("FP32", "FP16", "UINT8")
OUTPUTS: dict[str, str] = {"label": "INT64", "confidence": "FP32", "exit_stage": "INT32",
                           "blocks_executed": "FP32", "gflops": "FP64", "int8_gops": "FP64", "triage_level": "INT32"}
EXTENSIONS = ["binary_tensor_data", "parameters", "adaptive_inference_settings"]
FP32_MAX = float(np.finfo(np.float32).max)


class ProtocolError(Exception):
    """A request the protocol refuses: ``status`` is the HTTP status, ``grpc_code`` the gRPC code's name."""

    def __init__(self, message: str, status: int = 400, grpc_code: str = "INVALID_ARGUMENT",
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.grpc_code, self.headers = message, status, grpc_code, dict(headers or {})


@dataclass
class Tensor:
    """One protocol tensor: ``data`` is a numpy array in ``shape`` (``BYTES``: a list of bytes)."""

    name: str
    datatype: str
    shape: list[int]
    data: Any
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class InferRequest:
    """A parsed inference request: one or more input tensors, the outputs asked for (None: all)."""

    inputs: list[Tensor]
    outputs: list[tuple[str, dict[str, Any]]] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def deadline_ms(self) -> float | None:
        """The request's deadline: our ``deadline_ms``, else Triton's ``timeout`` (microseconds)."""
        p = self.parameters
        if "deadline_ms" in p:
            value = _number(p["deadline_ms"], "parameters.deadline_ms")
        elif "timeout" in p:
            value = _number(p["timeout"], "parameters.timeout") / 1e3
        else:
            return None
        if not 0 < value <= 3.6e6:
            raise ProtocolError(f"the deadline must be over 0 and at most one hour, got {value:g} ms")
        return value

    def priority(self) -> int:
        value = self.parameters.get("priority", 0)
        if isinstance(value, bool) or not isinstance(value, int) or abs(value) > 2**31:
            raise ProtocolError(f"parameters.priority must be an integer within +-2^31, got {value!r}")
        return value


@dataclass(frozen=True)
class Signature:
    """What one served model takes and gives: its input shape, classes, kind, and image normalisation."""

    name: str
    input_shape: tuple[int, ...]
    kind: str = "model"
    max_inputs: int = 1024
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    max_image_bytes: int = 1 << 20

    def metadata(self, versions: Sequence[str] = ("1",)) -> dict[str, Any]:
        """The protocol's model metadata object."""
        return {"name": self.name, "versions": list(versions), "platform": f"pytorch_{self.kind}",
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *self.input_shape]}],
                "outputs": [{"name": n, "datatype": OUTPUTS[n], "shape": [-1]} for n in self.outputs]}

    @property
    def outputs(self) -> tuple[str, ...]:
        """The outputs this kind of model gives (``blocks_executed`` only where blocks are skipped)."""
        return tuple(n for n in OUTPUTS if n != "blocks_executed" or self.kind in ("skipnet", "random_skip"))

    def batch(self, req: InferRequest) -> np.ndarray:
        """The request's inputs as a float32 batch ``[n, *input_shape]``, checked and normalised."""
        if len(req.inputs) != 1:
            raise ProtocolError(f"give exactly one input tensor ('input' or 'image'), got {len(req.inputs)}")
        t = req.inputs[0]
        if t.name == "image":
            if t.datatype != "BYTES":
                raise ProtocolError(f"input 'image' must be BYTES (encoded PNG/JPEG files), got {t.datatype}")
            x = self._pixels(np.stack([self._decode(b) for b in t.data])) if t.data else None
        elif t.name == "input":
            if t.datatype not in INPUT_DTYPES:
                raise ProtocolError(f"input 'input' must be one of {list(INPUT_DTYPES)}, got {t.datatype!r}")
            x = self._pixels(t.data) if t.datatype == "UINT8" else t.data.astype(np.float32, copy=False)
        else:
            raise ProtocolError(f"unknown input {t.name!r}; model {self.name!r} takes 'input' "
                                f"(FP32/FP16/UINT8, shape {[-1, *self.input_shape]}) or 'image' (BYTES)")
        if x is None or len(x) == 0:
            raise ProtocolError("the input holds no rows")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ProtocolError(f"input shape {list(x.shape)} does not match the model's {[-1, *self.input_shape]}")
        if not np.isfinite(x).all():
            raise ProtocolError("the input holds NaN or infinity")
        return x if x.flags.writeable else x.copy()  # torch wants writable memory

    def check_shape(self, t: Tensor) -> None:
        """Refuse, before any data is read, a tensor over ``max_inputs`` rows or of the wrong rank."""
        if t.name == "image":
            if len(t.shape) != 1 or t.shape[0] > self.max_inputs:
                raise ProtocolError(f"'image' must have shape [n] with n <= {self.max_inputs}, got {t.shape}",
                                    status=413 if len(t.shape) == 1 else 400)
            return
        if len(t.shape) != 1 + len(self.input_shape) or list(t.shape[1:]) != list(self.input_shape):
            raise ProtocolError(f"input shape {t.shape} does not match the model's {[-1, *self.input_shape]}")
        if t.shape[0] > self.max_inputs:
            raise ProtocolError(f"{t.shape[0]} rows in one request; at most {self.max_inputs}", status=413)

    def _pixels(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32) / 255.0
        if self.mean is not None and self.std is not None:
            shape = (1, -1) + (1,) * (x.ndim - 2)
            x = (x - np.asarray(self.mean, np.float32).reshape(shape)) / np.asarray(self.std, np.float32).reshape(shape)
        return x

    def _decode(self, data: bytes) -> np.ndarray:
        """One encoded image as uint8 ``[C, H, W]``: the header's size is checked before pixels are decoded."""
        from PIL import Image, UnidentifiedImageError

        if len(data) > self.max_image_bytes:
            raise ProtocolError(f"an image of {len(data)} bytes; at most {self.max_image_bytes}", status=413)
        c, h, w = self.input_shape
        try:
            img = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
            raise ProtocolError("each 'image' element must be a PNG or JPEG file") from None
        if img.size != (w, h):
            raise ProtocolError(f"an image of {img.size[0]}x{img.size[1]} pixels; model {self.name!r} takes "
                                f"{w}x{h} (resize on the client: the server does not guess)")
        try:
            img = img.convert("L" if c == 1 else "RGB")
        except (OSError, ValueError, SyntaxError):
            raise ProtocolError("an 'image' element is a truncated or corrupt file") from None
        a = np.asarray(img, dtype=np.uint8)
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _shape(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31
                                              for d in value):
        raise ProtocolError(f"{where}.shape must be a list of non-negative integers, got {value!r}")
    return value


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, (bool, int, float, str)) for v in value.values()):
        raise ProtocolError(f"{where}.parameters must be an object of scalars")
    return value


# --------------------------------------------------------------------------------------------- REST
def _loads(head: bytes) -> Any:
    """orjson (8x the standard library on 16 MNIST images as JSON numbers: 2.4 against 20 ms, which
    capped the JSON benchmark's throughput); a body it refuses is parsed again by the standard library,
    which also reads NaN literals and integers past 64 bits, so that those are refused by name below."""
    try:
        return orjson.loads(head)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(head)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ProtocolError("the request body is not valid JSON") from None


def parse_json_request(body: bytes, header_length: int | None, signature: Signature) -> InferRequest:
    """A REST ``infer`` body: JSON, or with ``Inference-Header-Content-Length`` JSON then binary tensors.

    Sizes are checked against ``signature`` (rows, element counts, byte counts) before data is converted.
    """
    if header_length is not None:
        if not 0 < header_length <= len(body):
            raise ProtocolError(f"Inference-Header-Content-Length {header_length} is outside the body's "
                                f"{len(body)} bytes")
        head, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        head, binary = body, memoryview(b"")
    doc = _loads(head)
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list):
        raise ProtocolError("the request must be a JSON object with an 'inputs' list")
    inputs, offset = [], 0
    for i, spec in enumerate(doc["inputs"]):
        tensor, used = _json_tensor(spec, binary[offset:], f"inputs[{i}]", signature)
        inputs.append(tensor)
        offset += used
    if offset != len(binary):
        raise ProtocolError(f"{len(binary) - offset} bytes of binary data follow the tensors that use them")
    outputs = doc.get("outputs")
    if outputs is not None:
        if not isinstance(outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                    for o in outputs):
            raise ProtocolError("'outputs' must be a list of objects with a 'name'")
        outputs = [(o["name"], _parameters(o.get("parameters"), f"outputs[{o['name']}]")) for o in outputs]
    rid = doc.get("id", "")
    if not isinstance(rid, str) or len(rid) > 256:
        raise ProtocolError("'id' must be a string of at most 256 characters")
    return InferRequest(inputs, outputs, _parameters(doc.get("parameters"), "request"), rid)


def _json_tensor(spec: Any, binary: memoryview, where: str, signature: Signature) -> tuple[Tensor, int]:
    """One input tensor from its JSON object; returns it and the binary bytes it used."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("datatype"), str):
        raise ProtocolError(f"{where} must be an object with 'name', 'shape', 'datatype' and 'data'")
    t = Tensor(spec["name"], spec["datatype"], _shape(spec.get("shape"), where), None,
               _parameters(spec.get("parameters"), where))
    if t.datatype not in (*DTYPES, "BYTES"):
        raise ProtocolError(f"{where}: unknown datatype {t.datatype!r}")
    signature.check_shape(t)
    count = math.prod(t.shape)
    size = t.parameters.get("binary_data_size")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= len(binary):
            raise ProtocolError(f"{where}: binary_data_size {size!r} is more than the {len(binary)} bytes sent")
        raw = bytes(binary[:size])
        t.data = bytes_elements(raw, count, where) if t.datatype == "BYTES" else array_from_raw(raw, t, where)
        return t, size
    if "data" not in spec:
        raise ProtocolError(f"{where} has neither 'data' nor parameters.binary_data_size")
    t.data = _from_json_data(spec["data"], t, count, where)
    return t, 0


def array_from_raw(raw: bytes, t: Tensor, where: str) -> np.ndarray:
    dtype = np.dtype(DTYPES[t.datatype])
    if len(raw) != math.prod(t.shape) * dtype.itemsize:
        raise ProtocolError(f"{where}: {len(raw)} bytes of {t.datatype} data for shape {t.shape} "
                            f"({math.prod(t.shape) * dtype.itemsize} expected)")
    return np.frombuffer(raw, dtype=dtype).reshape(t.shape)


def _from_json_data(data: Any, t: Tensor, count: int, where: str) -> Any:
    if t.datatype == "BYTES":
        items = data if isinstance(data, list) else [data]
        if len(items) != count or not all(isinstance(s, str) for s in items):
            raise ProtocolError(f"{where}: BYTES data must be {count} strings (base64 for images)")
        try:
            return [base64.b64decode(s, validate=True) for s in items]
        except (binascii.Error, ValueError):
            raise ProtocolError(f"{where}: BYTES elements must be base64 in JSON") from None
    try:
        # float64 first: every JSON number fits or overflows to inf, which is refused below by name.
        flat = np.asarray(data, dtype=np.float64).reshape(-1)
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(f"{where}: data must be a (nested or flat) list of numbers") from None
    if flat.size != count:
        raise ProtocolError(f"{where}: {flat.size} elements for shape {t.shape} ({count} expected)")
    if not np.isfinite(flat).all():
        raise ProtocolError(f"{where}: data holds NaN, infinity or a number too large")
    if t.datatype in ("FP32", "FP16"):
        limit = FP32_MAX if t.datatype == "FP32" else 65504.0
        if np.abs(flat).max(initial=0.0) > limit:
            raise ProtocolError(f"{where}: a value is out of {t.datatype} range (|x| <= {limit:g})")
    elif t.datatype == "UINT8" and (flat.min(initial=0) < 0 or flat.max(initial=0) > 255 or (flat % 1).any()):
        raise ProtocolError(f"{where}: UINT8 data must be integers 0..255")
    return flat.astype(DTYPES[t.datatype]).reshape(t.shape)


def bytes_elements(raw: bytes, count: int, where: str) -> list[bytes]:
    """The binary form of BYTES: each element a 4-byte little-endian length, then its bytes."""
    out, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"{where}: binary BYTES data ends inside an element's length")
        (n,) = struct.unpack_from("<I", raw, pos)
        if pos + 4 + n > len(raw):
            raise ProtocolError(f"{where}: a BYTES element of {n} bytes runs past the data sent")
        out.append(raw[pos + 4:pos + 4 + n])
        pos += 4 + n
    if pos != len(raw):
        raise ProtocolError(f"{where}: {len(raw) - pos} bytes after the last BYTES element")
    return out


def requested_outputs(req: InferRequest, signature: Signature) -> list[tuple[str, dict[str, Any]]]:
    """The outputs the request asks for (all of the model's when it names none); unknown names refused
    before the request is queued."""
    if req.outputs is None:
        return [(n, {}) for n in signature.outputs]
    unknown = [n for n, _ in req.outputs if n not in signature.outputs]
    if unknown:
        raise ProtocolError(f"unknown outputs {unknown}; model {signature.name!r} gives {list(signature.outputs)}")
    return req.outputs


def output_tensors(rows: Sequence[Mapping[str, Any]], requested: list[tuple[str, dict[str, Any]]]) -> list[Tensor]:
    """One tensor per requested output, a row per answer; ``rows`` are the answers' fields by output name."""
    return [Tensor(n, OUTPUTS[n], [len(rows)], np.asarray([r[n] for r in rows], dtype=DTYPES[OUTPUTS[n]]), params)
            for n, params in requested]


def rest_response(model: str, req: InferRequest, outputs: list[Tensor],
                  parameters: dict[str, Any]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, its JSON header's length."""
    binary_all = bool(req.parameters.get("binary_data_output", False))
    blobs, out = [], []
    for t in outputs:
        entry: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if t.parameters.get("binary_data", binary_all):
            raw = np.ascontiguousarray(t.data).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = t.data.tolist()
        out.append(entry)
    doc = {"model_name": model, "model_version": "1", "outputs": out, "parameters": parameters}
    if req.id:
        doc["id"] = req.id
    head = json.dumps(doc, allow_nan=False).encode()
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)


def server_metadata(version: str) -> dict[str, Any]:
    """The protocol's server metadata object."""
    return {"name": "adaptive-inference", "version": version, "extensions": EXTENSIONS}
