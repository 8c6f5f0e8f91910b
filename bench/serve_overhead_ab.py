"""What the serving layer adds to the model's own time, on two (or more) running servers, interleaved.

    python bench/serve_overhead_ab.py 'servers={a: http://127.0.0.1:8001, b: http://127.0.0.1:8002}' model_name=cascade

Requests go one at a time, alternating between the servers, so that the machine's drift hits each
alike (the VM's speed moves several-fold between sessions, so only a ratio in one run means much).
Each answer carries ``compute_ms`` (the model's own time on its batch inside the server) and a
``Server-Timing`` header: the overhead per request is measured against its own model time, in the
engine (arrival in the engine to answer) and in the server (request head parsed to answer head).
Prints one row per server and round (p50s) and writes JSON.
"""

from __future__ import annotations

import json
import statistics
from typing import Any

import httpx
import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

import experiments  # noqa: F401
from experiments.data import batches_to_tensor
from experiments.report import machine_info, markdown_table, write_json
from experiments.utils import run_hydra, user_facing
from gating.errors import UserError
from serve.loadgen import LOOPBACK, encode_infer


def one(client: httpx.Client, model: str, x: torch.Tensor) -> dict[str, float]:
    """One single-input request: the model's, the engine's and the server's time, in ms."""
    body, headers = encode_infer(x[None].numpy(), "binary", ["label"])
    r = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
    r.raise_for_status()
    a = json.loads(r.content[:int(r.headers["inference-header-content-length"])])["parameters"]
    server = float(r.headers["server-timing"].split("dur=")[1])
    return {"model": a["compute_ms"], "engine": a["engine_ms"], "server": server}


def interleaved_round(clients: dict[str, httpx.Client], model: str, x: torch.Tensor, n: int,
                      warmup: int) -> dict[str, list[dict[str, float]]]:
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
    for i in range(warmup + n):
        for name, client in clients.items():
            s = one(client, model, x[i % len(x)])
            if i >= warmup:
                samples[name].append(s)
    return samples


def summary(name: str, rnd: int, samples: list[dict[str, float]]) -> dict[str, Any]:
    def p50(f) -> float:
        return statistics.median(f(s) for s in samples)

    return {"server": name, "round": rnd, "requests": len(samples), "model_p50_ms": p50(lambda s: s["model"]),
            "engine_added_p50_ms": p50(lambda s: s["engine"] - s["model"]),
            "server_added_p50_ms": p50(lambda s: s["server"] - s["model"])}


@user_facing
def bench(cfg: DictConfig) -> dict[str, Any]:
    if not cfg.servers or len(cfg.servers) < 2:
        raise UserError("give two or more servers: 'servers={a: http://127.0.0.1:8001, b: http://127.0.0.1:8002}'")
    if any(httpx.URL(u).host not in LOOPBACK for u in cfg.servers.values()):
        raise UserError("the servers must be on loopback")
    x, _ = batches_to_tensor(instantiate(cfg.data).test_dataloader())
    clients = {name: httpx.Client(base_url=url, timeout=30) for name, url in cfg.servers.items()}
    rows = []
    try:
        for rnd in range(cfg.rounds):
            samples = interleaved_round(clients, cfg.model_name, x, cfg.requests, cfg.warmup)
            rows += [summary(name, rnd, s) for name, s in samples.items()]
    finally:
        for c in clients.values():
            c.close()
    print(markdown_table(rows))
    result = {"model": cfg.model_name, "servers": dict(cfg.servers), "rows": rows, "machine": machine_info("cpu")}
    write_json(cfg.output, result)
    print(f"\nwrote {cfg.output}")
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="bench/serve_overhead_ab.yaml")
def main(cfg: DictConfig) -> None:
    bench(cfg)


if __name__ == "__main__":
    run_hydra(main)
