"""Serving: batching, re-batching across requests, deadlines, the bounded queue, triage, drain, the HTTP
contract (bad inputs included) and a short open-loop load run over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from cascades import CascadeAdapter, build_cascade
from gating.adapters import price_points
from gating.idk import MaxProbIDK
from models import create_model
from serve.engine import BatchingConfig, EngineClosed, QueueFull, ServingEngine, TriageConfig
from serve.loadgen import burst_arrivals, poisson_arrivals, run_load
from tests.helpers.serving import AUTH, FakeCascade, infer_json, make_app, served


def _run(coro):
    return asyncio.run(coro)


def test_batching_and_re_batching_across_requests():
    fake = FakeCascade()

    async def go():
        engine = ServingEngine(fake, BatchingConfig(max_batch_size=16, max_delay_ms=20))
        await engine.start()
        # 40 single-input requests; every other one is deferred to stage 1.
        xs = [torch.tensor([[1.0 if i % 2 else -1.0, 0.5, 0.0]]) for i in range(40)]
        answers = await asyncio.gather(*(engine.submit(x) for x in xs))
        await engine.stop()
        return answers

    answers = [a[0] for a in _run(go())]
    assert all(a.status == "ok" for a in answers)
    assert [a.exit_stage for a in answers] == [1 if i % 2 == 0 else 0 for i in range(40)]
    assert [a.flops for a in answers] == [30.0 if i % 2 == 0 else 10.0 for i in range(40)]
    stage0 = [n for k, n in fake.batches if k == 0]
    stage1 = [n for k, n in fake.batches if k == 1]
    assert sum(stage0) == 40 and max(stage0) == 16  # batched up to the limit
    assert sum(stage1) == 20 and len(stage1) < 20   # deferred rows of different requests ran together
    assert max(stage1) > 1


def test_cascade_servable_answers_as_the_cascade_does():
    torch.manual_seed(0)
    stages = {"lin": create_model("linear", num_classes=10, in_chans=1, image_size=8),
              "cnn": create_model("tiny_cnn", num_classes=10, in_chans=1, width=4)}
    cascade = build_cascade(stages, MaxProbIDK(), thresholds=[0.15]).eval()
    servable = CascadeAdapter(cascade, name="c", input_shape=(1, 8, 8), num_classes=10)
    x = torch.randn(30, 1, 8, 8)
    with torch.no_grad():
        want = cascade(x)

    async def go():
        engine = ServingEngine(servable, BatchingConfig(max_batch_size=8, max_delay_ms=5))
        await engine.start()
        out = await asyncio.gather(*(engine.submit(x[i:i + 1]) for i in range(30)))
        await engine.stop()
        return [a[0] for a in out]

    got = _run(go())
    assert [a.exit_stage for a in got] == want.exit_stage.tolist()
    assert [a.label for a in got] == want.logits.argmax(-1).tolist()
    costs = cascade.stage_costs(x)
    assert [a.flops for a in got] == costs.per_sample(want.exit_stage).tolist()
    # Triage levels: the calibrated thresholds, then first-stage only; both priced on labelled data.
    price_points(servable, x, want.logits.argmax(-1))
    levels = servable.triage_levels()
    assert levels[0].val_acc == 1.0 and levels[-1].settings["thresholds"] == [-math.inf]
    assert levels[-1].val_gflops_per_img == pytest.approx(costs.stage[0] / 1e9)


def test_int8_cascade_answers_carry_their_int8_operations_per_input():
    """Served in int8, a cascade's stages do int8 work that FLOPs do not count: each answer carries it
    (stage by stage, as far as the input went), and so does the metrics counter."""
    from models.quantize import quantize_int8

    torch.manual_seed(0)
    stages = {"lin": create_model("linear", num_classes=10, in_chans=1, image_size=8),
              "cnn": create_model("tiny_cnn", num_classes=10, in_chans=1, width=4)}
    cascade = build_cascade(stages, MaxProbIDK(), thresholds=[0.15]).eval()
    x = torch.randn(30, 1, 8, 8)
    q = quantize_int8(cascade, [x])
    servable = CascadeAdapter(q, name="q", input_shape=(1, 8, 8), num_classes=10)
    with torch.no_grad():
        want = servable.run(x)

    async def go():
        engine = ServingEngine(servable, BatchingConfig(max_batch_size=8, max_delay_ms=5))
        await engine.start()
        out = await asyncio.gather(*(engine.submit(x[i:i + 1]) for i in range(30)))
        await engine.stop()
        return [a[0] for a in out], engine

    got, engine = _run(go())
    assert 0 < int((want.exit_stage == 1).sum()) < 30
    assert [a.int8_ops for a in got] == want.int8_ops.tolist()
    assert [a.int8_ops for a in got] == q.stage_costs(x).per_sample_int8(want.exit_stage).tolist()
    assert min(a.int8_ops for a in got) > 0 and all(a.flops < a.int8_ops for a in got)
    counted = engine.metrics.registry.get_sample_value("serve_int8_ops_total", {"model": "q"})
    assert counted == pytest.approx(sum(a.int8_ops for a in got))


def test_deadline_fires_during_a_running_batch():
    fake = FakeCascade(delay_s=0.3)

    async def go():
        engine = ServingEngine(fake, BatchingConfig(max_batch_size=4, max_delay_ms=0))
        await engine.start()
        t0 = time.monotonic()
        slow = asyncio.create_task(engine.submit(torch.tensor([[1.0, 0.0, 0.0]]), deadline_ms=1000))
        await asyncio.sleep(0.02)  # the first batch is running now
        late = await engine.submit(torch.tensor([[1.0, 0.0, 0.0]]), deadline_ms=50)
        t_late = time.monotonic() - t0
        first = await slow
        await engine.stop()
        return late[0], t_late, first[0]

    late, t_late, first = _run(go())
    assert late.status == "deadline_exceeded" and t_late < 0.2  # answered at its deadline, not after the batch
    assert first.status == "ok"


def test_bounded_queue_rejects_instead_of_blocking():
    fake = FakeCascade(delay_s=0.2)

    async def go():
        engine = ServingEngine(fake, BatchingConfig(max_batch_size=2, max_delay_ms=0, max_queue=4, slo_ms=5000))
        await engine.start()
        first = asyncio.create_task(engine.submit(torch.ones(2, 3)))
        await asyncio.sleep(0.02)
        queued = asyncio.create_task(engine.submit(torch.ones(4, 3)))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        with pytest.raises(QueueFull) as e:
            await engine.submit(torch.ones(1, 3))
        waited = time.monotonic() - t0
        answers = await first + await queued
        await engine.stop()
        with pytest.raises(EngineClosed):
            await engine.submit(torch.ones(1, 3))
        return e.value, waited, answers

    err, waited, answers = _run(go())
    assert waited < 0.05 and err.retry_after_s > 0
    assert len(answers) == 6 and all(a.status == "ok" for a in answers)


def test_triage_on_auto_and_back():
    fake = FakeCascade(delay_s=0.01)

    async def go():
        engine = ServingEngine(fake, BatchingConfig(max_batch_size=4, max_delay_ms=1, slo_ms=40),
                               TriageConfig(mode="off", hold_s=0.1, max_hold_s=0.2, enter_fraction=0.8,
                                           exit_fraction=0.5))
        await engine.start()
        x = torch.tensor([[-1.0, 0.0, 0.0]])  # deferred at level 0, answered at stage 0 at level 1
        normal = (await engine.submit(x))[0]
        engine.update(triage={"mode": "on", "level": 1})
        triaged = (await engine.submit(x))[0]
        engine.update(triage={"mode": "auto"})
        flood = await asyncio.gather(*(engine.submit(x, deadline_ms=5000) for _ in range(200)))
        peak = max(level for _, level, _ in engine.level_changes)
        await asyncio.sleep(0.3)
        for _ in range(5):  # calm traffic lets auto step back down after hold_s
            await engine.submit(x)
            await asyncio.sleep(0.05)
        final = engine.triage_level
        with pytest.raises(ValueError, match="off, on or auto"):
            engine.update(triage={"mode": "sometimes"})
        with pytest.raises(ValueError, match="unknown setting"):
            engine.update(batching={"max_batchsize": 3})
        await engine.stop()
        return normal, triaged, flood, peak, final

    normal, triaged, flood, peak, final = _run(go())
    assert normal.exit_stage == 1 and not normal.degraded
    assert triaged.exit_stage == 0 and triaged.degraded
    assert peak == 1 and any(a[0].degraded for a in flood)
    assert final == 0


def test_stop_drains_in_flight_work():
    fake = FakeCascade(delay_s=0.01)

    async def go():
        engine = ServingEngine(fake, BatchingConfig(max_batch_size=8, max_delay_ms=1, slo_ms=10000))
        await engine.start()
        tasks = [asyncio.create_task(engine.submit(torch.randn(1, 3))) for _ in range(50)]
        await asyncio.sleep(0)
        await engine.stop(drain=True)
        return [(await t)[0] for t in tasks]

    answers = _run(go())
    assert len(answers) == 50 and all(a.status == "ok" for a in answers)


# ------------------------------------------------------------------------------------------ HTTP API
def test_http_settings_metrics_and_probes():
    with TestClient(make_app()) as client:
        body = infer_json(torch.zeros(1, 1, 8, 8))
        ok = client.post("/v2/models/cascade/infer", json=body)
        assert ok.status_code == 200 and float(ok.headers["server-timing"].split("dur=")[1]) > 0
        levels = client.get("/v2/models/cascade/levels").json()
        assert levels["stages"] == 2 and levels["triage_levels"][-1]["settings"]["thresholds"] == ["-inf"]
        assert client.get("/healthz").json() == {"live": True} and client.get("/readyz").status_code == 200
        # Settings change only with the admin token, and only to typed values within bounds.
        change = {"triage": {"mode": "on"}, "batching": {"max_batch_size": 4}}
        assert client.put("/v2/settings/cascade", json=change).status_code == 401
        assert client.put("/v2/settings/cascade", json=change,
                          headers={"Authorization": "Bearer wrong"}).status_code == 403
        s = client.put("/v2/settings/cascade", json=change, headers=AUTH)
        assert s.status_code == 200 and s.json()["triage_level"] == 1
        out = client.post("/v2/models/cascade/infer", json=body).json()
        assert out["parameters"]["triage_level"] == 1
        assert {o["name"]: o["data"] for o in out["outputs"]}["exit_stage"] == [0]
        for bad in ({"triage": {"mode": "maybe"}}, {"batching": {"max_batch_size": True}},
                    {"batching": {"max_batch_size": 10**12}}, {"batching": {"slo_ms": "100"}},
                    {"batching": {"max_delay_ms": -1}}, {"batching": {"unknown": 1}}, {"nope": {}}):
            r = client.put("/v2/settings/cascade", json=bad, headers=AUTH)
            assert r.status_code == 422 and r.json()["error"], bad
        for raw in (b'{"batching": {"slo_ms": NaN}}', b'{"batching": {"slo_ms": Infinity}}'):
            r = client.put("/v2/settings/cascade", content=raw, headers={**AUTH, "content-type": "application/json"})
            assert r.status_code in (400, 422), raw
        assert client.get("/v2/settings").json()["cascade"]["batching"]["max_batch_size"] == 4
        assert client.post("/v2/models/cascade/infer", json=body).status_code == 200  # still serving
        text = client.get("/metrics").text
        for name in ("serve_queue_depth", "serve_queue_wait_seconds", "serve_batch_size", "serve_exits_total",
                     "serve_request_latency_seconds", "serve_slo_total", "serve_triage_level",
                     "serve_degraded_total", "serve_rejected_total", "serve_cancelled_total"):
            assert name in text, name
        assert 'serve_triage_level{model="cascade"} 1.0' in text
    with TestClient(make_app(admin_token=None)) as client:  # no token configured: settings are fixed
        assert client.put("/v2/settings/cascade", json={"triage": {"mode": "on"}}, headers=AUTH).status_code == 403


def test_http_full_queue_is_429_with_retry_after():
    with TestClient(make_app(max_queue=2, delay_s=0.3)) as client:
        results = []

        def send():
            results.append(client.post("/v2/models/fake/infer", json=infer_json([[1.0, 0.0, 0.0]] * 2)))

        threads = [threading.Thread(target=send) for _ in range(3)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in results)
        assert codes[0] == 200 and codes[-1] == 429
        r429 = next(r for r in results if r.status_code == 429)
        assert int(r429.headers["Retry-After"]) >= 1 and "queue full" in r429.json()["error"]



def test_open_loop_load_over_real_http():
    x = torch.randn(20, 1, 8, 8)
    arrivals = poisson_arrivals(rate=60, duration_s=1.5, seed=1)
    with served(make_app()) as url:
        report = asyncio.run(run_load(url, "cascade", x.tolist(), list(range(10)) * 2, arrivals, slo_ms=1000))
    assert report.sent == len(arrivals) and report.answered_ok == report.sent
    assert report.rejected == 0 and report.errors == 0 and report.slo_attainment > 0.9
    assert 0 <= report.accuracy <= 1 and report.p50_ms <= report.p99_ms
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_load("http://example.com", "cascade", x.tolist(), None, [0.0], slo_ms=10))


def test_arrival_processes():
    a = poisson_arrivals(100, 10, seed=0)
    assert 900 < len(a) < 1100 and a == sorted(a) and a[-1] < 10
    b = burst_arrivals(50, 10, burst_start_s=4, burst_s=2, burst_factor=4, seed=0)
    in_burst = sum(4 <= t < 6 for t in b)
    assert 300 < in_burst < 500 and 300 < len(b) - in_burst < 500


# ------------------------------------------------------------------------------------------ front end
def test_loop_lag_monitor_sees_a_blocked_loop():
    from serve.frontend import LoopLagMonitor

    async def go():
        monitor = LoopLagMonitor(interval_s=0.002, window_s=0.2)
        assert monitor.lag_s() == 0.0  # not started
        await monitor.start()
        await asyncio.sleep(0.05)
        calm = monitor.lag_s()
        asyncio.get_running_loop().call_soon(time.sleep, 0.08)  # a callback that hogs the loop
        await asyncio.sleep(0.02)
        busy = monitor.lag_s()
        await asyncio.sleep(0.35)  # past the window
        after = monitor.lag_s()
        await monitor.stop()
        return calm, busy, after

    calm, busy, after = _run(go())
    assert calm < 0.03 and busy >= 0.06 and after < 0.03


def test_auto_triage_rises_on_front_end_lag_with_an_empty_queue():
    async def go():
        engine = ServingEngine(FakeCascade(), BatchingConfig(max_batch_size=4, max_delay_ms=0, slo_ms=100),
                               TriageConfig(mode="auto", hold_s=0.05))
        await engine.start()
        await engine.submit(torch.ones(16, 3))  # enough rows to measure the level's pace
        calm_level = engine.triage_level
        engine.front_lag_s = lambda: 0.09  # 90 ms late: near the objective, but the arrivals are few
        await engine.submit(torch.ones(1, 3))
        near = engine.triage_level
        engine.front_lag_s = lambda: 0.11  # 110 ms late: past the objective
        await engine.submit(torch.ones(1, 3))
        raised = engine.triage_level
        engine.front_lag_s = lambda: 0.0
        for _ in range(4):
            await asyncio.sleep(0.03)
            await engine.submit(torch.ones(1, 3))
        await engine.stop()
        return calm_level, near, raised, engine.triage_level

    calm_level, near, raised, final = _run(go())
    assert (calm_level, near, raised, final) == (0, 0, 1, 0)


def test_http_sheds_infer_while_the_loop_lags():
    app = make_app(shed_lag_ms=20.0)
    with TestClient(app) as client:
        body = infer_json(torch.zeros(1, 1, 8, 8))
        assert client.post("/v2/models/cascade/infer", json=body).status_code == 200
        app.state.loop_lag.lag_s = lambda: 0.5  # as if the loop ran 500 ms behind
        shed = client.post("/v2/models/cascade/infer", json=body)
        assert shed.status_code == 503 and shed.headers["Retry-After"] == "1" and "behind" in shed.json()["error"]
        assert client.get("/v2/health/live").status_code == 200  # only infer is shed
        app.state.loop_lag.lag_s = lambda: 0.0
        assert client.post("/v2/models/cascade/infer", json=body).status_code == 200
        text = client.get("/metrics").text
        assert "serve_shed_total 1.0" in text and "serve_event_loop_lag_seconds" in text


def test_clients_that_disconnect_have_their_queued_inputs_withdrawn():
    body = json.dumps(infer_json([[1.0, 0.0, 0.0]] * 2)).encode()
    head = (b"POST /v2/models/fake/infer HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n")
    fake = FakeCascade(delay_s=0.2)
    with served(make_app(fake=fake)) as url:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(3):  # gone while their inputs wait (or, the first, run)
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(head % len(body) + body)
                time.sleep(0.02)
        with socket.create_connection(("127.0.0.1", port)) as s:  # gone halfway through its body
            s.sendall(head % len(body) + body[:10])
        time.sleep(0.6)
        after = httpx.post(f"{url}/v2/models/fake/infer", json=infer_json([[1.0, 0.0, 0.0]]), timeout=10)
        metrics = httpx.get(f"{url}/metrics").text
    assert after.status_code == 200
    # Only the first gone client's batch was already running; the other two were withdrawn unrun
    # (queued, or not yet queued when their client left).
    assert sum(n for k, n in fake.batches if k == 0) == 2 + 1
    assert 'serve_cancelled_total{model="fake"} 0.0' not in metrics
    assert 'serve_answers_total{model="fake",status="ok"} 1.0' in metrics
    assert 'serve_queue_depth{model="fake",stage="0"} 0.0' in metrics


# ------------------------------------------------------------------------------------------ pure parts
def test_triage_controller_without_an_event_loop():
    from serve.triage import TriageController

    config = TriageConfig(mode="auto", hold_s=1.0, step_s=0.5, rate_window_s=1.0, burst_window_s=1.0,
                          utilization=1.0)
    c = TriageController(config, num_levels=3, slo_ms=100, now=0.0, level_costs=[4.0, 2.0, 1.0])
    assert c.level == 0 and c.predicted_ms(0, 10, 5) is None     # nothing measured: the wait alone counts
    for _ in range(4):
        c.record_batch(level=0, stage=0, rows=8, seconds=0.008)  # 1 ms per row, 8 ms a batch
    assert c.predicted_ms(0, wait_ms=30, backlog=10) == pytest.approx(30 + 8)
    assert c.predicted_ms(0, wait_ms=5, backlog=60) == pytest.approx(60 + 8)
    assert c.predicted_ms(1, wait_ms=5, backlog=60) == pytest.approx((60 + 8) / 2)   # by priced cost
    c.arrive(now=0.5, rows=500)                                  # 500 inputs/s: half of level 0's pace
    assert c.utilization(0, now=1.0) == pytest.approx(0.5) and c.utilization(1, now=1.0) == pytest.approx(0.25)
    assert c.observe(now=1.0, wait_ms=30, backlog=10) == 0      # a 30 ms wait threatens nothing
    assert c.observe(now=1.0, wait_ms=5, backlog=85) == 0       # 93 ms > 0.8 x 100 ms, but level 0 keeps up
    assert c.observe(now=1.1, wait_ms=5, backlog=95) == 1       # 103 ms > 100 ms: a miss, up one level
    assert "predicted 103 ms > 100 ms" in c.history(now=1.1)[-1]["reason"]
    c.arrive(now=1.2, rows=2000)                                 # 2000 inputs/s: 2x level 0's pace
    assert c.observe(now=1.2, wait_ms=5, backlog=200) == 1      # at most one raise per step_s
    assert c.observe(now=1.7, wait_ms=5, backlog=160) == 2      # 84 ms > 0.8 x 100 ms, 1.0 of level 1's pace
    assert "level 1 does not keep up (1.00 of its pace)" in c.history(now=1.7)[-1]["reason"]
    assert c.observe(now=2.0, wait_ms=500, backlog=900) == 2    # the top level holds
    assert c.observe(now=2.3, wait_ms=5, backlog=20) == 2       # the burst has left the window, but hold_s
    c.arrive(now=2.65, rows=400)                                 # has not passed since the raise
    assert c.observe(now=2.8, wait_ms=5, backlog=20) == 1       # down one: level 1 keeps up, predicted 14 ms
    assert "level 1 keeps up (0.20 of its pace)" in c.history(now=2.8)[-1]["reason"]
    c.arrive(now=3.0, rows=1000)                                 # 1000 inputs/s: level 0 would use 1.0
    assert c.observe(now=3.9, wait_ms=5, backlog=20) == 1       # predicted 28 ms, but level 0 would not keep up
    assert c.observe(now=4.5, wait_ms=0, backlog=2) == 0        # the window has emptied: down
    assert [lv for _, lv, _ in c.changes] == [0, 1, 2, 1, 0]
    assert c.history(now=5.0)[-1]["s_ago"] == 0.5
    assert c.observe(now=6.0, wait_ms=5, backlog=95) == 1       # a backlog with level 0 keeping up: a transient,
    assert c.observe(now=6.05, wait_ms=5, backlog=10) == 0      # so down as soon as it is worked off, no hold
    assert [lv for _, lv, _ in c.changes] == [0, 1, 2, 1, 0, 1, 0]
    # A raise within hold_s of that lowering: it came too early (a burst the rate window does not see
    # yet), so the next lowering waits hold_s, then twice that, up to max_hold_s.
    c.config.step_s = 0.0
    assert c.observe(now=6.3, wait_ms=5, backlog=95) == 1        # 0.25 s after the lowering
    assert c.observe(now=6.7, wait_ms=5, backlog=10) == 1        # hold_s (1 s) has not passed
    assert c.observe(now=7.3, wait_ms=5, backlog=10) == 0
    assert c.observe(now=7.4, wait_ms=5, backlog=95) == 1        # undone again: the hold doubles to 2 s
    assert c.observe(now=9.3, wait_ms=5, backlog=10) == 1 and c.observe(now=9.4, wait_ms=5, backlog=10) == 0
    assert c.observe(now=30.0, wait_ms=5, backlog=95) == 1       # after a calm spell: a transient again
    assert c.observe(now=30.05, wait_ms=5, backlog=10) == 0
    c.configure(TriageConfig(mode="on", level=7), slo_ms=100, now=31.0)  # clamped to the top level
    assert c.level == 2 and c.observe(now=32.0, wait_ms=500) == 2
    c.configure(TriageConfig(mode="off"), slo_ms=100, now=33.0)
    assert c.level == 0 and c.history(now=33.0)[-1]["reason"] == "set by hand (off)"


def test_auto_triage_lowers_to_a_level_measured_in_a_stall():
    """A cheaper level measured only in a stall is taken at its costlier neighbour's pace at most: a
    stale, slow pace kept auto triage at level 2 for 9 s of a gRPC run at 80% of peak."""
    from serve.triage import TriageController

    config = TriageConfig(mode="auto", hold_s=0.5, step_s=0.0, rate_window_s=1.0, burst_window_s=1.0,
                          utilization=0.9)
    c = TriageController(config, num_levels=3, slo_ms=100, level_costs=[2.0, 1.5, 1.0], batch_limit=16)
    for _ in range(8):
        c.record_batch(level=0, stage=0, rows=16, seconds=0.016)    # 1 ms a row
    c.arrive(now=0.0, rows=800)                                      # 800 inputs/s: 0.8 of level 0's pace
    assert c.observe(now=0.5, wait_ms=40, backlog=96) == 1          # 96 + 16 ms > 100 ms: a stall
    c.record_batch(level=1, stage=0, rows=16, seconds=0.080)        # one batch, slowed 5x by the stall
    assert not c.pace[1].measured                                   # one batch does not make a pace
    assert c.utilization(1, now=0.5) == pytest.approx(0.8 * 1.5 / 2)  # level 0's, scaled by priced cost
    for _ in range(3):
        c.record_batch(level=1, stage=0, rows=16, seconds=0.080)    # a stall long enough to measure in
    assert c.pace[1].measured and c.utilization(1, now=0.5) == pytest.approx(0.8)  # capped by level 0
    assert c.observe(now=0.55, wait_ms=60, backlog=96) == 2         # still behind
    for _ in range(8):
        c.record_batch(level=2, stage=0, rows=16, seconds=0.008)
    c.arrive(now=1.0, rows=800)
    assert c.observe(now=1.5, wait_ms=5, backlog=10) == 1           # level 1 keeps up (0.80 of its pace)
    assert "level 1 keeps up (0.80 of its pace)" in c.history(now=1.5)[-1]["reason"]


def _paced_controller(**knobs) -> "TriageController":
    """Three levels priced 2 : 1.5 : 1, level 0 measured at 1 ms a row."""
    from serve.triage import TriageController

    c = TriageController(TriageConfig(mode="auto", **knobs), num_levels=3, slo_ms=100,
                         level_costs=[2.0, 1.5, 1.0], batch_limit=8)
    for _ in range(4):
        c.record_batch(level=0, stage=0, rows=8, seconds=0.008)
    return c


def _arrive_steadily(c, start: float, stop: float, per_s: float) -> None:
    for i in range(round((stop - start) / 0.01)):
        c.arrive(now=start + i * 0.01, rows=per_s * 0.01)


def test_auto_triage_lowers_one_step_at_a_time():
    """A stall raised 0 -> 2 in two batches; lowering it back waits ``lower_step_s`` between steps (one
    run lowered 4 -> 0 in 13 ms, and raised again 70 ms later)."""
    c = _paced_controller(hold_s=0.5, step_s=0.0, lower_step_s=0.25)
    assert c.observe(now=1.0, wait_ms=5, backlog=95) == 1 and c.observe(now=1.01, wait_ms=5, backlog=190) == 2
    assert c.observe(now=1.02, wait_ms=5, backlog=2) == 1      # a transient: the first step down at once
    assert c.observe(now=1.10, wait_ms=5, backlog=2) == 1      # the next waits lower_step_s
    assert c.observe(now=1.28, wait_ms=5, backlog=2) == 0
    no_step = _paced_controller(hold_s=0.5, step_s=0.0, lower_step_s=0.0)
    no_step.observe(now=1.0, wait_ms=5, backlog=95), no_step.observe(now=1.01, wait_ms=5, backlog=190)
    assert no_step.observe(now=1.02, wait_ms=5, backlog=2) == 1 and no_step.observe(now=1.03, wait_ms=5, backlog=2) == 0


@pytest.mark.parametrize("burst_window_s, level", [(0.5, 1), (2.0, 0)])
def test_auto_triage_sees_a_burst_onset_before_lowering(burst_window_s, level):
    """0.2 s into a 4x burst the 2 s window still says level 0 keeps up (0.65 of its pace); the 0.5 s
    window says it does not (1.1), so the transient raise at the onset is not undone."""
    c = _paced_controller(hold_s=0.5, step_s=0.0, lower_step_s=0.0, rate_window_s=2.0,
                          burst_window_s=burst_window_s)
    _arrive_steadily(c, 0.0, 2.0, per_s=500)       # half of level 0's pace,
    _arrive_steadily(c, 2.0, 2.05, per_s=2000)     # then four times it
    assert c.observe(now=2.05, wait_ms=5, backlog=95) == 1      # 103 ms > 100 ms, level 0 kept up: transient
    _arrive_steadily(c, 2.05, 2.2, per_s=2000)
    assert c.utilization(0, now=2.2) == pytest.approx(0.65, abs=0.02)
    assert c.utilization(0, now=2.2, window_s=0.5) == pytest.approx(1.1, abs=0.05)
    assert c.observe(now=2.2, wait_ms=5, backlog=10) == level   # predicted 18 ms at level 0


def test_auto_triage_distrusts_the_pace_after_an_undone_lowering():
    """A raise within ``hold_s`` of a lowering shows the fitted pace too optimistic: until the hold ends
    the early trigger (``enter_fraction``) fires as if the level did not keep up (one run's level 0
    "kept up at 0.40-0.88 of its pace" all through a 2x burst, so every raise came at 100 ms, too late)."""
    c = _paced_controller(hold_s=0.5, step_s=0.0, lower_step_s=0.0, rate_window_s=1.0, burst_window_s=1.0)
    _arrive_steadily(c, 0.0, 1.3, per_s=500)
    assert c.observe(now=1.0, wait_ms=5, backlog=95) == 1       # 103 ms: transient
    assert c.observe(now=1.05, wait_ms=5, backlog=10) == 0      # worked off: down at once
    assert c.observe(now=1.2, wait_ms=5, backlog=95) == 1       # undone 0.15 s later
    assert c.utilization(1, now=1.3) < 1.0                      # by the fitted pace, level 1 keeps up
    assert c.observe(now=1.3, wait_ms=5, backlog=110) == 2      # 0.75 x 118 = 89 ms > 80 ms: raised early
    assert "distrusted after an undone lowering" in c.history(now=1.3)[-1]["reason"]
    fresh = _paced_controller(hold_s=0.5, step_s=0.0, lower_step_s=0.0, rate_window_s=1.0, burst_window_s=1.0)
    _arrive_steadily(fresh, 0.0, 1.3, per_s=500)
    assert fresh.observe(now=1.0, wait_ms=5, backlog=95) == 1   # no lowering undone: the same 89 ms is
    assert fresh.observe(now=1.3, wait_ms=5, backlog=110) == 1  # only a transient near the objective


def test_triage_pace_fits_fixed_and_per_row_costs_per_stage():
    from serve.triage import LevelPace, TriageController

    pace = LevelPace()
    for _ in range(30):  # stage 0: 4 ms a batch plus 0.5 ms a row; half the rows go on to stage 1
        pace.record(stage=0, rows=4, seconds=0.006)
        pace.record(stage=0, rows=32, seconds=0.020)
        pace.record(stage=1, rows=18, seconds=0.002 + 18 * 0.001)  # 2 ms a batch plus 1 ms a row
    share0, fixed0, row0 = list(pace._per_stage())[0]
    assert (share0, fixed0, row0) == (pytest.approx(1.0), pytest.approx(4.0), pytest.approx(0.5))
    share1, fixed1, row1 = list(pace._per_stage())[1]
    assert share1 == pytest.approx(0.5, rel=0.05) and row1 == pytest.approx(20 / 18)  # one batch size: all per row
    # 128 queued inputs in batches of 32: stage 0 takes 4 x 4 + 128 x 0.5 ms, stage 1 its 64 rows x 1.11 ms
    assert pace.backlog_ms(128, batch_limit=32) == pytest.approx(16 + 64 + 64 * 20 / 18, rel=0.05)
    assert pace.capacity_ms(32) == pytest.approx(0.5 + 4 / 32 + 0.5 * 20 / 18, rel=0.05)
    c = TriageController(TriageConfig(mode="auto", rate_window_s=1.0), num_levels=2, slo_ms=100, batch_limit=32)
    c.pace[0] = pace
    c.arrive(now=0.0, rows=500)  # 500 inputs/s at 1.18 ms each in full batches: 0.59 of the device
    assert c.utilization(0, now=0.5) == pytest.approx(500 * pace.capacity_ms(32) / 1e3)
    assert c.observe(now=0.5, wait_ms=10, backlog=50, batch_limit=16) == 0 and c.batch_limit == 16


def test_adaptive_batch_limit_without_an_event_loop():
    from serve.batching import AdaptiveBatchLimit

    fixed = AdaptiveBatchLimit(BatchingConfig(max_batch_size=8))
    assert fixed.after_batch(8, 1.0) == 8  # not adaptive: always the maximum
    lim = AdaptiveBatchLimit(BatchingConfig(max_batch_size=10, adaptive=True, target_batch_ms=20))
    assert lim.after_batch(10, 0.030) == 9     # too slow: 10% fewer
    assert lim.after_batch(9, 0.010) == 10     # a full batch under target: one more
    assert lim.after_batch(10, 0.010) == 10    # capped by max_batch_size
    assert lim.after_batch(3, 0.010) == 10     # a batch that was not full says nothing
    for _ in range(40):
        lim.after_batch(lim.limit, 1.0)
    assert lim.limit == 1                      # never below one row
    lim.configure(BatchingConfig(max_batch_size=4, adaptive=False))
    assert lim.limit == 4
    for bad in ({"slo_ms": float("nan")}, {"slo_ms": float("inf")}, {"max_batch_size": True},
                {"max_batch_size": 2.0}, {"max_queue": 0}, {"adaptive": 1}, {"max_delay_ms": "1"}):
        with pytest.raises(ValueError, match="setting"):
            BatchingConfig(**bad).validate()
    for bad in ({"level": -1}, {"hold_s": float("nan")}, {"exit_fraction": 0.9}):
        with pytest.raises(ValueError):
            TriageConfig(**bad).validate()


def test_each_model_has_its_own_batching_settings(tmp_path):
    from experiments.serve import engine_settings
    from tests.conftest import compose_config

    cfg = compose_config("serve.yaml", ["+models.resnet38.batching.max_batch_size=128",
                                        "+models.resnet38.triage.mode=auto", "batching.max_batch_size=16"], tmp_path)
    b, t = engine_settings(cfg, "resnet38")
    assert (b.max_batch_size, t.mode, b.slo_ms) == (128, "auto", cfg.batching.slo_ms)
    b, t = engine_settings(cfg, "cascade")
    assert (b.max_batch_size, t.mode) == (16, "off")
