"""Knowledge distillation (Hinton, Vinyals & Dean 2015): a student trained on a frozen teacher's
temperature-softened outputs and the hard labels."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from experiments.systems.classifier import ClassifierModule
from gating.errors import UserError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float, alpha: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels)``.

    The ``T^2`` keeps the soft targets' gradients at the hard loss's scale whatever the temperature
    (the soft gradients shrink as ``1/T^2``), so ``alpha`` means the same at every ``T``.
    """
    t = temperature
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)
    hard = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * soft + (1.0 - alpha) * hard


class DistillationModule(ClassifierModule):
    """A :class:`ClassifierModule` whose training loss is :func:`distillation_loss` against a frozen
    ``teacher``; validation and test are plain cross-entropy and accuracy, so runs compare with the
    same architecture trained on labels alone. Only the student is saved as ``net`` (the teacher's
    weights stay in its own run), so the run folder loads like any other classifier's.

    Args:
        net: the student.
        teacher: the trained teacher (e.g. :func:`experiments.runs.load_net` of its run); kept in eval
            mode and never updated.
        temperature: the softmax temperature ``T`` of both soft distributions (> 0).
        alpha: the weight of the soft loss in ``[0, 1]`` (0: labels alone).
        **kwargs: as :class:`ClassifierModule`.
    """

    def __init__(self, net: nn.Module, teacher: nn.Module, temperature: float = 4.0, alpha: float = 0.9,
                 **kwargs: Any) -> None:
        if not temperature > 0:
            raise UserError(f"distillation temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"distillation alpha must be in [0, 1], got {alpha}")
        with warnings.catch_warnings():  # the parent's hparams pass sees `teacher`; ours below leaves it out
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            super().__init__(net, **kwargs)
        self.save_hyperparameters(ignore=["net", "teacher", "optimizer", "scheduler"], logger=False)
        # Outside the module tree: not in the checkpoint, not moved by Lightning's .train(), not given
        # to the optimizer. It follows the student's device in on_fit_start.
        self._teacher = [teacher.eval().requires_grad_(False)]

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)
        if self.hparams.channels_last:
            self.teacher.to(memory_format=torch.channels_last)

    def training_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        x = self._prepare(x)
        logits = self.net(x)
        with torch.no_grad():
            target = self.teacher(x)
        loss = distillation_loss(logits, target, y, self.hparams.temperature, self.hparams.alpha,
                                 self.hparams.label_smoothing)
        return loss, logits.argmax(dim=1), y
