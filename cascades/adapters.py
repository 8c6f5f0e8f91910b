"""The IDK cascade behind the model-adapter interface (:mod:`gating.adapters`), for evaluation and serving.

One adapter stage per cascade stage, so a server re-batches the rows each stage defers with other
requests' deferred rows. Operating points are threshold settings: the calibrated ones, the points of
the run's epsilon frontier, and "first stage only" (every threshold -inf), the cheapest a cascade can
answer at.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from cascades.model import IDKCascade
from gating.adapters import ModelAdapter, Point, StageResult
from gating.cost import StageCosts

__all__ = ["CascadeAdapter"]


class CascadeAdapter(ModelAdapter):
    """An IDK cascade with compaction.

    Args:
        cascade: the calibrated cascade (its thresholds are the first operating point).
        frontier: more points as ``experiments.cascade`` records them (``{"epsilon", "thresholds"}``).
        name, input_shape, num_classes: see :class:`gating.adapters.ModelAdapter`.
    """

    kind: ClassVar[str] = "cascade"

    def __init__(self, cascade: IDKCascade, frontier: Sequence[Mapping[str, Any]] = (), name: str = "cascade",
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None) -> None:
        own = [float(t) for t in cascade.thresholds.tolist()]
        points = [Point("default", {"thresholds": own})]
        points += [Point(f"eps={p['epsilon']:g}", {"thresholds": [float(t) for t in p["thresholds"]]})
                   for p in frontier]
        if not any(all(t == -math.inf for t in p.settings["thresholds"]) for p in points):
            points.append(Point("first_stage", {"thresholds": [-math.inf] * len(own)}))
        stage0 = cascade.stages[0]
        super().__init__(name, points, input_shape, num_classes or getattr(stage0, "num_classes", None))
        self.cascade = cascade.eval()

    @property
    def num_stages(self) -> int:
        return self.cascade.num_stages

    def modules(self) -> list[torch.nn.Module]:
        return [self.cascade]

    def stage_costs(self, x: torch.Tensor) -> StageCosts:
        """Exact FLOPs (and int8 operations) of each stage, its IDK decision included, at ``x``'s input shape."""
        return self.cost_at(x, self.cascade.stage_costs)

    @torch.no_grad()
    def stage(self, k: int, x: torch.Tensor, point: Point | int | str | None = None) -> StageResult:
        thresholds = self.point(point).settings["thresholds"]
        logits, probs, features = self.cascade.run_stage(k, x)
        costs = self.stage_costs(x)
        flops = torch.full((len(x),), costs.stage[k], dtype=torch.float64)
        int8 = torch.full_like(flops, costs.int8[k]) if costs.has_int8 else None
        if k == self.num_stages - 1:
            done = torch.ones(len(x), dtype=torch.bool)
        else:
            done = (~self.cascade.decide(k, probs, features, thresholds[k]).defer).cpu()
        return StageResult(done, logits, flops, None, x, int8)
