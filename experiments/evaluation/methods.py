"""The models the evaluator compares, behind one interface: ``method.run(x, **point) -> MethodOutput``.

- :class:`StaticMethod`: any classifier (every input pays the same FLOPs).
- :class:`SkipNetMethod`: a gated ResNet with real skipping; operating points are gate thresholds.
- :class:`RandomSkipMethod`: the same network with random skipping at given per-block rates (the
  SkipNet paper's stochastic-depth baseline), matched to a SkipNet's measured rates so both spend the
  same FLOPs on average.
- :class:`CascadeMethod`: an IDK cascade with compaction; operating points are threshold settings
  (the run's epsilon frontier).

Each builder ``*_from_run`` reads a finished run folder (or the newest run in a folder of runs): its
``config.yaml`` says how to build the model and its record says where the weights are.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cascades.model import IDKCascade
from gating.backbones.weights import find_run, load_pretrained
from gating.cost import count_flops
from gating.errors import UserError

__all__ = ["CascadeMethod", "Method", "MethodOutput", "RandomSkipMethod", "SkipNetMethod", "StaticMethod",
           "cascade_from_run", "random_skip_from_run", "skipnet_from_run", "static_from_run"]


@dataclass
class MethodOutput:
    """Per input: ``logits [B, C]``, ``flops [B]`` (exact, float64), and where it applies the exit stage
    ``[B]`` or the executed blocks ``[B, N]``."""

    logits: torch.Tensor
    flops: torch.Tensor
    exit_stage: torch.Tensor | None = None
    executed: torch.Tensor | None = None


@dataclass
class Method:
    """Base: a named model with operating points (``{"label": ..., **kwargs for run}``)."""

    name: str
    kind: str = "static"
    points: list[dict[str, Any]] = field(default_factory=lambda: [{"label": "default"}])
    main_point: str = "default"

    def run(self, x: torch.Tensor, **point: Any) -> MethodOutput:
        raise NotImplementedError

    def to(self, device: torch.device) -> "Method":
        for v in vars(self).values():
            if isinstance(v, nn.Module):
                v.to(device).eval()
        return self


def _run_config(run: Path) -> tuple[DictConfig, dict[str, Any]]:
    cfg_file = run / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"run folder {str(run)!r} has no config.yaml: pass a folder written by experiments.*")
    return OmegaConf.load(cfg_file), json.loads((run / "metrics.json").read_text())


def _without_pretrained(node: Any) -> Any:
    """Null every ``pretrained`` key: the run's own checkpoint is loaded afterwards."""
    if isinstance(node, DictConfig):
        for k in node:
            if k == "pretrained":
                node[k] = None
            else:
                _without_pretrained(node[k])
    return node


def _net_from_run(run: Path, example: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, Any]]:
    cfg, record = _run_config(run)
    if "model" not in cfg or "net" not in cfg.model:
        raise UserError(f"{str(run)!r} is not a training run of a model (no model.net in its config)")
    net = instantiate(_without_pretrained(cfg.model.net))
    best = (record.get("checkpoints") or {}).get("best") or (record.get("checkpoints") or {}).get("last")
    load_pretrained(net, best or str(run))
    return net.eval(), record


class StaticMethod(Method):
    def __init__(self, name: str, net: nn.Module) -> None:
        super().__init__(name, "static")
        self.net = net.eval()
        self._flops: float | None = None

    def run(self, x: torch.Tensor, **point: Any) -> MethodOutput:
        if self._flops is None:
            self._flops = float(count_flops(self.net, x[:1]))
        logits = self.net(x)
        return MethodOutput(logits, torch.full((len(x),), self._flops, dtype=torch.float64))


class SkipNetMethod(Method):
    def __init__(self, name: str, net: nn.Module, thresholds: Sequence[float] = ()) -> None:
        points = [{"label": "default"}] + [{"label": f"thr={t:g}", "threshold": float(t)} for t in thresholds]
        super().__init__(name, "skipnet", points)
        self.net = net.eval()
        self._table = None

    def table(self, x: torch.Tensor):
        if self._table is None:
            self._table = self.net.cost_table(x[:1])
        return self._table

    def run(self, x: torch.Tensor, threshold: float | None = None, **point: Any) -> MethodOutput:
        out = self.net(x, mode="greedy", execution="skip", threshold=threshold)
        return MethodOutput(out.logits, self.table(x).per_sample(out.executed.cpu()), executed=out.executed)


class RandomSkipMethod(Method):
    """Random skipping: block ``i`` runs with probability ``rates[i]`` per input (block 0 always),
    gates not run. ``rates`` are set by :meth:`match` from another method's executed blocks."""

    def __init__(self, name: str, net: nn.Module, seed: int = 0, match: str | None = None) -> None:
        super().__init__(name, "random_skip")
        self.net, self.seed, self.match_name = net.eval(), seed, match
        self.rates: torch.Tensor | None = None
        self._table = None
        self._gen = torch.Generator().manual_seed(seed)

    def match(self, executed: torch.Tensor) -> None:
        """Use the per-block execution rates of ``executed [n, N]``."""
        self.rates = executed.float().mean(0).cpu()
        self._gen = torch.Generator().manual_seed(self.seed)

    def run(self, x: torch.Tensor, **point: Any) -> MethodOutput:
        if self.rates is None:
            raise UserError(f"random-skip method {self.name!r} has no rates: set match=<a SkipNet method evaluated "
                            f"before it>")
        if self._table is None:
            self._table = self.net.cost_table(x[:1])
        actions = (torch.rand(len(x), len(self.rates), generator=self._gen) < self.rates).float()
        actions[:, 0] = 1.0
        out = self.net(x, mode="greedy", execution="skip", actions=actions.to(x.device), run_gates=False)
        flops = self._table.per_sample(out.executed.cpu()) - self._table.gate_flops  # no gates run
        return MethodOutput(out.logits, flops, executed=out.executed)


class CascadeMethod(Method):
    def __init__(self, name: str, cascade: IDKCascade, frontier: Sequence[dict[str, Any]] = ()) -> None:
        points = [{"label": "default"}] + [
            {"label": f"eps={p['epsilon']:g}", "thresholds": [float(t) for t in p["thresholds"]]} for p in frontier]
        super().__init__(name, "cascade", points)
        self.cascade = cascade.eval()
        self.num_stages = cascade.num_stages
        self._costs = None

    def run(self, x: torch.Tensor, thresholds: Sequence[float] | None = None, **point: Any) -> MethodOutput:
        if self._costs is None:
            self._costs = self.cascade.stage_costs(x[:1])
        out = self.cascade(x, thresholds)
        return MethodOutput(out.logits, self._costs.per_sample(out.exit_stage.cpu()), exit_stage=out.exit_stage)


# ---------------------------------------------------------------------------------------------- builders
def static_from_run(name: str, run: str | Path) -> StaticMethod:
    """A trained classifier from its training run folder."""
    net, _ = _net_from_run(find_run(run))
    return StaticMethod(name, net)


def skipnet_from_run(name: str, run: str | Path, thresholds: Sequence[float] = ()) -> SkipNetMethod:
    """A trained SkipNet from its run folder; ``thresholds`` adds gate-threshold operating points."""
    net, _ = _net_from_run(find_run(run))
    if not hasattr(net, "cost_table") or not hasattr(net, "num_blocks"):
        raise UserError(f"{str(run)!r} is not a SkipNet run")
    return SkipNetMethod(name, net, thresholds)


def random_skip_from_run(name: str, run: str | Path, match: str, seed: int = 0) -> RandomSkipMethod:
    """Random skipping on a SkipNet run's network, at the execution rates ``match`` (a SkipNet method) shows."""
    net, _ = _net_from_run(find_run(run))
    return RandomSkipMethod(name, net, seed, match)


def cascade_from_run(name: str, run: str | Path, frontier: bool = True) -> CascadeMethod:
    """A calibrated cascade from its ``experiments.cascade`` run folder (``checkpoints/cascade.pt``)."""
    folder = find_run(run)
    cfg, record = _run_config(folder)
    if "cascade" not in cfg:
        raise UserError(f"{str(folder)!r} is not a cascade run (no cascade in its config)")
    node = cfg.cascade
    node.checkpoint = str(folder / "checkpoints" / "cascade.pt")
    cascade = instantiate(node)
    return CascadeMethod(name, cascade, record.get("frontier", []) if frontier else [])
