"""Scale out through Ray Serve: the same engines and HTTP app, in N replicas behind Ray's HTTP proxy.

    pip install -e ".[ray]"
    python -m experiments.serve_ray                                   # 2 replicas on this machine, port 8000
    python -m experiments.serve_ray ray.num_replicas=8 ray.address=auto ray.num_gpus_per_replica=1
    python -m experiments.serve_ray ray.user_config.cascade.triage.mode=on   # a knob on every replica

Each replica builds its engines from the same config as ``python -m experiments.serve`` (so every
checkpoint and the validation data must be readable on every node: shared storage) and serves the
same FastAPI app, so routes, answers, knobs and Prometheus metrics are the same; Ray's proxy spreads
requests over the replicas, and each replica batches, re-batches and triages its own share. A
``PUT /v2/settings/...`` reaches only the replica that takes it; to change a knob on all of them use
``ray.user_config`` (``{model: {"batching": {...}, "triage": {...}}}``), which Ray hands to every
replica's ``reconfigure`` without restarting it. Auto triage stays per replica: each one sheds its own load.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import experiments  # noqa: F401  (sets PROJECT_ROOT)
from experiments.utils import extras, run_hydra, user_facing
from gating.errors import UserError

log = logging.getLogger(__name__)


class ServingReplica:
    """One Ray Serve replica: builds the engines from a resolved serve config and serves the app.

    The app is built by ``__serve_build_asgi_app__``, which Ray calls on the replica after the
    constructor, so the models load where they run, not on the driver.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.engines: dict = {}

    def __serve_build_asgi_app__(self):
        from experiments.serve import build_app

        app, self.engines = build_app(OmegaConf.create(self.config))
        return app

    def reconfigure(self, user_config: dict[str, Any] | None) -> None:
        """Apply ``{model: {"batching": {...}, "triage": {...}}}`` to this replica's engines."""
        for name, knobs in (user_config or {}).items():
            if name not in self.engines:
                raise ValueError(f"ray.user_config names model {name!r}; models: {sorted(self.engines)}")
            self.engines[name].update((knobs or {}).get("batching"), (knobs or {}).get("triage"))


def build_deployment(cfg: DictConfig):
    """The Ray Serve application (a bound deployment) for ``cfg``; raises ``UserError`` without Ray."""
    try:
        from ray import serve
    except ImportError:
        raise UserError('Ray Serve is not installed; run: pip install -e ".[ray]"') from None
    r = cfg.ray
    replica = serve.ingress()(ServingReplica)
    deployment = serve.deployment(
        replica, name="adaptive_inference", num_replicas=int(r.num_replicas),
        max_ongoing_requests=int(r.max_ongoing_requests), max_queued_requests=int(r.max_queued_requests),
        ray_actor_options={"num_cpus": float(r.num_cpus_per_replica), "num_gpus": float(r.num_gpus_per_replica)},
        user_config=OmegaConf.to_container(r.user_config, resolve=True) if r.get("user_config") else None,
    )
    return deployment.bind(replica_config(cfg))


def replica_config(cfg: DictConfig) -> dict[str, Any]:
    """The serve config a replica builds from, resolved on the driver (paths become absolute)."""
    keep = [k for k in cfg if k not in ("ray", "hydra")]
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, keep), resolve=True)


@user_facing
def serve_ray(cfg: DictConfig) -> None:
    import ray
    from ray import serve

    app = build_deployment(cfg)
    ray.init(address=cfg.ray.address, include_dashboard=False)
    serve.start(http_options={"host": cfg.host, "port": int(cfg.port)})
    log.info("serving through Ray Serve on http://%s:%d with %d replicas", cfg.host, cfg.port,
             cfg.ray.num_replicas)
    try:
        serve.run(app, name="adaptive_inference", route_prefix=cfg.ray.route_prefix, blocking=True)
    except KeyboardInterrupt:  # Ctrl-C: replicas drain through the app's lifespan as Serve shuts down
        log.info("shutting down")
    finally:
        serve.shutdown()
        ray.shutdown()


@hydra.main(version_base="1.3", config_path="../configs", config_name="serve_ray.yaml")
def main(cfg: DictConfig) -> Any:
    extras(cfg)
    serve_ray(cfg)


if __name__ == "__main__":
    run_hydra(main)
