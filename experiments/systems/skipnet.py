"""The Lightning system for SkipNet's training stages: supervised pre-training (SP) and hybrid RL."""

from __future__ import annotations

import math
from collections import Counter
from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from experiments.systems.classifier import ClassifierModule
from gating.adapters import price_points
from gating.cost import CostTable
from gating.policy import target_rate_loss
from gating.reinforce import (
    REDUCTIONS,
    bernoulli_entropy,
    budget_penalty,
    correctness_reward,
    cost_shares,
    policy_gradient_loss,
    returns_to_go,
    skip_rewards,
    update_baseline,
)
from gating.thresholds import gate_threshold_for_budget
from skipnet.adapters import SkipNetAdapter
from skipnet.models import SkipOutput, SkipResNet

STAGES = ("sp", "rl", "finetune", "gumbel")
BATCHNORM_MODES = ("train", "eval")
BASELINES = ("none", "moving", "self_critical")
REWARDS = ("skip", "budget", "correct")
THRESHOLD_GRID = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 ... 0.95


class SkipNetModule(ClassifierModule):
    """Trains a :class:`SkipResNet`; validates and tests it with real skipping and exact per-image cost.

    Args:
        net: the gated network.
        stage: ``"sp"`` (supervised pre-training: cross-entropy through straight-through hard gates, or
            soft gates with ``sp_gate="soft"``), ``"rl"`` (hybrid RL: sampled gates, REINFORCE with
            the computation reward, plus cross-entropy), ``"finetune"`` (an optional stage after RL,
            not in the paper: gates frozen and greedy, the backbone trained by cross-entropy on the
            network exactly as it executes at inference), or ``"gumbel"`` (ConvNet-AIG's purely
            supervised route, below).
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
        backbone_lr: the backbone's learning rate in the RL stage; None: the optimizer's. 0 freezes it
            (no gradient, running BatchNorm statistics): the gates then learn against a fixed network,
            whose per-input value of each block does not move under them (BlockDrop trains its policy
            so before the joint stage).
        drop_rate: stochastic depth in the ``sp`` and ``gumbel`` stages (Huang et al., ECCV'16): each
            sample skips each gated block with this probability, whatever its gate says, so the backbone
            learns to work with any subset of its blocks (the robustness to dropped blocks that BlockDrop
            relies on); 0 is SkipNet's SP. In the ``rl`` stage, the rate of ``depth_weight``'s term.
        depth_weight: ``rl`` stage: add ``depth_weight`` times the cross-entropy of the network run with
            random blocks (stochastic depth at ``drop_rate``, gates not consulted) to the hybrid-RL loss.
            Hybrid RL trains the backbone only through the paths the policy takes, and the blocks it leaves
            out stop composing with them (after it, running every block is 2-4 points worse than the policy
            on every severity: docs/adaptivity.md); this keeps every depth useful, so that more blocks can
            still buy accuracy on hard inputs. 0 (the paper): off.
        reward_cost: ``"uniform"`` (each gate's share is 1/N, as in the paper) or ``"flops"`` (its share
            of the gated blocks' measured FLOPs).
        baseline: ``"none"`` (the paper), ``"moving"`` (a moving average per gate; ``true`` means this)
            or ``"self_critical"`` (per input, the greedy policy's own returns on it, as BlockDrop).
        baseline_momentum: the moving average's momentum.
        entropy_weight: entropy bonus weight (0 in the paper).
        normalize_advantage: scale each batch's advantages to zero mean and unit variance.
        curriculum_epochs: over the first this many epochs, the gates open to learning block by block
            from the last (BlockDrop's curriculum): earlier blocks execute; 0 switches it off.
        reward: ``"skip"`` (the paper: ``alpha`` times the cost share of every skipped block) or
            ``"budget"`` (no per-skip reward; when a batch's mean executed share exceeds ``budget``, every
            input pays ``budget_weight * (its share - budget)``: cheap inputs earn what dear ones spend).
            Or ``"correct"`` (BlockDrop, Wu et al. CVPR'18): per input ``1 - share**2`` when the answer is
            right and ``-wrong_penalty`` when it is wrong, no per-skip reward: an input gains nothing from a
            block that does not change its answer, so blocks are bought only where they make it right.
        budget, budget_weight: the budget form's target share of the gated cost and its weight.
        wrong_penalty: ``reward="correct"``: the reward of a wrong answer is ``-wrong_penalty``.
        prob_bound: BlockDrop's exploration bound on the sampled gates in RL (``b * p + (1 - b) * (1 - p)``);
            1 samples from the gates' own probabilities (the paper).
        gumbel_temperature, target_rate, target_rate_weight, target_rate_per_layer: ``stage="gumbel"``
            (ConvNet-AIG): straight-through Gumbel-sigmoid gates trained by cross-entropy plus
            ``target_rate_weight`` times the target-rate loss (per layer or global), masked execution.
        operating_cost_pct: set, the gate threshold is chosen on the val split before testing: of
            ``operating_thresholds``, the one that runs the most computation within this percentage of the
            full network's GFLOPs per image (:func:`gating.thresholds.gate_threshold_for_budget`). The test
            runs at it and the run record keeps it (``operating_point``), where every later loader of the
            run finds it. None: the network's own threshold.
        operating_thresholds: the candidate thresholds, each measured by one pass over the val split (None:
            0.05 ... 0.95 in steps of 0.05).
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
        backbone_lr: float | None = None,
        drop_rate: float = 0.0,
        drop_per_sample: bool = False, depth_weight: float = 0.0,
        reward_cost: str = "uniform",
        baseline: bool | str = False,
        baseline_momentum: float = 0.9,
        entropy_weight: float = 0.0,
        normalize_advantage: bool = False,
        curriculum_epochs: int = 0,
        reward: str = "skip",
        budget: float = 0.5,
        budget_weight: float = 1.0,
        wrong_penalty: float = 1.0,
        prob_bound: float = 1.0,
        gumbel_temperature: float = 1.0,
        target_rate: float = 0.5,
        target_rate_weight: float = 1.0,
        target_rate_per_layer: bool = True,
        operating_cost_pct: float | None = None,
        operating_thresholds: tuple[float, ...] | list[float] | None = None,
        **kwargs: Any,
    ) -> None:
        # Plain floats, not a config's list: the saved hparams must load with torch.load(weights_only=True).
        operating_thresholds = tuple(float(t) for t in (operating_thresholds or THRESHOLD_GRID))
        super().__init__(net, optimizer, scheduler, **kwargs)
        _check_choices(train_execution, rl_batchnorm, pg_reduction, stage, sp_gate, reward_cost)
        self.baseline_mode = _baseline_mode(baseline)
        _check_reward_options(reward, budget, target_rate, gate_lr)
        _check_stage_options(stage, backbone_lr, drop_rate, prob_bound, wrong_penalty, depth_weight)
        _check_operating_options(operating_cost_pct, operating_thresholds)
        if gate_temperature != 1.0:
            net.gate.sharpen(gate_temperature)
        if stage == "finetune":
            net.gate.requires_grad_(False)
        if backbone_lr == 0:
            net.backbone.requires_grad_(False)
        self.register_buffer("baseline_value", torch.zeros(net.num_gates))
        self.val_gflops, self.test_gflops, self.val_comp, self.test_comp = (MeanMetric() for _ in range(4))
        self._table: CostTable | None = None
        self._test_exec_sum: torch.Tensor | None = None
        self._test_count = 0
        self._patterns: Counter[str] = Counter()
        self.test_report: dict[str, Any] = {}
        self.test_inputs: list[dict[str, Any]] = []
        self.operating_point: dict[str, Any] = {}

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
        hp = self.hparams
        if (hp.get("stage") != "sp" and hp.get("rl_batchnorm") == "eval") or hp.get("backbone_lr") == 0:
            self.net.batchnorm_eval()

    def param_groups(self) -> Any:
        """The trainable parameters, in up to two groups: the gates (at ``gate_lr`` if set) and the rest (at
        ``backbone_lr`` if set; left out when frozen)."""
        hp = self.hparams
        if hp.gate_lr is None and hp.get("backbone_lr") is None:
            return super().param_groups()
        gate = [p for p in self.net.gate.parameters() if p.requires_grad]
        ids = {id(p) for p in self.net.gate.parameters()}
        rest = [p for p in self.parameters() if id(p) not in ids and p.requires_grad]
        groups = [{"params": rest} | ({"lr": hp.backbone_lr} if hp.get("backbone_lr") else {})] if rest else []
        return groups + [{"params": gate} | ({"lr": hp.gate_lr} if hp.gate_lr is not None else {})]

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
            out = self.net(x, mode="hard_st" if hp.sp_gate == "hard" else "soft", execution="masked",
                           drop_rate=self._drop_rates(x))
            loss = self.criterion(out.logits, y)
        elif hp.stage == "finetune":
            out = self.net(x, mode="greedy", execution=hp.train_execution)
            loss = self.criterion(out.logits, y)
        elif hp.stage == "gumbel":
            out = self.net(x, mode="gumbel", execution="masked", temperature=hp.gumbel_temperature,
                           drop_rate=self._drop_rates(x))
            rate = target_rate_loss(out.executed[:, 1:], hp.target_rate, hp.target_rate_per_layer)
            loss = self.criterion(out.logits, y) + hp.target_rate_weight * rate
            self.log("train/rate_loss", rate, on_step=False, on_epoch=True)
        else:
            out, loss = self._hybrid_rl_step(x, y)
        self.train_loss(loss)
        self.train_acc(out.logits.argmax(1), y)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/computation_pct", 100.0 * out.executed.detach().float().mean(), on_step=False,
                 on_epoch=True, prog_bar=True)
        return loss

    def _drop_rates(self, x: torch.Tensor) -> torch.Tensor | float:
        """Each sample's stochastic-depth rate: ``drop_rate`` for all, or with ``drop_per_sample`` one drawn
        uniformly from [0, drop_rate] per sample."""
        hp = self.hparams
        if not hp.drop_rate or not hp.get("drop_per_sample"):
            return hp.drop_rate
        return torch.rand(x.shape[0], device=x.device) * hp.drop_rate

    # ------------------------------------------------------------------------------------- hybrid RL
    def curriculum_open_first(self) -> int:
        """How many leading gated blocks the curriculum keeps executing at the current epoch."""
        c, g = self.hparams.curriculum_epochs, self.net.num_gates
        if not c or self.current_epoch >= c:
            return 0
        return g - math.ceil(g * (self.current_epoch + 1) / c)

    def returns(self, executed: torch.Tensor, ce: torch.Tensor, x: torch.Tensor,
                correct: torch.Tensor | None = None) -> torch.Tensor:
        """Per-gate returns ``[B, G]`` of decisions ``executed`` ``[B, N]`` under the configured reward
        (``correct`` ``[B]``: whether each answer is right, for ``reward="correct"``)."""
        hp = self.hparams
        costs = self.gate_costs(x)
        acts = executed[:, 1:].detach()
        if hp.reward == "correct":
            share = (acts * costs).sum(1)
            return returns_to_go(torch.zeros_like(acts), correctness_reward(correct, share, hp.wrong_penalty))
        if hp.reward == "budget":
            share = (acts * costs).sum(1)
            return returns_to_go(torch.zeros_like(acts), -hp.beta * ce + budget_penalty(share, hp.budget,
                                                                                          hp.budget_weight))
        return returns_to_go(skip_rewards(acts, hp.alpha, costs), -hp.beta * ce)

    def _baseline(self, x: torch.Tensor, y: torch.Tensor, open_first: int) -> torch.Tensor | float:
        if self.baseline_mode == "moving":
            return self.baseline_value
        if self.baseline_mode == "self_critical":  # the greedy policy on the same inputs, as inference runs it
            with torch.no_grad(), _modes_kept(self.net):
                self.net.eval()
                g = self.net(x, mode="greedy", execution="skip", open_first=open_first)
            return self.returns(g.executed, F.cross_entropy(g.logits, y, reduction="none"), x, g.logits.argmax(1) == y)
        return 0.0

    def _hybrid_rl_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[SkipOutput, torch.Tensor]:
        hp = self.hparams
        open_first = self.curriculum_open_first()
        out = self.net(x, mode="sample", execution=hp.train_execution, open_first=open_first,
                       prob_bound=hp.prob_bound)
        ce = F.cross_entropy(out.logits, y, reduction="none")
        returns = self.returns(out.executed, ce.detach(), x, out.logits.detach().argmax(1) == y)
        base = self._baseline(x, y, open_first)
        entropy = bernoulli_entropy(out.probs) if hp.entropy_weight else None
        pg = policy_gradient_loss(out.log_probs, returns, base, entropy, hp.entropy_weight, hp.pg_reduction,
                                  hp.normalize_advantage)
        if self.baseline_mode == "moving":
            self.baseline_value.copy_(update_baseline(self.baseline_value, returns, hp.baseline_momentum))
        self.log("train/pg_loss", pg, on_step=False, on_epoch=True)
        self.log("train/reward", returns[:, 0].mean(), on_step=False, on_epoch=True)
        self.log("train/open_first", float(open_first), on_step=False, on_epoch=True)
        loss = ce.mean() + hp.rl_weight * pg
        if hp.get("depth_weight"):  # random depths too, so that blocks off the policy's paths stay useful
            every = torch.ones_like(out.executed)
            deep = self.net(x, mode="greedy", execution="masked", actions=every, run_gates=False,
                            drop_rate=self._drop_rates(x))
            depth_ce = F.cross_entropy(deep.logits, y)
            self.log("train/depth_ce", depth_ce, on_step=False, on_epoch=True)
            loss = loss + hp.depth_weight * depth_ce
        return out, loss

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

    def on_test_start(self) -> None:
        if self.hparams.operating_cost_pct is not None:
            datamodule = getattr(self.trainer, "datamodule", None)
            if datamodule is None:
                raise ValueError("operating_cost_pct chooses the gate threshold on the val split: test with a "
                                 "datamodule, or set operating_cost_pct to null")
            self.calibrate_operating_point(datamodule.val_dataloader())

    @torch.no_grad()
    def calibrate_operating_point(self, loader) -> dict[str, Any]:
        """Choose the gate threshold on ``loader`` (the val split) for ``operating_cost_pct`` and set it on the
        network; returns (and keeps in :attr:`operating_point`) what was measured and chosen. Each candidate
        is priced as the evaluator and the server price an operating point (:func:`gating.adapters.price_points`)."""
        hp = self.hparams
        batches = list(loader)
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        with _modes_kept(self.net):
            adapter = SkipNetAdapter(self.net, hp.operating_thresholds)
            points = [p for p in price_points(adapter, x, y) if p.settings["threshold"] in hp.operating_thresholds]
            full = adapter.cost_table(x[:1].to(adapter.device)).full_flops / 1e9
        measured = [(p.settings["threshold"], p.val_gflops_per_img, p.val_acc) for p in points]
        point = gate_threshold_for_budget(measured, hp.operating_cost_pct / 100.0 * full)
        self.net.threshold = point.threshold
        self.operating_point = {
            "threshold": point.threshold, "cost_pct": float(hp.operating_cost_pct), "within_budget": point.within_budget,
            "val/gflops_per_img": point.cost, "val/acc": point.accuracy, "full_gflops_per_img": full,
            "candidates": [{"threshold": t, "val/gflops_per_img": c, "val/acc": a} for t, c, a in measured],
        }
        return self.operating_point

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


def _check_choices(train_execution: str, rl_batchnorm: str, pg_reduction: str, stage: str, sp_gate: str = "hard",
                   reward_cost: str = "uniform") -> None:
    if sp_gate not in ("hard", "soft"):
        raise ValueError(f"sp_gate must be 'hard' or 'soft', got {sp_gate!r}")
    if reward_cost not in ("uniform", "flops"):
        raise ValueError(f"reward_cost must be 'uniform' or 'flops', got {reward_cost!r}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if train_execution not in ("masked", "skip"):
        raise ValueError(f"train_execution must be 'masked' or 'skip', got {train_execution!r}")
    if rl_batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"rl_batchnorm must be one of {BATCHNORM_MODES}, got {rl_batchnorm!r}")
    if pg_reduction not in REDUCTIONS:
        raise ValueError(f"pg_reduction must be one of {REDUCTIONS}, got {pg_reduction!r}")
    if train_execution == "skip" and stage in ("sp", "gumbel"):
        raise ValueError(f"stage {stage!r} needs train_execution='masked' (straight-through gradients)")
    if train_execution == "skip" and rl_batchnorm != "eval":
        raise ValueError("train_execution='skip' runs each block on a sub-batch, where batch statistics differ from "
                         "masked execution's: set rl_batchnorm='eval' (running statistics) or train_execution='masked'")


def _check_stage_options(stage: str, backbone_lr: float | None, drop_rate: float, prob_bound: float,
                         wrong_penalty: float, depth_weight: float = 0.0) -> None:
    if backbone_lr is not None and (not backbone_lr >= 0 or stage != "rl"):
        raise ValueError(f"backbone_lr must be >= 0 (0 freezes the backbone) or null, and is for stage 'rl' "
                         f"only; got {backbone_lr!r} with stage {stage!r}")
    if not 0.5 < prob_bound <= 1.0 or not wrong_penalty >= 0.0:
        raise ValueError(f"prob_bound must be in (0.5, 1] (got {prob_bound}) and wrong_penalty >= 0 "
                         f"(got {wrong_penalty})")
    if not depth_weight >= 0.0 or (depth_weight and (stage != "rl" or not drop_rate)):
        raise ValueError(f"depth_weight must be >= 0, and is for stage 'rl' with a drop_rate > 0 (the random depths' "
                         f"rate); got {depth_weight!r} with stage {stage!r} and drop_rate {drop_rate!r}")
    depth_stages = ("sp", "gumbel", "rl") if depth_weight else ("sp", "gumbel")
    if not 0.0 <= drop_rate < 1.0 or (drop_rate and stage not in depth_stages):
        raise ValueError(f"drop_rate must be in [0, 1) and is for stages 'sp' and 'gumbel' (stochastic depth), or "
                         f"'rl' with depth_weight > 0; got {drop_rate!r} with stage {stage!r}")


def _check_reward_options(reward: str, budget: float, target_rate: float, gate_lr: float | None) -> None:
    if reward not in REWARDS or not 0.0 < budget <= 1.0 or not 0.0 <= target_rate <= 1.0:
        raise ValueError(f"reward must be one of {REWARDS} (got {reward!r}), budget in (0, 1] (got {budget}), "
                         f"target_rate in [0, 1] (got {target_rate})")
    if gate_lr is not None and not gate_lr > 0:
        raise ValueError(f"gate_lr must be a positive learning rate or null, got {gate_lr!r}")


def _check_operating_options(cost_pct: float | None, thresholds) -> None:
    if cost_pct is not None and not 0.0 < cost_pct <= 100.0:
        raise ValueError(f"operating_cost_pct must be in (0, 100] (percent of the full network's GFLOPs) or null, "
                         f"got {cost_pct!r}")
    if not len(thresholds) or not all(0.0 < float(t) < 1.0 for t in thresholds):
        raise ValueError(f"operating_thresholds must be gate probabilities in (0, 1), got {list(thresholds)!r}")


def _baseline_mode(baseline: bool | str | None) -> str:
    mode = {True: "moving", False: "none", None: "none"}.get(baseline, baseline)  # type: ignore[arg-type]
    if mode not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES} (or true/false), got {baseline!r}")
    return mode


@contextmanager
def _modes_kept(module: torch.nn.Module) -> Iterator[None]:
    """Restore every submodule's training flag on exit (for a pass run in another mode)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
