"""Scale-out through Ray Serve: the replica class builds the same app from the serve config and takes
live settings through Ray's user_config; with Ray installed, a real two-replica deployment (slow)."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from omegaconf import open_dict

from tests.conftest import compose_config
from tests.helpers.serving import infer_json


def _serve_cfg(tmp_path, digits_runs, overrides=()):
    cfg = compose_config("serve_ray.yaml", ["experiment=digits_serve", "models.skipnet20=null", *overrides],
                         tmp_path)
    with open_dict(cfg):
        cfg.device = "cpu"
        for node in cfg.models.values():
            if node is not None:
                node.run = node.run.replace(str(tmp_path / "logs"), str(digits_runs))
    return cfg


def test_ray_config_composes_serve_and_ray_keys(tmp_path):
    cfg = compose_config("serve_ray.yaml", ["ray.num_replicas=3"], tmp_path)
    assert cfg.ray.num_replicas == 3 and cfg.task_name == "serve_ray"
    assert "cascade" in cfg.models and cfg.batching.slo_ms > 0  # every serve.yaml key is there


def test_ray_replica_builds_the_app_and_takes_user_config(digits_runs, tmp_path):
    from experiments.serve_ray import ServingReplica, replica_config

    replica = ServingReplica(replica_config(_serve_cfg(tmp_path, digits_runs)))
    app = replica.__serve_build_asgi_app__()
    body = infer_json(torch.zeros(1, 1, 8, 8))
    with TestClient(app) as client:
        assert client.post("/v2/models/cascade/infer", json=body).json()["parameters"]["triage_level"] == 0
        replica.reconfigure({"cascade": {"triage": {"mode": "on", "level": 1}}})
        out = client.post("/v2/models/cascade/infer", json=body).json()
        assert out["parameters"]["triage_level"] == 1
        assert client.get("/v2/settings").json()["cascade"]["triage_level"] == 1
        with pytest.raises(ValueError, match="models"):
            replica.reconfigure({"nope": {"triage": {"mode": "on"}}})
        replica.reconfigure(None)  # no user_config: nothing changes
        assert client.get("/v2/settings").json()["cascade"]["triage_level"] == 1


@pytest.mark.slow
def test_ray_serve_two_replicas_over_http(digits_runs, tmp_path):
    pytest.importorskip("ray.serve", reason='Ray Serve is an optional extra: pip install -e ".[ray]"')
    port = 8000 + (hash(str(tmp_path)) % 1000)
    overrides = [f"port={port}", "ray.num_replicas=2", "models.skipnet20=null", "experiment=digits_serve",
                 "device=cpu", f"paths.log_dir={digits_runs}", f"hydra.run.dir={tmp_path / 'run'}",
                 "ray.user_config={cascade: {triage: {mode: 'on', level: 1}}}"]
    proc = subprocess.Popen([sys.executable, "-m", "experiments.serve_ray", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        answers = [httpx.post(f"{url}/v2/models/cascade/infer", json=infer_json(torch.zeros(1, 1, 8, 8)), timeout=30)
                   for _ in range(10)]
        # user_config reached every replica
        assert all(a.status_code == 200 and a.json()["parameters"]["triage_level"] == 1 for a in answers)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       check=False, capture_output=True)  # a Ray left running would hold the port
