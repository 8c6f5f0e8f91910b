"""IDK-aware training: learn the IDK heads (and optionally the first stage) with the cascade objective.

The objective is the IDK paper's cost-aware risk, ``J = mean[L(y, cascade(x))] + lambda * mean[cost(x)]``,
made differentiable by letting each learned head answer softly: with ``a_k = P(stage k answers)`` (the
head's confidence), a sample's loss and cost unroll from the last stage backwards,

    L_k = a_k * loss_k + (1 - a_k) * L_{k+1},      C_k = c_k + (1 - a_k) * C_{k+1},

with ``c_k`` the stage's exact FLOPs as a share of the whole cascade's, so ``lambda`` does not depend
on the models' size. ``loss="zero_one"`` (default) optimises accuracy itself, which is what the
thresholds are constrained on; ``"cross_entropy"`` is smooth in the stage's logits and is what
fine-tuning the first stage needs. At evaluation the heads answer hard, ``a_k >= 0.5`` (thresholds are
then re-calibrated on validation data by ``experiments.cascade``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric, MinMetric
from torchmetrics.classification import MulticlassAccuracy

from cascades.model import IDKCascade
from experiments.systems.classifier import ClassifierModule
from gating.errors import UserError
from gating.idk import LearnedIDK

__all__ = ["IDKCascadeModule"]


class IDKCascadeModule(ClassifierModule):
    """Trains an :class:`IDKCascade`'s learned IDK heads with the cost-aware cascade objective.

    Args:
        cascade: the cascade; its deciders must be :class:`gating.idk.LearnedIDK`.
        optimizer, scheduler, scheduler_interval: as in :class:`experiments.systems.ClassifierModule`.
        lam: the price of computation: weight of the mean relative cost in ``J``.
        loss: ``"zero_one"`` or ``"cross_entropy"``, the per-stage loss ``L``.
        finetune_first: also train the first stage (with ``loss="cross_entropy"``); the other stages
            stay frozen in eval mode.
        num_classes, name: as in ``ClassifierModule``.

    Logs ``{val,test}/acc``, ``{val,test}/objective`` (0-1 error + lambda x relative cost, hard
    decisions), ``{val,test}/gflops_per_img`` (expected, exact per stage), ``{val,test}/cost_rel`` and
    ``test/exit_rate/<stage>``.
    """

    def __init__(
        self,
        cascade: IDKCascade,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        lam: float = 0.1,
        loss: str = "zero_one",
        finetune_first: bool = False,
        num_classes: int | None = None,
        name: str | None = None,
    ) -> None:
        if loss not in ("zero_one", "cross_entropy"):
            raise UserError(f"loss must be 'zero_one' or 'cross_entropy', got {loss!r}")
        if finetune_first and loss != "cross_entropy":
            raise UserError("finetune_first=true needs loss=cross_entropy (the 0-1 loss has no gradient in the stage)")
        if not all(isinstance(d, LearnedIDK) for d in cascade.deciders):
            raise UserError("IDK-aware training needs learned IDK heads: use decider=learned")
        with warnings.catch_warnings():  # the parent's hparams pass sees `cascade`; ours below leaves it out
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            super().__init__(cascade, optimizer, scheduler, scheduler_interval, num_classes=num_classes, name=name)
        self.save_hyperparameters(ignore=["cascade", "optimizer", "scheduler"], logger=False)
        for k, stage in enumerate(cascade.stages):
            stage.requires_grad_(k == 0 and finetune_first)
        self.register_buffer("cost_share", torch.zeros(cascade.num_stages), persistent=False)
        self.val_obj, self.test_obj = MeanMetric(), MeanMetric()
        self.val_cost, self.test_cost = MeanMetric(), MeanMetric()
        self.val_obj_best = MinMetric()
        self.test_exit_rates = torch.nn.ModuleList(MeanMetric() for _ in range(cascade.num_stages))
        self.val_acc, self.test_acc = (MulticlassAccuracy(self.num_classes, average="micro") for _ in range(2))
        self._stage_flops: torch.Tensor | None = None

    @property
    def cascade(self) -> IDKCascade:
        return self.net  # type: ignore[return-value]

    def train(self, mode: bool = True) -> "IDKCascadeModule":
        super().train(mode)
        for k, stage in enumerate(self.cascade.stages):  # frozen stages keep their BatchNorm statistics
            if not (k == 0 and self.hparams.finetune_first):
                stage.eval()
        return self

    # ------------------------------------------------------------------------------------ objective
    def _costs(self, x: torch.Tensor) -> torch.Tensor:
        if self._stage_flops is None:
            self._stage_flops = torch.tensor(self.cascade.stage_costs(x[:1]).stage, dtype=torch.float64)
            self.cost_share.copy_((self._stage_flops / self._stage_flops.sum()).to(self.cost_share))
        return self.cost_share

    def _stage_terms(self, x: torch.Tensor, y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per stage: loss ``[B]`` (0-1 or CE), prediction ``[B]``; per head: P(answer) ``[B]``."""
        losses, preds, answer = [], [], []
        for k in range(self.cascade.num_stages):
            trainable = k == 0 and self.hparams.finetune_first and self.training
            with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
                logits, probs, features = self.cascade.run_stage(k, x)
            pred = logits.argmax(-1)
            preds.append(pred)
            if self.hparams.loss == "zero_one":
                losses.append((pred != y).float())
            else:
                losses.append(F.cross_entropy(logits, y, reduction="none"))
            if k < self.cascade.num_stages - 1:
                answer.append(torch.sigmoid(self.cascade.deciders[k].logit(probs, features)))
        return losses, preds, answer

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The soft cascade objective ``J`` (scalar) and the hard-decision statistics per sample."""
        c = self._costs(x).to(x.dtype)
        losses, preds, answer = self._stage_terms(x, y)
        k_last = self.cascade.num_stages - 1
        loss, cost = losses[k_last], c[k_last].expand_as(losses[k_last])
        for k in range(k_last - 1, -1, -1):
            loss = answer[k] * losses[k] + (1 - answer[k]) * loss
            cost = c[k] + (1 - answer[k]) * cost
        j = loss.mean() + self.hparams.lam * cost.mean()
        # Hard decisions (answer where P(answer) >= 0.5), as the cascade runs at inference.
        exit_stage = torch.full_like(y, k_last)
        active = torch.ones_like(y, dtype=torch.bool)
        for k in range(k_last):
            here = active & (answer[k] >= 0.5)
            exit_stage[here] = k
            active &= ~here
        pred = torch.stack(preds).gather(0, exit_stage[None]).squeeze(0)
        hard_cost = c.cumsum(0)[exit_stage]
        return j, {"pred": pred, "exit_stage": exit_stage, "cost_rel": hard_cost,
                   "flops": self._stage_flops.to(x.device).cumsum(0)[exit_stage]}

    # ------------------------------------------------------------------------------------ steps
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        j, _ = self.objective(self._prepare(x), y)
        self.train_loss(j)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return j

    def _eval_step(self, batch, split: str) -> dict[str, torch.Tensor]:
        x, y = batch
        _, hard = self.objective(self._prepare(x), y)
        acc, obj, cost = (self.val_acc, self.val_obj, self.val_cost) if split == "val" else \
            (self.test_acc, self.test_obj, self.test_cost)
        acc(hard["pred"], y)
        obj((hard["pred"] != y).float() + self.hparams.lam * hard["cost_rel"])
        cost(hard["cost_rel"])
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/objective", obj, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{split}/cost_rel", cost, on_step=False, on_epoch=True)
        return hard

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_obj_best(self.val_obj.compute())
        self.log("val/objective_best", self.val_obj_best.compute(), prog_bar=True)
        if self._stage_flops is not None:
            self.log("val/gflops_per_img", float(self.val_cost.compute()) * float(self._stage_flops.sum()) / 1e9)

    def on_train_start(self) -> None:
        self.val_obj.reset()
        self.val_obj_best.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        hard = self._eval_step(batch, "test")
        for k, m in enumerate(self.test_exit_rates):
            m((hard["exit_stage"] == k).float())

    def on_test_epoch_end(self) -> None:
        if self._stage_flops is not None:
            self.log("test/gflops_per_img", float(self.test_cost.compute()) * float(self._stage_flops.sum()) / 1e9)
        for name, m in zip(self.cascade.names, self.test_exit_rates):
            self.log(f"test/exit_rate/{name}", m.compute())
