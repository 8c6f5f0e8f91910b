"""The Lightning system for SkipNet's training stages: supervised pre-training (SP) and hybrid RL."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from experiments.systems.classifier import ClassifierModule
from gating.cost import CostTable
from gating.reinforce import (
    REDUCTIONS,
    bernoulli_entropy,
    cost_shares,
    policy_gradient_loss,
    returns_to_go,
    skip_rewards,
    update_baseline,
)
from skipnet.models import SkipOutput, SkipResNet

STAGES = ("sp", "rl", "finetune")
BATCHNORM_MODES = ("train", "eval")


class SkipNetModule(ClassifierModule):
    """Trains a :class:`SkipResNet`; validates and tests it with real skipping and exact per-image cost.

    Args:
        net: the gated network.
        stage: ``"sp"`` (supervised pre-training: cross-entropy through straight-through hard gates, or
            soft gates with ``sp_gate="soft"``), ``"rl"`` (hybrid RL: sampled gates, REINFORCE with
            the computation reward, plus cross-entropy), or ``"finetune"`` (an optional stage after RL,
            not in the paper: gates frozen and greedy, the backbone trained by cross-entropy on the
            network exactly as it executes at inference).
        sp_gate: ``"hard"`` (straight-through) or ``"soft"`` (the ablation).
        train_execution: ``"masked"`` (SkipNet's code) or ``"skip"`` (RL and fine-tune only: skipped rows
            are not computed, which is exact for sampled actions and faster; needs
            ``rl_batchnorm="eval"``).
        rl_batchnorm: the backbone's BatchNorm in the RL and fine-tune stages: ``"train"`` (batch
            statistics, as SkipNet's code; with masked execution every block's statistics come from the
            whole batch) or ``"eval"`` (running statistics from the stage before, frozen). Only
            ``"eval"`` makes a block run on a gathered sub-batch compute what masked execution computes
            for those rows, so ``train_execution="skip"`` requires it.
        alpha: reward for skipping, per unit of cost share (SkipNet: 0.1 on CIFAR).
        beta: weight of the terminal reward ``-beta * CE`` (SkipNet: 1 on CIFAR/SVHN).
        rl_weight: weight of the policy-gradient term (SkipNet: 0.01).
        pg_reduction: ``"mean"`` or ``"sum"`` of the policy-gradient term over the batch (the
            cross-entropy is always a mean). SkipNet's CIFAR code sums (``.reinforce``), its ImageNet
            code averages; see :mod:`gating.reinforce`.
        gate_temperature: divide the gates' output layer by it once, when the module is built (after the
            stage's starting weights are loaded): SkipNet's ImageNet ``hotter(0.05)`` at the start of RL.
            A resumed run's checkpoint replaces the sharpened weights, so it is not applied twice.
        gate_lr: the gates' own learning rate (a second parameter group); None: the optimizer's.
        reward_cost: ``"uniform"`` (each gate's share is 1/N, as in the paper) or ``"flops"`` (its share
            of the gated blocks' measured FLOPs).
        baseline: subtract a moving-average baseline per gate (off in the paper).
        baseline_momentum: its momentum.
        entropy_weight: entropy bonus weight (0 in the paper).
        **kwargs: see :class:`experiments.systems.ClassifierModule`.

    Logged (all with units): ``{val,test}/acc``, ``{val,test}/gflops_per_img`` (exact, gates
    included), ``{val,test}/computation_pct`` (SkipNet's figure), ``test/blocks_per_img``,
    ``test/gate_gflops_per_img``, ``test/exec_rate/block_XX``; ``train/reward``, ``train/pg_loss``.
    After testing, :attr:`test_report` holds execution rates and the skip-pattern histogram.
    """

    def __init__(
        self,
        net: SkipResNet,
        optimizer,
        scheduler=None,
        stage: str = "sp",
        sp_gate: str = "hard",
        train_execution: str = "masked",
        alpha: float = 0.1,
        beta: float = 1.0,
        rl_weight: float = 0.01,
        pg_reduction: str = "mean",
        rl_batchnorm: str = "train",
        gate_temperature: float = 1.0,
        gate_lr: float | None = None,
        reward_cost: str = "uniform",
        baseline: bool = False,
        baseline_momentum: float = 0.9,
        entropy_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(net, optimizer, scheduler, **kwargs)
        if sp_gate not in ("hard", "soft"):
            raise ValueError(f"sp_gate must be 'hard' or 'soft', got {sp_gate!r}")
        if reward_cost not in ("uniform", "flops"):
            raise ValueError(f"reward_cost must be 'uniform' or 'flops', got {reward_cost!r}")
        _check_choices(train_execution, rl_batchnorm, pg_reduction, stage)
        if gate_lr is not None and not gate_lr > 0:
            raise ValueError(f"gate_lr must be a positive learning rate or null, got {gate_lr!r}")
        if gate_temperature != 1.0:
            net.gate.sharpen(gate_temperature)
        if stage == "finetune":
            net.gate.requires_grad_(False)
        self.register_buffer("baseline_value", torch.zeros(net.num_gates))
        self.val_gflops, self.test_gflops = MeanMetric(), MeanMetric()
        self.val_comp, self.test_comp = MeanMetric(), MeanMetric()
        self._table: CostTable | None = None
        self._test_exec_sum: torch.Tensor | None = None
        self._test_count = 0
        self._patterns: Counter[str] = Counter()
        self.test_report: dict[str, Any] = {}
        self.test_inputs: list[dict[str, Any]] = []

    def train(self, mode: bool = True) -> "SkipNetModule":
        """Training mode, with the backbone's BatchNorm in eval mode where ``rl_batchnorm="eval"``."""
        super().train(mode)
        if mode:
            self._apply_batchnorm_mode()
        return self

    def on_train_epoch_start(self) -> None:
        # Lightning does not call train() when fitting starts (modules are built in training mode) and
        # restores each submodule's own mode after validation, so the mode is set here, every epoch.
        self._apply_batchnorm_mode()

    def _apply_batchnorm_mode(self) -> None:
        if self.hparams.get("stage") != "sp" and self.hparams.get("rl_batchnorm") == "eval":
            self.net.batchnorm_eval()

    def param_groups(self) -> Any:
        """One group, or with ``gate_lr`` two: the gates at their own learning rate, and the rest."""
        if self.hparams.gate_lr is None:
            return super().param_groups()
        gate = list(self.net.gate.parameters())
        ids = {id(p) for p in gate}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [{"params": rest}, {"params": gate, "lr": self.hparams.gate_lr}]

    # ------------------------------------------------------------------------------------------ costs
    def cost_table(self, x: torch.Tensor) -> CostTable:
        """The network's cost table, measured once at this input shape."""
        if self._table is None or self._table.input_shape != tuple(x.shape[1:]):
            self._table = self.net.cost_table(x[:1])
        return self._table

    def gate_costs(self, x: torch.Tensor) -> torch.Tensor:
        """Each gate's cost share (sums to 1): uniform, or the FLOPs its block saves when skipped."""
        if self.hparams.reward_cost == "uniform":
            return cost_shares("uniform", torch.ones(self.net.num_gates)).to(x.device)
        return cost_shares("flops", self.net.saved_flops(self.cost_table(x))).to(x.device)

    # --------------------------------------------------------------------------------------- training
    def forward(self, x: torch.Tensor) -> SkipOutput:
        return self.net(self._prepare(x))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        x = self._prepare(x)
        hp = self.hparams
        if hp.stage == "sp":
            out = self.net(x, mode="hard_st" if hp.sp_gate == "hard" else "soft", execution="masked")
            loss = self.criterion(out.logits, y)
        elif hp.stage == "finetune":
            out = self.net(x, mode="greedy", execution=hp.train_execution)
            loss = self.criterion(out.logits, y)
        else:
            out = self.net(x, mode="sample", execution=hp.train_execution)
            ce = F.cross_entropy(out.logits, y, reduction="none")
            rewards = skip_rewards(out.executed[:, 1:], hp.alpha, self.gate_costs(x))
            returns = returns_to_go(rewards, -hp.beta * ce.detach())
            base = self.baseline_value if hp.baseline else 0.0
            entropy = bernoulli_entropy(out.probs) if hp.entropy_weight else None
            pg = policy_gradient_loss(out.log_probs, returns, base, entropy, hp.entropy_weight, hp.pg_reduction)
            if hp.baseline:
                self.baseline_value.copy_(update_baseline(self.baseline_value, returns, hp.baseline_momentum))
            loss = ce.mean() + hp.rl_weight * pg
            self.log("train/pg_loss", pg, on_step=False, on_epoch=True)
            self.log("train/reward", returns[:, 0].mean(), on_step=False, on_epoch=True)
        self.train_loss(loss)
        self.train_acc(out.logits.argmax(1), y)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/computation_pct", 100.0 * out.executed.float().mean(), on_step=False, on_epoch=True,
                 prog_bar=True)
        return loss

    # ------------------------------------------------------------------------------------- evaluation
    def _eval_step(self, batch) -> tuple[SkipOutput, torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        x = self._prepare(x)
        out = self.net(x, mode="greedy", execution="skip")
        table = self.cost_table(x)
        flops = table.per_sample(out.executed)
        return out, y, flops, table.computation_percentage(out.executed)

    def _log_eval(self, stage: str, out: SkipOutput, y: torch.Tensor, flops: torch.Tensor, comp: torch.Tensor) -> None:
        loss, acc, gflops, comp_pct = {
            "val": (self.val_loss, self.val_acc, self.val_gflops, self.val_comp),
            "test": (self.test_loss, self.test_acc, self.test_gflops, self.test_comp),
        }[stage]
        loss(self.criterion(out.logits, y))
        acc(out.logits.argmax(1), y)
        gflops(flops / 1e9)
        comp_pct(comp)
        for name, metric in (("loss", loss), ("acc", acc), ("gflops_per_img", gflops), ("computation_pct", comp_pct)):
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._log_eval("val", *self._eval_step(batch))

    def on_test_epoch_start(self) -> None:
        self._test_exec_sum, self._test_count, self._patterns = None, 0, Counter()
        self.test_inputs = []

    def test_step(self, batch, batch_idx: int) -> None:
        out, y, flops, comp = self._eval_step(batch)
        self._log_eval("test", out, y, flops, comp)
        executed = out.executed.detach().cpu()
        s = executed.sum(0)
        patterns = ["".join("1" if v else "0" for v in row) for row in executed.bool().tolist()]
        correct = (out.logits.argmax(1) == batch[1]).cpu().tolist()
        # Per input, in the test loader's order (one process): what experiments.train scores adaptivity from.
        self.test_inputs.extend({"method": self.hparams.get("name") or "skipnet", "index": self._test_count + i,
                                 "flops": float(f), "correct": int(c), "pattern": p}
                                for i, (f, c, p) in enumerate(zip(flops.cpu().tolist(), correct, patterns)))
        self._test_exec_sum = s if self._test_exec_sum is None else self._test_exec_sum + s
        self._test_count += executed.shape[0]
        self._patterns.update(patterns)

    def on_test_epoch_end(self) -> None:
        if not self._test_count:
            return
        rates = self._test_exec_sum / self._test_count
        for i, r in enumerate(rates.tolist()):
            self.log(f"test/exec_rate/block_{i:02d}", r)
        table = self._table
        self.log("test/blocks_per_img", float(rates.sum()))
        self.log("test/gate_gflops_per_img", table.gate_flops / 1e9)
        self.log("test/full_gflops_per_img", table.full_flops / 1e9)
        self.test_report = {
            "num_samples": self._test_count,
            "block_names": list(table.block_names),
            "exec_rate_per_block": rates.tolist(),
            "full_gflops_per_img": table.full_flops / 1e9,
            "gate_gflops_per_img": table.gate_flops / 1e9,
            "skip_patterns": [{"pattern": p, "count": c} for p, c in self._patterns.most_common(20)],
            "distinct_patterns": len(self._patterns),
        }


def _check_choices(train_execution: str, rl_batchnorm: str, pg_reduction: str, stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if train_execution not in ("masked", "skip"):
        raise ValueError(f"train_execution must be 'masked' or 'skip', got {train_execution!r}")
    if rl_batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"rl_batchnorm must be one of {BATCHNORM_MODES}, got {rl_batchnorm!r}")
    if pg_reduction not in REDUCTIONS:
        raise ValueError(f"pg_reduction must be one of {REDUCTIONS}, got {pg_reduction!r}")
    if train_execution == "skip" and stage == "sp":
        raise ValueError("supervised pre-training needs train_execution='masked' (straight-through gradients)")
    if train_execution == "skip" and rl_batchnorm != "eval":
        raise ValueError("train_execution='skip' runs each block on a sub-batch, where batch statistics differ from "
                         "masked execution's: set rl_batchnorm='eval' (running statistics) or train_execution='masked'")
