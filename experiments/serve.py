"""Serve trained models over HTTP with dynamic batching, cascade re-batching and triage.

    python -m experiments.serve                                   # the MNIST models, on 127.0.0.1:8000
    python -m experiments.serve experiment=digits_serve           # the digits pipeline's models (no GPU needed)
    python -m experiments.serve batching.adaptive=true triage.mode=auto port=8080
    python -m serve.cli triage auto --model cascade               # switch triage while serving

Each entry of ``models`` builds a servable from a finished run folder (cascade, SkipNet or static).
Before serving, every triage level of every model is run on the validation split and its accuracy and
GFLOPs per image are published at ``GET /v1/models``. The same engine runs on a GPU when
``device=auto`` finds one.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import experiments  # noqa: F401  (sets PROJECT_ROOT)
import skipnet  # noqa: F401  (registers the SkipNet models)
from experiments.data import batches_to_tensor
from experiments.evaluation.methods import cascade_from_run, skipnet_from_run, static_from_run
from experiments.report import pick_device
from experiments.utils import extras, run_hydra, user_facing
from gating.backbones.weights import find_run
from serve.engine import BatchingConfig, DeviceWorker, EngineMetrics, ServingEngine, TriageConfig
from serve.servable import CascadeServable, Servable, SkipNetServable, StaticServable, TriageLevel, measure_levels

log = logging.getLogger(__name__)


def _shape_and_classes(run: str | Path) -> tuple[tuple[int, ...], int]:
    cfg = OmegaConf.load(find_run(run) / "config.yaml")
    d = cfg.data
    return (int(d.in_chans), int(d.image_size), int(d.image_size)), int(d.num_classes)


def cascade_servable(name: str, run: str, levels_from_frontier: bool = True) -> CascadeServable:
    """A calibrated cascade; triage levels are its frontier's cheaper operating points, then first-stage only."""
    method = cascade_from_run(name, run)
    shape, classes = _shape_and_classes(run)
    levels = [TriageLevel(0, {"thresholds": [float(t) for t in method.cascade.thresholds.tolist()]})]
    if levels_from_frontier:
        for p in method.points[1:]:
            levels.append(TriageLevel(len(levels), {"thresholds": p["thresholds"], "from": p["label"]}))
    return CascadeServable(name, method.cascade, shape, classes, levels)


def skipnet_servable(name: str, run: str, thresholds: Sequence[float] = (0.6, 0.7, 0.8)) -> SkipNetServable:
    """A SkipNet; triage level ``i`` raises the gate threshold to ``thresholds[i - 1]`` (more skipping)."""
    method = skipnet_from_run(name, run)
    shape, classes = _shape_and_classes(run)
    base = float(method.net.threshold)
    levels = [TriageLevel(0, {"threshold": base})] + [
        TriageLevel(i + 1, {"threshold": float(t)}) for i, t in enumerate(t for t in thresholds if t > base)]
    return SkipNetServable(name, method.net, shape, classes, levels)


def static_servable(name: str, run: str) -> StaticServable:
    method = static_from_run(name, run)
    shape, classes = _shape_and_classes(run)
    return StaticServable(name, method.net, shape, classes)


def build_engines(cfg: DictConfig) -> dict[str, ServingEngine]:
    """Servables from the config on the device, triage levels measured on val; one engine each.

    Every tensor computation, loading included, runs on the one device thread the engines share.
    """
    device = pick_device(cfg.get("device", "auto"))
    worker = DeviceWorker(str(device))
    if cfg.get("torch_threads"):
        # Intra-op threads; on a CPU shared with the HTTP front end, fewer than the cores leaves one for
        # parsing and answering requests. Set on the device thread too: OpenMP keeps the count per thread.
        torch.set_num_threads(int(cfg.torch_threads))
        worker.run(torch.set_num_threads, int(cfg.torch_threads))

    def build() -> list[Servable]:
        servables: list[Servable] = [instantiate(node, name=name) for name, node in cfg.models.items() if node]
        val = batches_to_tensor(instantiate(cfg.data).val_dataloader()) if cfg.measure_levels else None
        for s in servables:
            for v in vars(s).values():
                if isinstance(v, torch.nn.Module):
                    v.to(device).eval()
            if val is not None:
                for lv in measure_levels(s, *val):
                    log.info("%s triage level %d: val acc %.4f, %.5f GFLOPs/img", s.name, lv.level, lv.val_acc,
                             lv.val_gflops_per_img)
        return servables

    metrics = EngineMetrics.create()
    return {s.name: ServingEngine(s, BatchingConfig(**cfg.batching), TriageConfig(**cfg.triage), device, metrics,
                                  worker)
            for s in worker.run(build)}


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
    app = create_app(engines, cfg.max_body_bytes, cfg.max_inputs,
                     {n: (list(norm.mean), list(norm.std)) for n in engines} if norm else None,
                     shed_lag_ms=cfg.get("shed_lag_ms"), lag_interval_ms=cfg.get("lag_interval_ms", 5.0))
    return app, engines


@user_facing
def serve(cfg: DictConfig) -> None:
    import uvicorn

    app, engines = build_app(cfg)
    log.info("serving %s on http://%s:%d (docs at /docs)", sorted(engines), cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.get("log_level", "warning"),
                timeout_graceful_shutdown=cfg.get("graceful_shutdown_s", 30),
                limit_concurrency=cfg.get("limit_concurrency"))


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve.yaml")
def main(cfg: DictConfig) -> Any:
    extras(cfg)
    serve(cfg)


if __name__ == "__main__":
    run_hydra(main)
