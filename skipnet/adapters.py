"""SkipNet behind the model-adapter interface (:mod:`gating.adapters`), for evaluation and serving.

- :class:`SkipNetAdapter`: greedy gates, real skipping; operating points are gate thresholds (above
  the trained 0.5 a model skips more: the triage knob a server turns under load).
- :class:`RandomSkipAdapter`: the same network with random decisions at given per-block rates and no
  gates run (the SkipNet paper's stochastic-depth baseline), matched to a SkipNet's measured rates so
  that both spend the same FLOPs on average.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from gating.adapters import ModelAdapter, Point, StageResult
from gating.cost import CostTable
from gating.errors import UserError
from skipnet.models import SkipResNet

__all__ = ["RandomSkipAdapter", "SkipNetAdapter"]


class _SkipNetBase(ModelAdapter):
    def __init__(self, name: str, net: SkipResNet, points: Sequence[Point], input_shape: Sequence[int] | None,
                 num_classes: int | None) -> None:
        if not isinstance(net, SkipResNet):
            raise UserError(f"model {name!r} is a {type(net).__name__}, not a SkipNet (skipnet.SkipResNet)")
        super().__init__(name, points, input_shape, num_classes or net.num_classes)
        self.net = net.eval()

    def modules(self) -> list[torch.nn.Module]:
        return [self.net]

    def cost_table(self, x: torch.Tensor) -> CostTable:
        """The network's per-block cost table at ``x``'s input shape."""
        return self.cost_at(x, self.net.cost_table)


class SkipNetAdapter(_SkipNetBase):
    """A trained SkipNet with greedy gates and real skipping.

    Args:
        net: the gated network.
        thresholds: extra operating points, one per gate threshold (the first point is the model's own).
        name, input_shape, num_classes: see :class:`gating.adapters.ModelAdapter`.
    """

    kind: ClassVar[str] = "skipnet"

    def __init__(self, net: SkipResNet, thresholds: Sequence[float] = (), name: str = "skipnet",
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None) -> None:
        own = float(net.threshold)
        points = [Point("default", {"threshold": own})] + [
            Point(f"thr={t:g}", {"threshold": float(t)}) for t in thresholds if float(t) != own]
        super().__init__(name, net, points, input_shape, num_classes)

    @torch.no_grad()
    def stage(self, k: int, x: torch.Tensor, point: Point | int | str | None = None) -> StageResult:
        threshold = self.point(point).settings.get("threshold")
        out = self.net(x, mode="greedy", execution="skip", threshold=threshold)
        executed = out.executed.cpu()
        table = self.cost_table(x)
        return StageResult(torch.ones(len(x), dtype=torch.bool), out.logits, table.per_sample(executed), executed,
                           None, table.per_sample_int8(executed) if table.has_int8 else None)


class RandomSkipAdapter(_SkipNetBase):
    """Random skipping: block ``i`` runs with probability ``rates[i]`` per input (block 0 always), gates
    not run, so they cost nothing. ``rates`` are set by :meth:`match` from another model's executed
    blocks; ``match_name`` names that model for the evaluator.

    Args:
        net: the gated network whose blocks are skipped at random.
        seed: seed of the decisions (reset by :meth:`match`, so a matched run is reproducible).
        match: the name of the SkipNet model whose rates to copy (for the evaluator).
        name, input_shape, num_classes: see :class:`gating.adapters.ModelAdapter`.
    """

    kind: ClassVar[str] = "random_skip"

    def __init__(self, net: SkipResNet, seed: int = 0, match: str | None = None, name: str = "random_skip",
                 input_shape: Sequence[int] | None = None, num_classes: int | None = None) -> None:
        super().__init__(name, net, [Point("default")], input_shape, num_classes)
        self.seed, self.match_name = seed, match
        self.rates: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def match(self, executed: torch.Tensor) -> None:
        """Use the per-block execution rates of ``executed [n, N]``."""
        self.rates = executed.float().mean(0).cpu()
        self._gen = torch.Generator().manual_seed(self.seed)

    @torch.no_grad()
    def stage(self, k: int, x: torch.Tensor, point: Point | int | str | None = None) -> StageResult:
        if self.rates is None:
            raise UserError(f"random-skip model {self.name!r} has no rates: set match=<a SkipNet model evaluated "
                            f"before it>")
        actions = (torch.rand(len(x), len(self.rates), generator=self._gen) < self.rates).float()
        actions[:, 0] = 1.0
        out = self.net(x, mode="greedy", execution="skip", actions=actions.to(x.device), run_gates=False)
        table = self.cost_table(x)
        executed = out.executed.cpu()
        return StageResult(torch.ones(len(x), dtype=torch.bool), out.logits, table.per_sample(executed) - table.gate_flops,
                           executed, None, table.per_sample_int8(executed) if table.has_int8 else None)
