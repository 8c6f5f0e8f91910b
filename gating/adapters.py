"""One adapter per kind of model: what evaluation and serving both run.

A :class:`ModelAdapter` wraps a trained model (a plain classifier, a SkipNet, an IDK cascade, ...) and
runs it the way it runs at inference: greedy decisions, real skipping, compacted early exits. It
answers, per row, the logits, the exact FLOPs the row spent, and where it applies the exit stage or
the blocks executed. It publishes its operating points (:class:`Point`: a gate threshold, a set of
cascade thresholds, ...) and, once priced on validation data (:func:`price_points`), what each gave.

The model is cut into stages so that a serving engine can re-batch rows between them:
``stage(k, x, point)`` runs stage ``k`` on a batch of rows from any mix of requests and says which rows
are answered there (:class:`StageResult`). ``run(x, point)`` runs every stage on one batch with
compaction (:func:`gating.execution.run_exits`), which is what evaluation and offline pricing use.

Kinds: :class:`StaticAdapter` here; ``skipnet.SkipNetAdapter``, ``skipnet.RandomSkipAdapter`` and
``cascades.CascadeAdapter`` in their packages. ``experiments.runs.load_run`` builds the right one from
a run folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn

from gating.cost import count_flops, int8_ops, is_quantized
from gating.execution import run_exits

__all__ = ["BatchResult", "ModelAdapter", "Point", "StageResult", "StaticAdapter", "price_points", "triage_levels"]


@dataclass(frozen=True)
class Point:
    """One operating point of a model: the settings its adapter runs with, and their measured price.

    Attributes:
        label: a short name (``"default"`` for the model as trained or calibrated, ``"thr=0.7"``, ...).
        settings: what the adapter reads at run time (``{"threshold": 0.7}``, ``{"thresholds": [...]}``).
        val_acc: accuracy on the validation split, once priced (:func:`price_points`).
        val_gflops_per_img: mean exact float GFLOPs per image on the validation split, once priced.
        val_int8_gops_per_img: mean exact int8 operations per image (G), once priced; None for a float model.
    """

    label: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    val_acc: float | None = None
    val_gflops_per_img: float | None = None
    val_int8_gops_per_img: float | None = None

    @property
    def val_gops_per_img(self) -> float | None:
        """All operations per image, float FLOPs and int8 operations together (what levels are ordered by:
        an int8 model's points differ in int8 work)."""
        if self.val_gflops_per_img is None:
            return None
        return self.val_gflops_per_img + (self.val_int8_gops_per_img or 0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (infinite thresholds as the strings ``"inf"``/``"-inf"``)."""
        out = {"label": self.label, "settings": _jsonable(dict(self.settings)), "val_acc": self.val_acc,
               "val_gflops_per_img": self.val_gflops_per_img}
        if self.val_int8_gops_per_img is not None:
            out["val_int8_gops_per_img"] = self.val_int8_gops_per_img
        return out


@dataclass
class StageResult:
    """One stage on a batch of rows.

    ``done [b]``: answered at this stage; ``logits [b, C]``; ``flops [b]`` (float64, CPU): float FLOPs
    spent in this stage; ``executed [b, N]``: blocks executed (SkipNet) or None; ``next_x``: what the rows
    that go on pass to the next stage (None: their input unchanged); ``int8_ops [b]`` (float64, CPU): int8
    operations spent in this stage, None where it runs none.
    """

    done: torch.Tensor
    logits: torch.Tensor
    flops: torch.Tensor
    executed: torch.Tensor | None = None
    next_x: torch.Tensor | None = None
    int8_ops: torch.Tensor | None = None


@dataclass
class BatchResult:
    """The whole model on a batch: ``logits [B, C]``, float ``flops [B]`` (exact, float64, CPU), where it
    applies the exit stage ``[B]`` (multi-stage models) or the executed blocks ``[B, N]``, and the int8
    operations ``int8_ops [B]`` of a model with int8 layers (None: a float model)."""

    logits: torch.Tensor
    flops: torch.Tensor
    exit_stage: torch.Tensor | None = None
    executed: torch.Tensor | None = None
    int8_ops: torch.Tensor | None = None


class ModelAdapter:
    """Base adapter (see the module docstring). Subclasses set ``kind``, implement :meth:`modules` and
    :meth:`stage`, and multi-stage ones override :attr:`num_stages`.

    Args:
        name: the model's name in reports and on the server.
        points: its operating points; the first is the model as trained or calibrated.
        input_shape: the per-sample input shape (``[C, H, W]``), where known.
        num_classes: the number of classes, where known.
    """

    kind: ClassVar[str] = "model"

    def __init__(self, name: str, points: Sequence[Point] = (), input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None) -> None:
        self.name = name
        self.points: list[Point] = list(points) or [Point("default")]
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = num_classes
        self._costs: dict[tuple[int, ...], Any] = {}

    # ------------------------------------------------------------------------------------- modules
    @property
    def num_stages(self) -> int:
        return 1

    def modules(self) -> list[nn.Module]:
        """The networks this adapter runs (moved and set to eval mode together by :meth:`to`)."""
        raise NotImplementedError

    def to(self, device: torch.device | str) -> ModelAdapter:
        for m in self.modules():
            m.to(device).eval()
        return self

    @property
    def device(self) -> torch.device:
        for m in self.modules():
            for p in m.parameters():
                return p.device
        return torch.device("cpu")

    def cost_at(self, x: torch.Tensor, measure: Callable[[torch.Tensor], Any]) -> Any:
        """What ``measure(one row)`` gives at ``x``'s input shape, measured once per shape (FLOPs do not
        depend on the values, and counting them runs the model under a counter)."""
        shape = tuple(x.shape[1:])
        if shape not in self._costs:
            self._costs[shape] = measure(x[:1])
        return self._costs[shape]

    def point(self, point: Point | int | str | None = None) -> Point:
        """A point by index, by label, or as given (None: the first)."""
        if point is None:
            return self.points[0]
        if isinstance(point, Point):
            return point
        if isinstance(point, int):
            return self.points[point]
        for p in self.points:
            if p.label == point:
                return p
        raise KeyError(f"{self.name} has no operating point {point!r}; points: {[p.label for p in self.points]}")

    # ------------------------------------------------------------------------------------- running
    def stage(self, k: int, x: torch.Tensor, point: Point | int | str | None = None) -> StageResult:
        """Stage ``k`` on a batch of rows at an operating point."""
        raise NotImplementedError

    @torch.no_grad()
    def run(self, x: torch.Tensor, point: Point | int | str | None = None) -> BatchResult:
        """Every stage on one batch with compaction: each stage runs only on the rows still in flight."""
        p = self.point(point)
        if self.num_stages == 1:
            r = self.stage(0, x, p)
            return BatchResult(r.logits, r.flops, None, r.executed, r.int8_ops)

        int8_seen = [False]

        def stage_fn(k: int):
            def go(state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
                rows, spent, spent_int8 = state
                r = self.stage(k, rows, p)
                spent = spent + r.flops.to(spent.device)
                if r.int8_ops is not None:
                    int8_seen[0] = True
                    spent_int8 = spent_int8 + r.int8_ops.to(spent_int8.device)
                nxt = r.next_x if r.next_x is not None else rows
                return (r.logits, spent, spent_int8), r.done, (nxt, spent, spent_int8)
            return go

        zeros = torch.zeros(len(x), dtype=torch.float64)
        (logits, flops, int8), exit_stage = run_exits([stage_fn(k) for k in range(self.num_stages)],
                                                      (x, zeros, zeros.clone()))
        return BatchResult(logits, flops, exit_stage, None, int8 if int8_seen[0] else None)

    def triage_levels(self) -> list[Point]:
        """The points a server can step through under load, costliest first (see :func:`triage_levels`)."""
        return triage_levels(self.points)

    def describe(self) -> dict[str, Any]:
        """JSON-ready description: kind, input shape, classes, stages and triage levels."""
        return {"name": self.name, "kind": self.kind, "input_shape": list(self.input_shape or ()),
                "num_classes": self.num_classes, "stages": self.num_stages,
                "triage_levels": [{"level": i, **p.to_dict()} for i, p in enumerate(self.triage_levels())]}


class StaticAdapter(ModelAdapter):
    """A plain classifier: one stage, every row answered, the same FLOPs for every row."""

    kind: ClassVar[str] = "static"

    def __init__(self, net: nn.Module, name: str = "static", input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None) -> None:
        super().__init__(name, (), input_shape, num_classes or getattr(net, "num_classes", None))
        self.net = net.eval()

    def modules(self) -> list[nn.Module]:
        return [self.net]

    def flops_per_row(self, x: torch.Tensor) -> float:
        """Exact float FLOPs of one row of ``x``'s shape."""
        return self._cost_per_row(x)[0]

    def int8_ops_per_row(self, x: torch.Tensor) -> float | None:
        """Exact int8 operations of one row of ``x``'s shape; None for a float network."""
        return self._cost_per_row(x)[1]

    def _cost_per_row(self, x: torch.Tensor) -> tuple[float, float | None]:
        return self.cost_at(x, lambda row: (float(count_flops(self.net, row)),
                                            float(int8_ops(self.net, row)) if is_quantized(self.net) else None))

    @torch.no_grad()
    def stage(self, k: int, x: torch.Tensor, point: Point | int | str | None = None) -> StageResult:
        flops, int8 = self._cost_per_row(x)
        per_row = torch.full((len(x),), flops, dtype=torch.float64)
        return StageResult(torch.ones(len(x), dtype=torch.bool), self.net(x), per_row, None, None,
                           torch.full_like(per_row, int8) if int8 is not None else None)


# ------------------------------------------------------------------------------------------- pricing
@torch.no_grad()
def price_points(adapter: ModelAdapter, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> list[Point]:
    """Run every operating point on labelled data (validation) and record its accuracy and mean GFLOPs
    per image (and int8 GOPs, for a model with int8 layers): the price each point is published with.
    Sets and returns ``adapter.points``."""
    device = adapter.device
    priced = []
    for p in adapter.points:
        correct, flops, int8 = 0, 0.0, None
        for i in range(0, len(x), batch_size):
            out = adapter.run(x[i:i + batch_size].to(device), p)
            correct += int((out.logits.argmax(-1).cpu() == y[i:i + batch_size]).sum())
            flops += float(out.flops.sum())
            if out.int8_ops is not None:
                int8 = (int8 or 0.0) + float(out.int8_ops.sum())
        priced.append(replace(p, val_acc=correct / len(x), val_gflops_per_img=flops / len(x) / 1e9,
                              val_int8_gops_per_img=int8 / len(x) / 1e9 if int8 is not None else None))
    adapter.points = priced
    return priced


def triage_levels(points: Sequence[Point]) -> list[Point]:
    """Level 0 is the first point (the model as trained or calibrated); the next levels are the cheaper
    priced points that no other point dominates (another at most as costly and at least as accurate,
    better in one), costliest first: each level costs strictly less than the one below it and is no
    more accurate, so raising the level always trades accuracy for cost.

    Cost is all operations (:attr:`Point.val_gops_per_img`: float FLOPs plus int8 operations). Unpriced
    points are kept as given (their order is the caller's).
    """
    if not points or any(p.val_gops_per_img is None for p in points):
        return list(points)
    first = points[0]
    cheaper = [p for p in points[1:] if p.val_gops_per_img < first.val_gops_per_img]
    if any(p.val_acc is None for p in points):
        frontier = cheaper
    else:
        def dominated(p: Point) -> bool:
            return any(q is not p and q.val_gops_per_img <= p.val_gops_per_img and q.val_acc >= p.val_acc
                       and (q.val_gops_per_img < p.val_gops_per_img or q.val_acc > p.val_acc)
                       for q in cheaper)
        frontier = [p for p in cheaper if not dominated(p)]
    levels = [first]
    for p in sorted(frontier, key=lambda q: -q.val_gops_per_img):
        if p.val_gops_per_img < levels[-1].val_gops_per_img:
            levels.append(p)
    return levels


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x
