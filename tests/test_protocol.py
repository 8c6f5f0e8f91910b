"""The Open Inference Protocol (v2): every REST route and error case against the specification, Triton's
own client over HTTP (JSON and binary) and gRPC against a real server on loopback, KServe's SDK types,
bounded inputs, and the faults a deployment meets (a failing batch, a slow model, SIGTERM under load,
probes while saturated)."""

from __future__ import annotations

import asyncio
import base64
import csv
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from tests.helpers.serving import FakeCascade, free_port, infer_json, make_app, png, png_b64, served, tiny_cascade

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def _offline(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Labels and confidences of the tiny cascade run in this process, one batch."""
    with torch.inference_mode():
        conf, label = tiny_cascade().run(x).logits.softmax(-1).max(-1)
    return label.numpy(), conf.numpy()


# ------------------------------------------------------------------------ shapes of the specification
def _is_tensor_metadata(t) -> bool:
    return set(t) == {"name", "datatype", "shape"} and isinstance(t["name"], str) and \
        isinstance(t["datatype"], str) and all(isinstance(d, int) for d in t["shape"])


def _check_server_metadata(doc) -> None:
    assert isinstance(doc["name"], str) and isinstance(doc["version"], str)
    assert all(isinstance(e, str) for e in doc["extensions"]) and "binary_tensor_data" in doc["extensions"]


def _check_model_metadata(doc, name) -> None:
    assert doc["name"] == name and isinstance(doc["platform"], str) and doc["versions"] == ["1"]
    assert all(_is_tensor_metadata(t) for t in doc["inputs"] + doc["outputs"])


def _check_infer_response(doc, name, rows) -> None:
    assert doc["model_name"] == name and isinstance(doc["outputs"], list) and doc["outputs"]
    for o in doc["outputs"]:
        assert {"name", "shape", "datatype"} <= set(o) and o["shape"] == [rows]
        assert ("data" in o) != ("binary_data_size" in o.get("parameters", {}))
        if "data" in o:
            assert len(o["data"]) == rows
    assert all(isinstance(v, (bool, int, float, str)) for v in doc.get("parameters", {}).values())


def _check_error(r, status) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    doc = r.json()
    assert set(doc) == {"error"} and isinstance(doc["error"], str) and doc["error"], doc


def test_every_rest_route_and_error_case_against_the_specification():
    labels, _ = _offline(X[:3])
    with TestClient(make_app()) as c:
        _check_server_metadata(c.get("/v2").json())
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        for path in ("/v2/models/cascade", "/v2/models/cascade/versions/1"):
            _check_model_metadata(c.get(path).json(), "cascade")
        meta = c.get("/v2/models/cascade").json()
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        for path in ("/v2/models/cascade/ready", "/v2/models/cascade/versions/1/ready"):
            assert c.get(path).json() == {"name": "cascade", "ready": True}
        for path in ("/v2/models/cascade/infer", "/v2/models/cascade/versions/1/infer"):
            r = c.post(path, json=infer_json(X[:3], id="req-7", parameters={"priority": 2}))
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            doc = r.json()
            _check_infer_response(doc, "cascade", 3)
            assert doc["id"] == "req-7"
            assert {o["name"]: o["data"] for o in doc["outputs"]}["label"] == labels.tolist()
        one = c.post("/v2/models/cascade/infer", json=infer_json(X[:2], outputs=[{"name": "gflops"}])).json()
        assert [o["name"] for o in one["outputs"]] == ["gflops"]

        def post(content, headers=None, model="cascade"):
            return c.post(f"/v2/models/{model}/infer", content=content,
                          headers={"content-type": "application/json", **(headers or {})})

        def bad(**tensor):
            spec = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64, **tensor}
            return post(json.dumps({"inputs": [spec]}).encode())

        _check_error(c.get("/v2/models/nope"), 404)
        _check_error(c.get("/v2/models/cascade/versions/2"), 404)
        _check_error(c.get("/v2/models/nope/ready"), 404)
        _check_error(post(json.dumps(infer_json(X[:1])).encode(), model="nope"), 404)
        _check_error(c.get("/v2/no/such/route"), 404)
        _check_error(c.delete("/v2/models/cascade"), 405)
        _check_error(post(b"{not json"), 400)                                         # malformed JSON
        _check_error(post(b"[" * 100_000 + b"]" * 100_000), 400)                      # nested past the parser
        _check_error(post(b'{"inputs": 3}'), 400)
        _check_error(bad(datatype="INT64"), 400)                                      # wrong datatype
        _check_error(bad(datatype="FP99"), 400)
        _check_error(bad(shape=[1, 1, 8, 7]), 400)                                    # wrong shape
        _check_error(bad(shape=[1, 1, 8, 8], data=[0.0] * 63), 400)                   # shape and data disagree
        _check_error(bad(data=["a"] * 64), 400)
        _check_error(bad(name="pixels"), 400)                                         # unknown input
        _check_error(bad(data=[10**40] + [0] * 63), 400)                              # too large for FP32
        _check_error(bad(data=[int("9" * 400)] + [0] * 63), 400)                      # too large for anything
        _check_error(post(b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", '
                          b'"data": [NaN' + b", 0" * 63 + b"]}]}"), 400)               # NaN
        _check_error(bad(shape=[0, 1, 8, 8], data=[]), 400)                           # no rows
        _check_error(bad(shape=[65, 1, 8, 8], data=[0.0] * 65 * 64), 413)             # over max_inputs
        _check_error(bad(shape=[2**30, 1, 8, 8], data=[]), 413)                       # claimed, not sent
        _check_error(post(b'{"inputs": [' + b"0," * 150_000 + b"0]}"), 413)            # over max_body_bytes
        _check_error(post(json.dumps(infer_json(X[:1], outputs=[{"name": "logits"}])).encode()), 400)
        _check_error(post(json.dumps(infer_json(X[:1], parameters={"deadline_ms": -1})).encode()), 400)
        _check_error(post(json.dumps(infer_json(X[:1], parameters={"priority": 1.5})).encode()), 400)
        # The binary extension: sizes that do not add up, and headers that lie.
        head = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 256}}]}).encode()
        raw = np.zeros(64, "<f4").tobytes()
        ok = post(head + raw, {"inference-header-content-length": str(len(head))})
        assert ok.status_code == 200
        _check_error(post(head + raw[:-4], {"inference-header-content-length": str(len(head))}), 400)
        _check_error(post(head + raw + b"x", {"inference-header-content-length": str(len(head))}), 400)
        _check_error(post(head + raw, {"inference-header-content-length": "999999"}), 400)
        _check_error(post(head + raw, {"inference-header-content-length": "-3"}), 400)
        empty = json.dumps({"inputs": [{"name": "input", "shape": [0, 1, 8, 8], "datatype": "FP32",
                                        "parameters": {"binary_data_size": 0}}]}).encode()
        _check_error(post(empty, {"inference-header-content-length": str(len(empty))}), 400)   # empty tensor
        # The server still serves after all that.
        assert post(json.dumps(infer_json(X[:1])).encode()).status_code == 200


def test_image_and_uint8_inputs_are_checked_before_decoding():
    with TestClient(make_app()) as c:
        def images(*files: bytes, datatype="BYTES"):
            return c.post("/v2/models/cascade/infer", json={"inputs": [{
                "name": "image", "shape": [len(files)], "datatype": datatype,
                "data": [base64.b64encode(f).decode() for f in files]}]})

        r = images(png(0), png(255))
        assert r.status_code == 200
        labels = {o["name"]: o["data"] for o in r.json()["outputs"]}["label"]
        # The same pixels as UINT8 give the same answers.
        u8 = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 255.0)]).to(torch.uint8)
        r8 = c.post("/v2/models/cascade/infer", json=infer_json(u8, datatype="UINT8"))
        assert {o["name"]: o["data"] for o in r8.json()["outputs"]}["label"] == labels
        _check_error(c.post("/v2/models/cascade/infer", json=infer_json(u8.int() + 1000, datatype="UINT8")), 400)
        _check_error(images(png(0, size=(9, 8))), 400)                     # wrong size: refused, not resized
        _check_error(images(b"not an image"), 400)
        _check_error(images(png(0), datatype="FP32"), 400)
        _check_error(images(_png_bomb()), 400)                              # 20000x20000 in a few KB
        _check_error(images(png(0)[:40]), 400)                              # truncated
        big = c.post("/v2/models/cascade/infer", json={"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES",
                                                                   "data": [png_b64()[:-4] + "!!!!"]}]})
        _check_error(big, 400)                                              # not base64


def _png_bomb(side: int = 20000) -> bytes:
    """A valid PNG header claiming ``side`` x ``side`` grey pixels, with a small compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # the first rows only: never decoded anyway
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------- real clients
def test_triton_client_over_http_json_binary_and_grpc_matches_offline_outputs():
    tc_http = pytest.importorskip("tritonclient.http", reason="pip install 'tritonclient[http,grpc]'")
    tc_grpc = pytest.importorskip("tritonclient.grpc", reason="pip install 'tritonclient[http,grpc]'")
    labels, conf = _offline(X)
    x = X.numpy()
    app = make_app(grpc_port=0)
    with served(app) as url:
        h = tc_http.InferenceServerClient(url.removeprefix("http://"))
        g = tc_grpc.InferenceServerClient(f"127.0.0.1:{app.state.grpc_port}")
        for client in (h, g):
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cascade")
        assert h.get_model_metadata("cascade")["inputs"][0]["shape"] == [-1, 1, 8, 8]
        assert list(g.get_model_metadata("cascade").inputs[0].shape) == [-1, 1, 8, 8]
        assert g.get_server_metadata().name == "adaptive-inference"

        local = threading.local()  # the HTTP client (gevent-based) is not thread-safe: one per thread

        def http_infer(rows, binary):
            if not hasattr(local, "client"):
                local.client = tc_http.InferenceServerClient(url.removeprefix("http://"))
            i = tc_http.InferInput("input", list(rows.shape), "FP32")
            i.set_data_from_numpy(rows, binary_data=binary)
            outs = [tc_http.InferRequestedOutput(n, binary_data=binary) for n in ("label", "confidence")]
            r = local.client.infer("cascade", [i], outputs=outs)
            return r.as_numpy("label"), r.as_numpy("confidence")

        def grpc_infer(rows):
            i = tc_grpc.InferInput("input", list(rows.shape), "FP32")
            i.set_data_from_numpy(rows)
            r = g.infer("cascade", [i], client_timeout=30)
            return r.as_numpy("label"), r.as_numpy("confidence")

        calls = {"http-json": lambda rows: http_infer(rows, False), "http-binary": lambda rows: http_infer(rows, True),
                 "grpc": grpc_infer}
        for name, call in calls.items():
            whole = call(x)                                       # one request of 12
            with ThreadPoolExecutor(6) as pool:                   # 12 requests of 1, batched as they come
                singles = list(pool.map(lambda i: call(x[i:i + 1]), range(len(x))))
            for got_labels, got_conf in (whole, tuple(np.concatenate(p) for p in zip(*singles))):
                assert got_labels.tolist() == labels.tolist(), name
                np.testing.assert_allclose(got_conf, conf, rtol=1e-5, atol=1e-6, err_msg=name)
        # Errors come back as the client's own exception, with the server's message.
        with pytest.raises(tc_http.InferenceServerException, match="no model"):
            h.get_model_metadata("nope")
        with pytest.raises(tc_grpc.InferenceServerException, match="does not match"):
            grpc_infer(np.zeros((1, 1, 8, 9), np.float32))
        g.close()
        h.close()


def test_kserve_sdk_types_round_trip_our_payloads():
    if importlib.util.find_spec("kserve") is None:  # not imported here: see below
        pytest.skip("KServe's SDK is not installed: pip install kserve")
    # KServe's and Triton's generated protos share the protocol's names and cannot load in one
    # process; the KServe side runs in its own.
    labels, _ = _offline(X[:4])
    app = make_app(grpc_port=0)
    with served(app) as url:
        out = subprocess.run([sys.executable, "-m", "tests.helpers.kserve_roundtrip", url, str(app.state.grpc_port)],
                             input=json.dumps(X[:4].tolist()), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == {"rest_json": labels.tolist(), "rest_binary": labels.tolist(),
                                      "grpc": labels.tolist()}


# ---------------------------------------------------------------------------------- bounded input
def test_bodies_are_bounded_while_they_stream_and_slow_clients_are_cut_off():
    app = make_app(body_timeout_s=0.5)
    with served(app, header_timeout_s=0.5) as url:
        def chunks():
            for _ in range(100):
                yield b"0," * 5000  # 1 MB in all, chunked, no Content-Length
        r = httpx.post(f"{url}/v2/models/cascade/infer", content=chunks(), timeout=10)
        _check_error(r, 413)
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:  # a body that trickles: 408
            s.sendall(b"POST /v2/models/cascade/infer HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{")
            s.settimeout(5)
            assert b" 408 " in s.recv(4096).split(b"\r\n")[0]
        with socket.create_connection(("127.0.0.1", port)) as s:  # a head that trickles: closed
            s.sendall(b"POST /v2/models/cascade/infer HTTP/1.1\r\nHost: t\r\n")
            s.settimeout(5)
            t0 = time.monotonic()
            assert s.recv(4096) == b"" and time.monotonic() - t0 < 3
        assert httpx.post(f"{url}/v2/models/cascade/infer", json=infer_json(X[:1])).status_code == 200


# ------------------------------------------------------------------------------------------ faults
def test_a_failing_batch_fails_only_its_own_requests():
    fake = FakeCascade(delay_s=0.05)
    with TestClient(make_app(fake=fake)) as c:
        body = infer_json([[1.0, 0.5, 0.0]] * 2)
        for failure, words in (("raise", "injected fault"), ("nan", "NaN")):
            fake.fail_next = failure
            with ThreadPoolExecutor(3) as pool:  # three requests of 2 rows, batches of 2: one batch fails
                results = list(pool.map(lambda _: c.post("/v2/models/fake/infer", json=body), range(3)))
            codes = sorted(r.status_code for r in results)
            assert codes == [200, 200, 500], (failure, codes)
            failed = next(r for r in results if r.status_code == 500)
            _check_error(failed, 500)
            assert words in failed.json()["error"]
            assert c.post("/v2/models/fake/infer", json=body).status_code == 200  # later ones are served
        text = c.get("/metrics").text
        assert 'serve_answers_total{model="fake",status="error"} 4.0' in text


def test_a_slow_model_answers_with_timely_errors_not_late_answers():
    with TestClient(make_app(delay_s=0.5)) as c:
        t0 = time.monotonic()
        r = c.post("/v2/models/fake/infer", json=infer_json([[1.0, 0.0, 0.0]], parameters={"deadline_ms": 100}))
        elapsed = time.monotonic() - t0
        _check_error(r, 504)
        assert elapsed < 0.4, elapsed  # at the deadline, not after the 0.5 s batch
        # Triton's own deadline parameter (microseconds) works the same way.
        r = c.post("/v2/models/fake/infer", json=infer_json([[1.0, 0.0, 0.0]], parameters={"timeout": 100_000}))
        _check_error(r, 504)


def test_health_answers_within_50_ms_while_the_engine_is_saturated():
    with served(make_app(delay_s=0.2)) as url:
        stop = threading.Event()

        def flood():
            with httpx.Client(timeout=30) as client:
                while not stop.is_set():
                    client.post(f"{url}/v2/models/fake/infer", json=infer_json([[1.0, 0.0, 0.0]] * 2))

        threads = [threading.Thread(target=flood) for _ in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        times = []
        with httpx.Client(timeout=5) as probe:
            for path in ("/v2/health/live", "/v2/health/ready", "/healthz", "/readyz") * 5:
                t0 = time.perf_counter()
                assert probe.get(url + path).status_code == 200
                times.append((time.perf_counter() - t0) * 1e3)
        depth = httpx.get(f"{url}/metrics").text
        stop.set()
        for t in threads:
            t.join()
    assert 'serve_queue_depth{model="fake",stage="0"} 0.0' not in depth  # it was saturated
    assert sorted(times)[len(times) // 2] < 50 and max(times) < 200, times


def test_sigterm_under_load_answers_in_flight_requests_refuses_new_ones_and_exits():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "tests.helpers.serve_fake", str(port), "0.2"], cwd=ROOT)
    try:
        for _ in range(400):
            try:
                if httpx.get(f"{url}/v2/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None
            time.sleep(0.05)
        results: list = []

        def send():
            r = httpx.post(f"{url}/v2/models/fake/infer", json=infer_json([[1.0, 0.0, 0.0]] * 2), timeout=30)
            results.append(r.status_code)

        threads = [threading.Thread(target=send) for _ in range(6)]  # six batches of 0.2 s: 1.2 s of work
        for t in threads:
            t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        with pytest.raises(httpx.ConnectError):  # the listening socket is closed at once
            httpx.post(f"{url}/v2/models/fake/infer", json=infer_json([[1.0, 0.0, 0.0]]), timeout=5)
        for t in threads:
            t.join()
        proc.wait(timeout=15)
        assert time.monotonic() - t0 < 10  # within the drain timeout
        assert results == [200] * 6  # every accepted request answered, once
    finally:
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------------------- load tools
def test_open_loop_load_over_binary_tensors_and_grpc():
    from serve.loadgen import poisson_arrivals, run_load

    labels = _offline(X)[0].tolist()  # the model's own answers: accuracy 1 unless a row is mixed up
    app = make_app(grpc_port=0)
    with served(app) as url:
        for encoding in ("json", "binary", "grpc"):
            report = asyncio.run(run_load(url, "cascade", X.tolist(), labels, poisson_arrivals(40, 1.0, seed=2),
                                          slo_ms=1000, inputs_per_request=3, encoding=encoding,
                                          grpc_port=app.state.grpc_port))
            assert report.sent > 0 and report.answered_ok == report.sent and report.errors == 0, encoding
            assert report.accuracy == 1.0, encoding


def test_locust_drives_the_protocol_endpoint(tmp_path):
    locust = shutil.which("locust", path=str(Path(sys.executable).parent))
    if locust is None:
        pytest.skip("locust is not installed: pip install locust")
    with served(make_app()) as url:
        out = subprocess.run([locust, "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "--host", url,
                              "-u", "4", "-r", "4", "-t", "3s", "--csv", str(tmp_path / "load"), "--only-summary"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120,
                             env={**os.environ, "LOAD_MODEL": "cascade", "LOAD_RPS_PER_USER": "5",
                                  "LOAD_SLO_MS": "1000", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {r["Name"]: r for r in csv.DictReader(open(tmp_path / "load_stats.csv"))}
    infer = rows["infer cascade"]
    assert int(infer["Request Count"]) >= 20 and int(infer["Failure Count"]) == 0, infer
    # the benchmark reads the same files into its table
    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "bench" / "serve_load.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    stats = bench._locust_stats(tmp_path / "load", "cascade")
    assert stats["sent"] == int(infer["Request Count"]) and stats["slo_attainment"] == 1.0
    assert stats["failures"] == {} and 0 < stats["p50_ms"] <= stats["p99_ms"]
