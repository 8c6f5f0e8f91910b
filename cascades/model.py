"""The IDK cascade: ordered classifier stages with an "I don't know" decider between each pair.

A sample goes to stage 0; where the stage's decider is confident enough (``confidence >= threshold``)
the stage answers, otherwise the sample is deferred to the next stage; the last stage answers every
sample it gets. At inference only the deferred samples of a batch reach the next stage (gathered,
run, scattered back: :func:`gating.execution.run_exits`), so a cheap first stage saves real time.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from gating.cost import StageCosts, stage_flops
from gating.errors import UserError
from gating.execution import run_exits
from gating.idk import IDKDecider, IDKDecision

__all__ = ["CascadeOutput", "Ensemble", "IDKCascade", "StageOutputs", "build_cascade", "load_cascade_state"]


class Ensemble(nn.Module):
    """Several classifiers run on the same input as one stage (Clipper-style model ensemble).

    ``forward`` gives the log of the mean member probability (usable as logits); the cascade gives the
    members' probabilities to its decider, so :class:`gating.idk.AgreementIDK` can count votes.
    """

    def __init__(self, members: Sequence[nn.Module] | Mapping[str, nn.Module]) -> None:
        super().__init__()
        if isinstance(members, Mapping):  # name -> member, as configs give them
            members = list(members.values())
        if len(members) < 2:
            raise UserError("an Ensemble stage needs at least two members")
        self.members = nn.ModuleList(members)
        self.num_classes = getattr(members[0], "num_classes", None)

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[M, B, C]`` logits of every member."""
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_logits(x).softmax(-1).mean(0).clamp_min(1e-12).log()


class StageOutputs(NamedTuple):
    """Every stage run on every sample (for calibration, threshold search and training).

    ``logits``: per stage ``[B, C]`` (temperature-scaled); ``probs``: per stage ``[B, C]`` or
    ``[M, B, C]`` for an ensemble; ``confidence``: per decider ``[B]``.
    """

    logits: list[torch.Tensor]
    probs: list[torch.Tensor]
    confidence: list[torch.Tensor]


class CascadeOutput(NamedTuple):
    """The cascade's answer per sample: ``logits [B, C]``, ``confidence [B]`` (of the stage that
    answered; the last stage's is its max-probability) and ``exit_stage [B]`` (0-based)."""

    logits: torch.Tensor
    confidence: torch.Tensor
    exit_stage: torch.Tensor


class IDKCascade(nn.Module):
    """An IDK cascade over ``K >= 2`` classifier stages.

    Args:
        stages: the classifiers, cheapest first (``nn.Module`` returning logits, or :class:`Ensemble`).
        deciders: ``K - 1`` IDK deciders, one after each stage but the last.
        names: the stages' names, for reports.
        thresholds: ``K - 1`` thresholds (answer where ``confidence >= threshold``); learn them with
            :class:`gating.thresholds.ThresholdSearch`. Default 0.5 (the IDK paper's rule for ``h``).
        temperatures: ``K`` softmax temperatures (temperature scaling before thresholding); default 1.
        name: the cascade's name, for reports (default: the stage names joined by ``-``).
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        deciders: Sequence[IDKDecider],
        names: Sequence[str] | None = None,
        thresholds: Sequence[float] | None = None,
        temperatures: Sequence[float] | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if len(stages) < 2:
            raise UserError(f"a cascade needs at least two stages, got {len(stages)}")
        if len(deciders) != len(stages) - 1:
            raise UserError(f"a cascade of {len(stages)} stages needs {len(stages) - 1} deciders, got {len(deciders)}")
        self.stages = nn.ModuleList(stages)
        self.deciders = nn.ModuleList(deciders)
        self.names = tuple(names) if names is not None else tuple(f"stage{k}" for k in range(len(stages)))
        self.name = name or "-".join(self.names)
        k = len(stages)
        self.register_buffer("thresholds", torch.tensor(list(thresholds) if thresholds is not None else [0.5] * (k - 1),
                                                        dtype=torch.float64))
        self.register_buffer("temperatures", torch.tensor(list(temperatures) if temperatures is not None else [1.0] * k,
                                                          dtype=torch.float32))

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def set_thresholds(self, thresholds: Sequence[float]) -> None:
        if len(thresholds) != self.num_stages - 1:
            raise ValueError(f"expected {self.num_stages - 1} thresholds, got {len(thresholds)}")
        self.thresholds.copy_(torch.tensor(list(thresholds), dtype=torch.float64))

    def set_temperatures(self, temperatures: Sequence[float]) -> None:
        if len(temperatures) != self.num_stages:
            raise ValueError(f"expected {self.num_stages} temperatures, got {len(temperatures)}")
        self.temperatures.copy_(torch.tensor(list(temperatures), dtype=torch.float32))

    # --------------------------------------------------------------------------------- one stage
    def run_stage(self, k: int, x: torch.Tensor, raw: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stage ``k`` on ``x``: ``(logits [B, C], probs [B, C] or [M, B, C], features or None)``.

        Logits are divided by the stage's temperature unless ``raw``.
        """
        model = self.stages[k]
        wants_features = k < len(self.deciders) and self.deciders[k].needs_features
        t = 1.0 if raw else self.temperatures[k]
        features = None
        if isinstance(model, Ensemble):
            probs = (model.member_logits(x) / t).softmax(-1)
            logits = probs.mean(0).clamp_min(1e-12).log()
            return logits, probs, None
        if wants_features:
            f = model.forward_features(x)
            features, logits = model.forward_head(f, pre_logits=True), model.forward_head(f)
        else:
            logits = model(x)
        logits = logits / t
        return logits, logits.softmax(-1), features

    def decide(self, k: int, probs: torch.Tensor, features: torch.Tensor | None = None,
               threshold: float | torch.Tensor | None = None) -> IDKDecision:
        """Stage ``k``'s IDK decision (defer where confidence < threshold)."""
        t = self.thresholds[k] if threshold is None else threshold
        return self.deciders[k](probs, t, features)

    # --------------------------------------------------------------------------------- whole cascade
    def forward_all(self, x: torch.Tensor) -> StageOutputs:
        """Every stage on every sample, without deferral: what calibration and training need."""
        logits, probs, conf = [], [], []
        for k in range(self.num_stages):
            lg, p, f = self.run_stage(k, x)
            logits.append(lg)
            probs.append(p)
            if k < self.num_stages - 1:
                conf.append(self.deciders[k].confidence(p, f))
        return StageOutputs(logits, probs, conf)

    def forward(self, x: torch.Tensor, thresholds: Sequence[float] | torch.Tensor | None = None) -> CascadeOutput:
        """Cascade inference with compaction: each stage runs only on the samples deferred to it."""
        ts = self.thresholds if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float64)
        last = self.num_stages - 1

        def stage_fn(k: int) -> Callable:
            def run(rows: torch.Tensor):
                logits, probs, features = self.run_stage(k, rows)
                if k == last:
                    conf = (probs.mean(0) if probs.ndim == 3 else probs).amax(-1)
                    return (logits, conf), torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device), rows
                decision = self.decide(k, probs, features, ts[k])
                return (logits, decision.confidence.to(logits.dtype)), ~decision.defer, rows
            return run

        (logits, conf), exit_stage = run_exits([stage_fn(k) for k in range(self.num_stages)], x)
        return CascadeOutput(logits, conf, exit_stage)

    # --------------------------------------------------------------------------------- cost
    def stage_costs(self, example_input: torch.Tensor) -> StageCosts:
        """Exact FLOPs per sample of each stage, its IDK decision included (counted at batch 1), and its int8
        operations where a stage is quantized."""
        x = example_input[:1]

        def with_decider(k: int) -> Callable[[torch.Tensor], Any]:
            def run(inp: torch.Tensor) -> Any:
                _, probs, features = self.run_stage(k, inp)
                return self.decide(k, probs, features) if k < self.num_stages - 1 else probs
            return run

        was = self.training
        self.eval()
        try:
            return stage_flops([with_decider(k) for k in range(self.num_stages)], x, self.names, model=self)
        finally:
            self.train(was)


def build_cascade(
    stages: Mapping[str, nn.Module] | Sequence[nn.Module],
    decider: IDKDecider | Callable[[], IDKDecider] | Sequence[IDKDecider],
    thresholds: Sequence[float] | None = None,
    temperatures: Sequence[float] | None = None,
    checkpoint: str | Path | None = None,
    name: str | None = None,
) -> IDKCascade:
    """Build an :class:`IDKCascade` from a config.

    Args:
        stages: name -> stage (in order), or a list of stages.
        decider: one decider (copied for every boundary), a factory called once per boundary (Hydra
            ``_partial_: true``), or one per boundary.
        thresholds, temperatures: as in :class:`IDKCascade`.
        checkpoint: a saved cascade file (``cascade.pt`` from ``experiments.cascade``, or an IDK-head
            training run's ``.ckpt``) whose deciders, thresholds and temperatures are loaded. (The entry
            points turn a run folder given here into its checkpoint file.)
        name: the cascade's name.
    """
    if isinstance(stages, Mapping):
        names, mods = list(stages.keys()), list(stages.values())
    else:
        mods = list(stages)
        names = [getattr(m, "name", None) or f"stage{k}" for k, m in enumerate(mods)]
    n_dec = len(mods) - 1
    if isinstance(decider, IDKDecider):
        deciders = [copy.deepcopy(decider) for _ in range(n_dec)]
    elif isinstance(decider, Sequence):
        deciders = list(decider)
    else:
        deciders = [decider() for _ in range(n_dec)]
    cascade = IDKCascade(mods, deciders, names, thresholds, temperatures, name)
    if checkpoint is not None:
        load_cascade_state(cascade, checkpoint)
    return cascade


def load_cascade_state(cascade: IDKCascade, checkpoint: str | Path) -> IDKCascade:
    """Load deciders, thresholds and temperatures (stages keep their own weights) from a saved cascade file:
    ``cascade.pt`` (keys ``cascade.*``) or an IDK-head training checkpoint (the cascade as ``net.*``)."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise UserError(f"saved cascade {str(path)!r} not found: pass the cascade.pt of an experiments.cascade run, "
                        f"or an IDK-head training run")
    # Tensors and plain values only; a learned head saved before its first call holds lazy parameters.
    with torch.serialization.safe_globals([nn.parameter.UninitializedParameter, nn.parameter.UninitializedBuffer]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    for prefix in ("cascade.", "net."):  # cascade.pt, or an IDKCascadeModule checkpoint (the cascade is its net)
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            break
    keep = {k: v for k, v in state.items() if k.startswith("deciders.") or k in ("thresholds", "temperatures")}
    if not keep:
        raise UserError(f"{str(checkpoint)!r} holds no cascade deciders or thresholds: pass a cascade.pt from "
                        f"experiments.cascade or an IDK-head training run")
    try:
        missing, unexpected = cascade.load_state_dict(keep, strict=False)
        problems = [f"missing {k}" for k in missing if k.startswith("deciders.")]
        problems += [f"unexpected {k}" for k in unexpected]
    except RuntimeError as e:  # shape mismatches (another number of stages, another head width)
        problems = [line.strip() for line in str(e).splitlines()[1:4]]
    if problems:
        raise UserError(f"cascade state in {str(checkpoint)!r} does not fit this cascade ({'; '.join(problems[:4])}): "
                        f"use the same stages and decider as when it was saved")
    return cascade
