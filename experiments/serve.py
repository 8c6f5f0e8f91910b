"""Serve trained models over the Open Inference Protocol (REST and gRPC) with dynamic batching, cascade
re-batching and triage.

    python -m experiments.serve                                   # the MNIST models: HTTP 127.0.0.1:8000, gRPC :8001
    python -m experiments.serve experiment=digits_serve           # the digits pipeline's models (no GPU needed)
    python -m experiments.serve batching.adaptive=true triage.mode=auto port=8080 grpc_port=null
    SERVE_ADMIN_TOKEN=... python -m experiments.serve             # allow settings changes over HTTP
    SERVE_ADMIN_TOKEN=... python -m serve.cli triage auto --model cascade   # switch triage while serving

Which models are served is a preset of the ``served`` group (``configs/served/{mnist,digits}.yaml``):
name -> a run reference (:func:`experiments.runs.load_run`: a cascade, SkipNet or plain training run)
with its options, and optionally the model's own ``batching`` and ``triage`` knobs over the global
ones. Before serving, every operating point of every model is run on the validation split and its
accuracy and GFLOPs per image are published as the model's triage levels at
``GET /v2/models/{name}/levels``. The
same engine runs on a GPU when ``device=auto`` finds one.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import experiments  # noqa: F401  (sets PROJECT_ROOT)
from experiments.data import batches_to_tensor
from experiments.report import pick_device
from experiments.runs import load_run
from experiments.utils import extras, run_hydra, user_facing
from gating.adapters import ModelAdapter, price_points
from gating.errors import UserError
from serve.engine import BatchingConfig, DeviceWorker, EngineMetrics, ServingEngine, TriageConfig

log = logging.getLogger(__name__)

ENGINE_KEYS = ("batching", "triage")  # per-model knobs in a served entry; the rest goes to load_run


def model_entries(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    """The served models as plain dicts (null entries dropped)."""
    return {name: OmegaConf.to_container(node, resolve=True) for name, node in cfg.models.items() if node}


def load_models(cfg: DictConfig, device: torch.device) -> list[ModelAdapter]:
    """Each served model on ``device``, warmed up, its operating points priced on val when asked."""
    models = [load_run(name=name, **{k: v for k, v in entry.items() if k not in ENGINE_KEYS})
              for name, entry in model_entries(cfg).items()]
    val = batches_to_tensor(instantiate(cfg.data).val_dataloader()) if cfg.measure_levels else None
    for m in models:
        if m.input_shape is None:
            raise UserError(f"model {m.name!r}: its run's data config gives no in_chans/image_size, so the server "
                            f"cannot check inputs; serve a run whose data config has them")
        m.to(device)
        m.run(torch.zeros(1, *m.input_shape, device=device))  # cost tables and lazy layers, before any request
        if val is not None:
            price_points(m, *val)
            for i, p in enumerate(m.triage_levels()):
                log.info("%s triage level %d (%s): val acc %.4f, %.5f GFLOPs/img, %s int8 GOPs/img", m.name, i,
                         p.label, p.val_acc, p.val_gflops_per_img, p.val_int8_gops_per_img or 0)
    return models


def engine_settings(cfg: DictConfig, name: str) -> tuple[BatchingConfig, TriageConfig]:
    """The global batching and triage knobs, with the model's own over them."""
    entry = model_entries(cfg)[name]
    batching = {**OmegaConf.to_container(cfg.batching, resolve=True), **(entry.get("batching") or {})}
    triage = {**OmegaConf.to_container(cfg.triage, resolve=True), **(entry.get("triage") or {})}
    return BatchingConfig(**batching), TriageConfig(**triage)


def build_engines(cfg: DictConfig) -> dict[str, ServingEngine]:
    """One engine per served model, on the configured device.

    Every tensor computation, loading included, runs on the one device thread the engines share.
    """
    device = pick_device(cfg.get("device", "auto"))
    worker = DeviceWorker(str(device))
    if cfg.get("torch_threads"):
        # Intra-op threads; on a CPU shared with the HTTP front end, fewer than the cores leaves one for
        # parsing and answering requests. Set on the device thread too: OpenMP keeps the count per thread.
        torch.set_num_threads(int(cfg.torch_threads))
        worker.run(torch.set_num_threads, int(cfg.torch_threads))
    metrics = EngineMetrics.create()
    return {m.name: ServingEngine(m, *engine_settings(cfg, m.name), device, metrics, worker)
            for m in worker.run(load_models, cfg, device)}


def build_app(cfg: DictConfig):
    """The engines of ``cfg`` and the FastAPI app serving them: ``(app, engines)``."""
    from serve.app import create_app

    engines = build_engines(cfg)
    # What start-up built (torch, the models, the config) lives as long as the server: out of the
    # collector's reach, a full collection scans only what serving allocates (start-up's own gen-2
    # collections took 13-350 ms on 2 cores; none over 5 ms was seen while serving).
    gc.collect()
    gc.freeze()
    norm = cfg.get("image_normalize")
    token = cfg.get("admin_token")
    if token is not None and len(str(token)) < 16:
        raise UserError("admin_token must be at least 16 characters (e.g. `python -c 'import secrets; "
                        "print(secrets.token_urlsafe())'`), or null to refuse settings changes over HTTP")
    app = create_app(engines, cfg.max_body_bytes, cfg.max_inputs,
                     {n: (list(norm.mean), list(norm.std)) for n in engines} if norm else None,
                     shed_lag_ms=cfg.get("shed_lag_ms"), lag_interval_ms=cfg.get("lag_interval_ms", 5.0),
                     admin_token=str(token) if token is not None else None,
                     body_timeout_s=cfg.get("body_timeout_s", 10.0),
                     max_image_bytes=cfg.get("max_image_bytes", 1 << 20),
                     grpc_host=cfg.host, grpc_port=cfg.get("grpc_port"))
    return app, engines


@user_facing
def serve(cfg: DictConfig) -> None:
    import uvicorn

    from serve.frontend import header_timeout_protocol

    app, engines = build_app(cfg)
    grpc = f" and grpc://{cfg.host}:{cfg.grpc_port}" if cfg.get("grpc_port") is not None else ""
    log.info("serving %s over the Open Inference Protocol on http://%s:%d%s (docs at /docs)", sorted(engines),
             cfg.host, cfg.port, grpc)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.get("log_level", "warning"),
                timeout_graceful_shutdown=cfg.get("graceful_shutdown_s", 30),
                limit_concurrency=cfg.get("limit_concurrency"),
                http=header_timeout_protocol(cfg.get("header_timeout_s", 10.0)))


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve.yaml")
def main(cfg: DictConfig) -> Any:
    extras(cfg)
    serve(cfg)


if __name__ == "__main__":
    run_hydra(main)
