"""What the serving engine runs: a model cut into stages that a batch of any requests can go through.

A :class:`Servable` is a list of stage functions. ``stage(k, x, level)`` runs stage ``k`` on a batch
of inputs (rows from any mix of requests) at triage level ``level`` and returns a :class:`StageResult`:
per row, whether it is answered here, the answer (logits), the FLOPs the row spent in this stage, and
what to pass to the next stage for the rest. So a cascade's deferred rows from different requests meet
in the next stage's queue and run there as one batch.

Triage levels trade accuracy for time. Level 0 is the model as calibrated. Higher levels are cheaper:
a cascade defers less (looser thresholds, down to first-stage-only), and SkipNet skips more (a
higher gate threshold). :attr:`Servable.levels` publishes each level with the accuracy it gave on
validation data, measured offline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cascades.model import IDKCascade
from gating.cost import count_flops
from gating.execution import run_exits

__all__ = ["CascadeServable", "Servable", "SkipNetServable", "StageResult", "StaticServable", "TriageLevel",
           "measure_levels"]


@dataclass(frozen=True)
class TriageLevel:
    """One triage level: its settings and what it gave offline (validation accuracy, GFLOPs per image)."""

    level: int
    settings: dict[str, Any]
    val_acc: float | None = None
    val_gflops_per_img: float | None = None


@dataclass
class StageResult:
    """Rows of one stage's batch: ``done [b]`` answered here; ``logits [b, C]``; ``flops [b]`` spent in
    this stage; ``blocks [b]`` executed (SkipNet) or None; ``next_x`` the inputs of the rows that go on."""

    done: torch.Tensor
    logits: torch.Tensor
    flops: torch.Tensor
    blocks: torch.Tensor | None = None
    next_x: torch.Tensor | None = None


@dataclass
class Servable:
    """A model the engine can serve (see the module docstring)."""

    name: str
    kind: str
    input_shape: tuple[int, ...]
    num_classes: int
    levels: list[TriageLevel] = field(default_factory=lambda: [TriageLevel(0, {})])

    @property
    def num_stages(self) -> int:
        return 1

    def stage(self, k: int, x: torch.Tensor, level: int = 0) -> StageResult:
        raise NotImplementedError

    @torch.no_grad()
    def run(self, x: torch.Tensor, level: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All stages on one batch with compaction (offline: pricing levels, direct-call baselines):
        ``(logits [n, C], flops [n], exit_stage [n])``."""
        def stage_fn(k: int):
            def run(state: tuple[torch.Tensor, torch.Tensor]):
                rows, spent = state
                res = self.stage(k, rows, level)
                spent = spent + res.flops.to(spent.device)
                return (res.logits, spent), res.done, (res.next_x if res.next_x is not None else rows, spent)
            return run

        spent = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        (logits, flops), exit_stage = run_exits([stage_fn(k) for k in range(self.num_stages)], (x, spent))
        return logits, flops, exit_stage

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (infinite thresholds as the strings "inf"/"-inf")."""
        return {"name": self.name, "kind": self.kind, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "stages": self.num_stages,
                "triage_levels": [_jsonable(vars(lv)) for lv in self.levels]}


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


class StaticServable(Servable):
    """A plain classifier: one stage, every row answered, the same FLOPs for every row."""

    def __init__(self, name: str, net: nn.Module, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__(name, "static", tuple(input_shape), num_classes)
        self.net = net.eval()
        device = next(net.parameters()).device
        self.flops = float(count_flops(self.net, torch.zeros(1, *input_shape, device=device)))

    @torch.no_grad()
    def stage(self, k: int, x: torch.Tensor, level: int = 0) -> StageResult:
        logits = self.net(x)
        return StageResult(torch.ones(len(x), dtype=torch.bool), logits,
                           torch.full((len(x),), self.flops, dtype=torch.float64))


class SkipNetServable(Servable):
    """A SkipNet with real skipping; triage level ``i`` uses gate threshold ``thresholds[i]``."""

    def __init__(self, name: str, net: nn.Module, input_shape: Sequence[int], num_classes: int,
                 levels: Sequence[TriageLevel] | None = None) -> None:
        super().__init__(name, "skipnet", tuple(input_shape), num_classes,
                         list(levels) if levels else [TriageLevel(0, {"threshold": float(net.threshold)})])
        self.net = net.eval()
        device = next(net.parameters()).device
        self.table = self.net.cost_table(torch.zeros(1, *input_shape, device=device))

    @torch.no_grad()
    def stage(self, k: int, x: torch.Tensor, level: int = 0) -> StageResult:
        thr = self.levels[min(level, len(self.levels) - 1)].settings.get("threshold")
        out = self.net(x, mode="greedy", execution="skip", threshold=thr)
        executed = out.executed.cpu()
        return StageResult(torch.ones(len(x), dtype=torch.bool), out.logits,
                           self.table.per_sample(executed), executed.sum(1))


class CascadeServable(Servable):
    """An IDK cascade, one engine stage per cascade stage; triage level ``i`` uses ``thresholds`` of
    ``levels[i]`` (its last level answers everything at the first stage)."""

    def __init__(self, name: str, cascade: IDKCascade, input_shape: Sequence[int], num_classes: int,
                 levels: Sequence[TriageLevel] | None = None) -> None:
        base = [float(t) for t in cascade.thresholds.tolist()]
        lv = list(levels) if levels else [TriageLevel(0, {"thresholds": base})]
        if not any(all(t == -math.inf for t in level.settings["thresholds"]) for level in lv):
            lv.append(TriageLevel(len(lv), {"thresholds": [-math.inf] * len(base)}))  # first stage only
        super().__init__(name, "cascade", tuple(input_shape), num_classes, lv)
        self.cascade = cascade.eval()
        device = next(cascade.parameters()).device
        self.costs = cascade.stage_costs(torch.zeros(1, *input_shape, device=device))

    @property
    def num_stages(self) -> int:
        return self.cascade.num_stages

    @torch.no_grad()
    def stage(self, k: int, x: torch.Tensor, level: int = 0) -> StageResult:
        thresholds = self.levels[min(level, len(self.levels) - 1)].settings["thresholds"]
        logits, probs, features = self.cascade.run_stage(k, x)
        flops = torch.full((len(x),), self.costs.stage[k], dtype=torch.float64)
        if k == self.num_stages - 1:
            done = torch.ones(len(x), dtype=torch.bool)
        else:
            done = (~self.cascade.decide(k, probs, features, thresholds[k]).defer).cpu()
        return StageResult(done, logits, flops, None, x)


@torch.no_grad()
def measure_levels(servable: Servable, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> list[TriageLevel]:
    """Run every triage level offline on labelled data (validation) and record its accuracy and mean
    GFLOPs per image in ``servable.levels``: the price of each level, published with the model.

    Levels that are not cheaper than the level before them are dropped (and the rest renumbered).
    """
    device = next(p.device for p in _modules(servable)[0].parameters())
    measured = []
    for lv in servable.levels:
        correct, flops = 0, 0.0
        for i in range(0, len(x), batch_size):
            logits, spent, _ = servable.run(x[i:i + batch_size].to(device), lv.level)
            correct += int((logits.argmax(-1).cpu() == y[i:i + batch_size]).sum())
            flops += float(spent.sum())
        measured.append(TriageLevel(lv.level, lv.settings, correct / len(x), flops / len(x) / 1e9))
    # A triage level must be cheaper than the one below it: keep level 0, then each strictly cheaper one.
    kept = [measured[0]]
    for lv in measured[1:]:
        if lv.val_gflops_per_img < kept[-1].val_gflops_per_img:
            kept.append(TriageLevel(len(kept), lv.settings, lv.val_acc, lv.val_gflops_per_img))
    servable.levels = kept
    return kept


def _modules(servable: Servable) -> list[nn.Module]:
    return [v for v in vars(servable).values() if isinstance(v, nn.Module)]
