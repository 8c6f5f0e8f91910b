"""Policy-gradient training of gates: SkipNet's hybrid-RL rewards and the REINFORCE loss.

Per gate ``i`` (deciding block ``i + 1``): reward ``r_i = (1 - a_i) * alpha * c_i`` where ``c_i`` is the
block's cost share (``1/N`` per gate in the paper, or its share of the gated FLOPs), and a terminal
reward ``-beta * CE`` per sample. Returns are undiscounted: ``R_i = sum_{j >= i} r_j - beta * CE``.
The policy-gradient loss is ``-sum_i log pi(a_i) * (R_i - b)`` per sample, with an optional baseline
``b``, reduced over the batch by a mean or a sum.

The reduction is part of a recipe's scale. SkipNet's CIFAR code calls ``action.reinforce(rl_weight * R)``
on each gate's stochastic op, whose backward *sums* over the batch, while its cross-entropy is a batch
*mean*; its ImageNet code takes ``.mean()`` of the same product. At batch 128, ``rl_weight = 0.01`` under
a sum weighs as much as ``1.28`` under a mean.
"""

from __future__ import annotations

import torch

REDUCTIONS = ("mean", "sum")
COST_SHARES = ("uniform", "flops")


def cost_shares(kind: str, saved_flops: torch.Tensor) -> torch.Tensor:
    """Each gate's cost share ``c_i`` (sums to 1): ``"uniform"`` (``1/G``, the paper) or ``"flops"`` (the FLOPs
    skipping its block saves, ``saved_flops`` ``[G]``, as a share of all of them)."""
    if kind not in COST_SHARES:
        raise ValueError(f"reward cost must be one of {COST_SHARES}, got {kind!r}")
    saved = torch.as_tensor(saved_flops, dtype=torch.float32)
    if kind == "uniform":
        return torch.full_like(saved, 1.0 / saved.numel())
    return saved / saved.sum()


def episode_reward(actions: torch.Tensor, ce: torch.Tensor, alpha: float, beta: float,
                   costs: torch.Tensor) -> torch.Tensor:
    """Each input's whole reward (the return at the first gate): ``alpha * sum_i (1 - a_i) c_i - beta * CE``,
    for ``actions`` ``[B, G]``, per-sample cross-entropy ``ce`` ``[B]`` and cost shares ``[G]``."""
    return skip_rewards(actions, alpha, costs).sum(1) - beta * ce


def skip_rewards(actions: torch.Tensor, alpha: float, costs: torch.Tensor) -> torch.Tensor:
    """Per-gate rewards ``(1 - a_i) * alpha * c_i`` for ``actions`` ``[B, G]`` and cost shares ``[G]``."""
    return (1.0 - actions) * alpha * costs.to(actions)


def returns_to_go(rewards: torch.Tensor, terminal: torch.Tensor) -> torch.Tensor:
    """Undiscounted returns ``R_i = sum_{j >= i} r_j + terminal`` for rewards ``[B, G]``, terminal ``[B]``."""
    return rewards.flip(1).cumsum(1).flip(1) + terminal.unsqueeze(1)


def policy_gradient_loss(log_probs: torch.Tensor, returns: torch.Tensor, baseline: torch.Tensor | float = 0.0,
                         entropy: torch.Tensor | None = None, entropy_weight: float = 0.0,
                         reduction: str = "mean", normalize: bool = False) -> torch.Tensor:
    """REINFORCE: ``-sum_i log pi(a_i) * (R_i - baseline)`` per sample, minus an optional entropy bonus,
    then the batch ``mean`` (SkipNet's ImageNet code) or ``sum`` (its CIFAR code's ``.reinforce``).

    ``baseline`` may be a number, one value per gate ``[G]`` (a moving average) or one per sample and gate
    ``[B, G]`` (self-critical: the greedy policy's own returns on the same input). ``normalize`` scales the
    advantages of the batch to zero mean and unit variance (reward normalisation)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    advantage = (returns - baseline).detach()
    if normalize:
        advantage = (advantage - advantage.mean()) / (advantage.std(unbiased=False) + 1e-6)
    per_sample = -(log_probs * advantage).sum(1)
    if entropy is not None and entropy_weight:
        per_sample = per_sample - entropy_weight * entropy.sum(1)
    return per_sample.mean() if reduction == "mean" else per_sample.sum()


def bernoulli_entropy(prob: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    p = prob.clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def update_baseline(baseline: torch.Tensor, returns: torch.Tensor, momentum: float) -> torch.Tensor:
    """Moving-average baseline per gate position: ``m * b + (1 - m) * mean_batch(R)``; returns the new value."""
    return momentum * baseline + (1.0 - momentum) * returns.detach().mean(0)


def budget_penalty(share: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """The budget form of the cost reward, per sample ``[B]``: ``-weight * (share_i - target)`` for every
    sample when the batch's mean computation share exceeds ``target``, else 0.

    ``share`` is each input's executed share of the gated cost (0..1). Over budget, an input cheaper than
    the target earns credit and a dearer one pays, so cheap inputs can pay for expensive ones; within
    budget only accuracy counts."""
    over = (share.mean() > target).to(share.dtype)
    return -weight * (share - target) * over


def correctness_reward(correct: torch.Tensor, share: torch.Tensor, wrong_penalty: float) -> torch.Tensor:
    """BlockDrop's reward per sample ``[B]`` (Wu et al., CVPR'18): ``1 - share**2`` for a right answer,
    ``-wrong_penalty`` for a wrong one, where ``share`` is the input's executed share of the gated cost.

    Cost counts only when the answer is right, so a block is worth buying exactly where it turns a wrong
    answer into a right one: easy inputs are pushed to the cheapest pattern that still answers them."""
    return torch.where(correct.bool(), 1.0 - share ** 2, torch.full_like(share, -wrong_penalty))
