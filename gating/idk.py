"""IDK deciders: whether a cascade stage answers or says "I don't know" and defers to the next stage.

Every decider maps a stage's class probabilities to a per-sample **confidence** (higher means surer);
the stage answers where ``confidence >= threshold`` and defers elsewhere. The threshold is not held by
the decider: it is passed in, so one decider can be swept over thresholds by
:class:`gating.thresholds.ThresholdSearch` and the cascade owns the chosen values.

Probabilities come as ``[B, C]`` for one model or ``[M, B, C]`` for an ensemble of ``M`` members (the
agreement decider needs the members; the others use their mean).

- :class:`MaxProbIDK`: confidence = the largest class probability (the IDK paper's probability rule).
- :class:`EntropyIDK`: confidence = 1 - H(p) / log C, so "defer when the entropy exceeds a" is
  "defer when confidence < 1 - a / log C".
- :class:`AgreementIDK`: confidence = the share of ensemble members voting for the majority class
  (Clipper's "unsure when the models disagree"); threshold 1 defers unless the vote is unanimous.
- :class:`LearnedIDK`: a small network on the sorted probabilities, their entropy and optionally the
  stage's pooled features; confidence = P(answering here is right), trained with the cascade
  objective (see :class:`cascades.IDKCascadeModule`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

__all__ = ["AgreementIDK", "EntropyIDK", "IDKDecider", "IDKDecision", "LearnedIDK", "MaxProbIDK", "mean_probs"]


class IDKDecision(NamedTuple):
    """``defer``: ``[B]`` bool, true where the stage says "I don't know"; ``confidence``: ``[B]`` float."""

    defer: torch.Tensor
    confidence: torch.Tensor


def mean_probs(probs: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` probabilities from ``[B, C]`` or the mean of ``[M, B, C]`` ensemble members."""
    return probs.mean(0) if probs.ndim == 3 else probs


class IDKDecider(nn.Module):
    """Base class: subclasses implement :meth:`confidence`. ``needs_features`` asks the cascade for
    the stage's pooled features as well as its probabilities."""

    needs_features: bool = False

    def confidence(self, probs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, probs: torch.Tensor, threshold: float | torch.Tensor,
                features: torch.Tensor | None = None) -> IDKDecision:
        conf = self.confidence(probs, features)
        return IDKDecision(conf < threshold, conf)


class MaxProbIDK(IDKDecider):
    """Confidence = max_c p_c."""

    def confidence(self, probs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return mean_probs(probs).amax(-1)


class EntropyIDK(IDKDecider):
    """Confidence = 1 - H(p) / log C (1 for a one-hot answer, 0 for the uniform one)."""

    def confidence(self, probs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        p = mean_probs(probs)
        h = -(p * p.clamp_min(1e-12).log()).sum(-1)
        return 1.0 - h / math.log(p.shape[-1])


class AgreementIDK(IDKDecider):
    """Confidence = share of ensemble members whose top class is the majority's (1/M ... 1).

    With one model (``[B, C]``) every sample has confidence 1: agreement needs an ensemble stage
    (:class:`cascades.Ensemble`).
    """

    def confidence(self, probs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        if probs.ndim == 2:
            return probs.new_ones(probs.shape[0])
        votes = probs.argmax(-1)  # [M, B]
        counts = torch.nn.functional.one_hot(votes, probs.shape[-1]).sum(0)  # [B, C]
        return counts.amax(-1).to(probs.dtype) / probs.shape[0]


class LearnedIDK(IDKDecider):
    """A small MLP: [sorted probabilities, normalised entropy, (pooled features)] -> logit of "answer here".

    Args:
        hidden: width of the hidden layer.
        use_features: also read the stage's pooled penultimate features (the input width is inferred
            on the first call, so the head fits any stage).
    """

    def __init__(self, hidden: int = 32, use_features: bool = False) -> None:
        super().__init__()
        self.needs_features = use_features
        self.net = nn.Sequential(nn.LazyLinear(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, 1))

    def logit(self, probs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The logit of P(answering here is right); ``sigmoid`` of it is :meth:`confidence`."""
        p = mean_probs(probs)
        h = -(p * p.clamp_min(1e-12).log()).sum(-1, keepdim=True) / math.log(p.shape[-1])
        parts = [p.sort(-1, descending=True).values, h]
        if self.needs_features:
            if features is None:
                raise ValueError("LearnedIDK(use_features=True) needs the stage's features")
            parts.append(features.flatten(1))
        return self.net(torch.cat(parts, -1)).squeeze(-1)

    def confidence(self, probs: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self.logit(probs, features))
