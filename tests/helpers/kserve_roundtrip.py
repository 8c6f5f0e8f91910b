"""KServe's Python SDK against a running server: ``python -m tests.helpers.kserve_roundtrip URL GRPC_PORT``.

Reads a batch (nested lists, ``[n, 1, 8, 8]``) on stdin; builds KServe ``InferRequest`` objects, sends
their REST form (JSON and binary) and their gRPC form (through KServe's own generated stubs), parses
each answer back with ``InferResponse``, and prints the labels of each route as JSON. Runs as its own
process: KServe's and Triton's generated protos register the same names and cannot load together.
"""

from __future__ import annotations

import json
import sys

import grpc
import httpx
import numpy as np
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as kserve_grpc
from kserve.protocol.infer_type import InferInput, InferRequest, InferResponse


def request(x: np.ndarray, binary: bool) -> InferRequest:
    i = InferInput("input", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return InferRequest("cascade", [i], request_id="kserve-1")


def main(url: str, grpc_port: int) -> dict[str, list[int]]:
    x = np.asarray(json.load(sys.stdin), dtype=np.float32)
    out = {}
    for name, binary in (("rest_json", False), ("rest_binary", True)):
        body, json_length = request(x, binary).to_rest()
        if json_length is None:
            r = httpx.post(f"{url}/v2/models/cascade/infer", json=body, timeout=30)
            r.raise_for_status()
            res = InferResponse.from_rest(r.json())
        else:
            r = httpx.post(f"{url}/v2/models/cascade/infer", content=body, timeout=30,
                           headers={"inference-header-content-length": str(json_length),
                                    "content-type": "application/octet-stream"})
            r.raise_for_status()
            header = r.headers.get("inference-header-content-length")
            res = (InferResponse.from_bytes(r.content, int(header)) if header
                   else InferResponse.from_rest(r.json()))
        assert res.id in ("kserve-1", None, "")
        out[name] = res.get_output_by_name("label").as_numpy().tolist()
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        res = InferResponse.from_grpc(stub.ModelInfer(request(x, False).to_grpc(), timeout=30))
        out["grpc"] = res.get_output_by_name("label").as_numpy().tolist()
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
