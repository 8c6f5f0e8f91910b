"""The Lightning system for plain classifiers; dynamic models' systems build on it."""

from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Callable

import torch
import torch.nn as nn
from pytorch_lightning import LightningModule
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from gating.cost import count_flops


class ClassifierModule(LightningModule):
    """Trains and tests an ``nn.Module`` classifier with cross-entropy.

    Logs ``{train,val,test}/loss``, ``{train,val,test}/acc`` (fraction correct), ``val/acc_best`` and
    ``test/gflops_per_img`` (exact FLOPs of one image, from :mod:`gating.cost`).

    Args:
        net: the model; must expose ``num_classes``, or pass ``num_classes``.
        optimizer: a partial optimizer (Hydra ``_partial_: true``), called with the parameters.
        scheduler: an optional partial LR scheduler called with the optimizer (None or empty: constant lr). ``T_max`` (cosine) or
            ``total_steps`` (one-cycle) left unset are filled with the run's length.
        scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps.
        label_smoothing: cross-entropy label smoothing.
        channels_last: keep conv weights and inputs in NHWC (faster convolutions on CPUs and GPUs).
        compile: wrap the net in ``torch.compile`` when fitting.
        num_classes: overrides ``net.num_classes``.
        name: the model's short name, for run names and reports.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "epoch",
        label_smoothing: float = 0.0,
        channels_last: bool = False,
        compile: bool = False,
        num_classes: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        # Factories stay out of the saved hparams so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["net", "optimizer", "scheduler"], logger=False)
        self.net = net
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        if scheduler_interval not in ("epoch", "step"):
            raise ValueError(f"scheduler_interval must be 'epoch' or 'step', got {scheduler_interval!r}")
        n = num_classes or getattr(net, "num_classes", None)
        if not n:
            raise ValueError("the net has no num_classes attribute: pass num_classes to ClassifierModule")
        self.num_classes = int(n)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc, self.val_acc, self.test_acc = (MulticlassAccuracy(self.num_classes, average="micro")
                                                       for _ in range(3))
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self._flops_per_img: float | None = None
        if channels_last:
            self.net.to(memory_format=torch.channels_last)

    # ---------------------------------------------------------------------------------------- forward
    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last and x.ndim == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self._prepare(x))

    def model_step(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return self.criterion(logits, y), logits.argmax(dim=1), y

    # --------------------------------------------------------------------------------------- training
    def on_train_start(self) -> None:
        # Sanity-check validation must not count towards the best accuracy.
        self.val_loss.reset()
        self.val_acc.reset()
        self.val_acc_best.reset()

    def training_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, predictions, labels)`` of a training batch; systems with another training objective
        (distillation) override this and keep the logging."""
        return self.model_step(batch)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss, preds, y = self.training_loss(batch)
        self.train_loss(loss)
        self.train_acc(preds, y)
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, preds, y = self.model_step(batch)
        self.val_loss(loss)
        self.val_acc(preds, y)
        self.log("val/loss", self.val_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("val/acc", self.val_acc, on_step=False, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True, prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        if self._flops_per_img is None:
            self._flops_per_img = float(count_flops(self.net, self._prepare(batch[0][:1])))
        loss, preds, y = self.model_step(batch)
        self.test_loss(loss)
        self.test_acc(preds, y)
        self.log("test/loss", self.test_loss, on_step=False, on_epoch=True)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        if self._flops_per_img is not None:
            self.log("test/gflops_per_img", self._flops_per_img / 1e9)

    # -------------------------------------------------------------------------------------- optimizer
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and all(hasattr(dm, a) for a in ("in_chans", "image_size")):
            # Lets Lightning's model summary report FLOPs.
            self.example_input_array = torch.zeros(1, dm.in_chans, dm.image_size, dm.image_size)
        if self.hparams.compile and stage == "fit":
            self.net = torch.compile(self.net)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = self.optimizer_factory(params=self.param_groups())
        if not self.scheduler_factory:  # None, or {} from scheduler=none
            return {"optimizer": optimizer}
        scheduler = _fill_length(self.scheduler_factory, self._schedule_length())(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval,
                             "monitor": "val/loss", "frequency": 1},
        }

    def param_groups(self) -> Any:
        """What the optimizer is given: every parameter, in one group (systems with parts that need their
        own learning rate return a list of groups)."""
        return self.trainer.model.parameters()

    def _schedule_length(self) -> int:
        if self.hparams.scheduler_interval == "step":
            return int(self.trainer.estimated_stepping_batches)
        return int(self.trainer.max_epochs) if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1


def _fill_length(factory: Callable[..., Any], length: int) -> Callable[..., Any]:
    """Give a scheduler factory its run length where the config left it out (``T_max``/``total_steps``)."""
    fn = factory.func if isinstance(factory, partial) else factory
    given = factory.keywords if isinstance(factory, partial) else {}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return factory
    for key in ("T_max", "total_steps"):
        if key in params and given.get(key) is None:
            return partial(factory, **{key: max(1, length)})
    return factory
