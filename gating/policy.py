"""How a gate's logit becomes a decision, for each training stage and for inference.

``decide(logit, mode)`` returns a :class:`GateDecision`:

* ``hard_st`` (supervised pre-training): execute if p > threshold in the forward pass; the backward
  pass uses p (straight-through, SkipNet Eq. 7).
* ``soft`` (the ablation): the gate value is p itself during training.
* ``sample`` (hybrid RL): the action is drawn from Bernoulli(p); its log-probability feeds REINFORCE.
  With ``prob_bound`` b < 1 (BlockDrop's exploration bound) it is drawn from ``b * p + (1 - b) * (1 - p)``,
  which keeps every decision at least ``1 - b`` uncertain in training, so a policy cannot settle on a
  fixed pattern before the reward has been seen for the other.
* ``greedy`` (inference): execute if p > threshold, no gradient.
* ``gumbel`` (ConvNet-AIG, Veit & Belongie ECCV'18): logistic noise (the difference of two Gumbel draws)
  is added to the logit, ``sigmoid((logit + noise) / temperature)`` is thresholded at 0.5 in the forward
  pass and its gradient used in the backward pass (straight-through Gumbel-sigmoid). ``action`` carries
  that gradient, so a loss on the execution rate trains the gates.

``threshold`` above 0.5 makes a model skip more: the knob a server can turn under load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("hard_st", "soft", "sample", "greedy", "gumbel")


@dataclass
class GateDecision:
    """One gate position for a batch.

    Attributes:
        gate: the value that blends block output and shortcut, ``[B]`` float (carries gradient in
            ``hard_st`` and ``soft``).
        action: 1.0 where the block executes, 0.0 where it is skipped, ``[B]``.
        prob: probability of executing, ``[B]``.
        log_prob: log-probability of ``action`` under the policy (``sample`` mode), else None.
    """

    gate: torch.Tensor
    action: torch.Tensor
    prob: torch.Tensor
    log_prob: torch.Tensor | None = None


def threshold_logit(threshold: float) -> float:
    """The logit equivalent of a probability threshold (p > t  <=>  logit > log(t / (1 - t)))."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"gate threshold must be in (0, 1), got {threshold}")
    return math.log(threshold / (1.0 - threshold))


def decide(logit: torch.Tensor, mode: str, threshold: float = 0.5, temperature: float = 1.0,
           prob_bound: float = 1.0) -> GateDecision:
    """Turn gate logits ``[B]`` into a decision (see the module docstring for the modes; ``temperature`` is
    the Gumbel-sigmoid's, ``prob_bound`` the exploration bound of ``sample``)."""
    prob = torch.sigmoid(logit)
    if mode == "gumbel":
        u = torch.rand_like(logit).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid((logit + torch.log(u) - torch.log1p(-u)) / temperature)
        hard = (soft > 0.5).to(logit.dtype)
        st = (hard - soft.detach()) + soft
        return GateDecision(st, st, prob)
    if mode == "greedy":
        action = (logit > threshold_logit(threshold)).to(logit.dtype)
        return GateDecision(action, action, prob)
    if mode == "hard_st":
        hard = (logit > threshold_logit(threshold)).to(logit.dtype)
        # (hard - p_detached) is exact (Sterbenz), so adding p back gives exactly 0 or 1 forward.
        return GateDecision((hard - prob.detach()) + prob, hard, prob)
    if mode == "soft":
        return GateDecision(prob, (prob > threshold).to(logit.dtype), prob)
    if mode == "sample":
        if not 0.5 < prob_bound <= 1.0:
            raise ValueError(f"prob_bound must be in (0.5, 1], got {prob_bound}")
        if prob_bound < 1.0:
            bounded = prob_bound * prob + (1.0 - prob_bound) * (1.0 - prob)
            action = torch.bernoulli(bounded.detach())
            log_prob = torch.where(action > 0.5, bounded.log(), (1.0 - bounded).log())
            return GateDecision(action, action, prob, log_prob)
        action = torch.bernoulli(prob.detach())
        # log Bernoulli(a; p) from logits, stable for large |logit|.
        log_prob = -F.binary_cross_entropy_with_logits(logit, action, reduction="none")
        return GateDecision(action, action, prob, log_prob)
    raise ValueError(f"unknown gate mode {mode!r}; one of {MODES}")


def target_rate_loss(gates: torch.Tensor, target: float, per_layer: bool = True) -> torch.Tensor:
    """ConvNet-AIG's target-rate loss on the execution decisions ``gates`` ``[B, G]`` (0/1 values that carry
    a straight-through gradient): per layer, the mean over gates of ``(mean_b g_i - target)^2``; or globally,
    ``(mean_{b,i} g - target)^2``."""
    if per_layer:
        return ((gates.mean(0) - target) ** 2).mean()
    return (gates.mean() - target) ** 2
