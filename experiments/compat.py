"""Renamed config targets, so that run folders and configs written before a move still load.

As timm keeps a table of deprecated model names, this keeps one of the module paths a config's
``_target_`` may name. :func:`upgrade_targets` rewrites them in place; the entry points apply it to
every config they run and :func:`experiments.runs.read_run` to every run folder they read.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, ListConfig

log = logging.getLogger(__name__)

__all__ = ["REFERENCE_BUILDERS", "RENAMED_TARGETS", "upgrade_targets"]

# old target -> new target, for everything whose module moved (issue 11: models/, experiments/systems/, runs).
RENAMED_TARGETS: dict[str, str] = {
    "gating.create_model": "models.create_model",
    "gating.backbones.create_model": "models.create_model",
    "gating.backbones.registry.create_model": "models.create_model",
    "gating.classifier.ClassifierModule": "experiments.systems.ClassifierModule",
    "skipnet.SkipNetModule": "experiments.systems.SkipNetModule",
    "skipnet.module.SkipNetModule": "experiments.systems.SkipNetModule",
    "cascades.IDKCascadeModule": "experiments.systems.IDKCascadeModule",
    "cascades.module.IDKCascadeModule": "experiments.systems.IDKCascadeModule",
    "skipnet.SkipResNet": "models.skipnet.skipnet_from_backbone",
    "skipnet.models.SkipResNet": "models.skipnet.skipnet_from_backbone",
    "cascades.load_stage": "experiments.runs.load_stage",
    "cascades.model.load_stage": "experiments.runs.load_stage",
}

# Builders that took a run folder and are now one loader (experiments.runs.load_run): old target ->
# the load_run options it stood for. Evaluation methods and served models that still name them load.
REFERENCE_BUILDERS: dict[str, dict[str, Any]] = {
    "experiments.evaluation.static_from_run": {},
    "experiments.evaluation.skipnet_from_run": {},
    "experiments.evaluation.cascade_from_run": {},
    "experiments.evaluation.random_skip_from_run": {"kind": "random_skip"},
    "experiments.evaluation.methods.static_from_run": {},
    "experiments.evaluation.methods.skipnet_from_run": {},
    "experiments.evaluation.methods.cascade_from_run": {},
    "experiments.evaluation.methods.random_skip_from_run": {"kind": "random_skip"},
    "experiments.serve.static_servable": {},
    "experiments.serve.skipnet_servable": {},
    "experiments.serve.cascade_servable": {},
}


def upgrade_targets(node: Any, where: str = "config") -> list[tuple[str, str]]:
    """Rewrite every renamed ``_target_`` under ``node`` in place; returns the ``(old, new)`` pairs."""
    changed: list[tuple[str, str]] = []
    stack = [node]
    while stack:
        n = stack.pop()
        if n._is_none() or n._is_missing():
            continue
        if isinstance(n, DictConfig):
            target = n.get("_target_") if "_target_" in n else None
            if isinstance(target, str) and target in RENAMED_TARGETS:
                n["_target_"] = RENAMED_TARGETS[target]
                changed.append((target, RENAMED_TARGETS[target]))
            stack.extend(v for k, v in n.items_ex(resolve=False) if isinstance(v, (DictConfig, ListConfig)))
        elif isinstance(n, ListConfig):
            stack.extend(v for v in n._iter_ex(resolve=False) if isinstance(v, (DictConfig, ListConfig)))
    for old, new in dict.fromkeys(changed):
        log.info("%s names %s, which moved: using %s", where, old, new)
    return changed
