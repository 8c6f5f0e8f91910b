"""Fitting a cascade to data: per-stage records and temperature scaling, before the threshold search.

The workflow (``experiments.cascade`` runs it):

1. :func:`collect` runs every stage on every sample of a split once (:class:`CascadeRecords`).
2. :func:`fit_temperatures` scales each stage's logits on the validation split.
3. :class:`gating.thresholds.ThresholdSearch` picks thresholds on validation records.
4. ``experiments.cascade.verify`` scores the chosen thresholds on test records with confidence intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from cascades.model import Ensemble, IDKCascade
from gating.calibration import CalibrationReport, calibration_report, fit_temperature

__all__ = ["CascadeRecords", "collect", "fit_temperatures"]


@dataclass
class CascadeRecords:
    """Every stage's answer for every sample of one split.

    ``labels [n]``; ``logits``: per stage ``[n, C]`` (temperature-scaled as the cascade is set);
    ``confidence``: per decider ``[n]``.
    """

    labels: torch.Tensor
    logits: list[torch.Tensor]
    confidence: list[torch.Tensor]

    @property
    def correct(self) -> np.ndarray:
        """``[K, n]`` bool: stage ``k`` right on sample ``i``."""
        return torch.stack([lg.argmax(-1) == self.labels for lg in self.logits]).numpy()

    def confidences(self) -> list[np.ndarray]:
        return [c.double().numpy() for c in self.confidence]

    def stage_accuracy(self) -> list[float]:
        return self.correct.mean(1).tolist()


@torch.no_grad()
def collect(cascade: IDKCascade, batches: Iterable[Any], device: torch.device | str = "cpu") -> CascadeRecords:
    """Run every stage (and decider) on every sample of ``batches`` (``(x, y)`` pairs)."""
    cascade.eval()
    labels, logits, conf = [], [[] for _ in range(cascade.num_stages)], [[] for _ in range(cascade.num_stages - 1)]
    for x, y in batches:
        out = cascade.forward_all(x.to(device))
        labels.append(y.cpu())
        for k, lg in enumerate(out.logits):
            logits[k].append(lg.float().cpu())
        for k, c in enumerate(out.confidence):
            conf[k].append(c.float().cpu())
    return CascadeRecords(torch.cat(labels), [torch.cat(v) for v in logits], [torch.cat(v) for v in conf])


@torch.no_grad()
def _raw_logits(cascade: IDKCascade, batches: Iterable[Any], device: torch.device | str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cascade.eval()
    labels, out = [], [[] for _ in range(cascade.num_stages)]
    for x, y in batches:
        x = x.to(device)
        labels.append(y.cpu())
        for k, stage in enumerate(cascade.stages):
            lg = stage.member_logits(x) if isinstance(stage, Ensemble) else stage(x)
            out[k].append(lg.float().cpu())
    cat_dim = [1 if isinstance(s, Ensemble) else 0 for s in cascade.stages]
    return torch.cat(labels), [torch.cat(v, d) for v, d in zip(out, cat_dim)]


def fit_temperatures(cascade: IDKCascade, val_batches: Iterable[Any], device: torch.device | str = "cpu",
                     n_bins: int = 15) -> list[CalibrationReport]:
    """Fit each stage's softmax temperature on validation data, set them on the cascade, and report
    each stage's ECE and NLL before and after."""
    labels, raw = _raw_logits(cascade, val_batches, device)
    temps, reports = [], []
    for lg in raw:
        if lg.ndim == 3:  # ensemble members share one temperature
            flat, y = lg.reshape(-1, lg.shape[-1]), labels.repeat(lg.shape[0])
        else:
            flat, y = lg, labels
        t = fit_temperature(flat, y)
        temps.append(t)
        reports.append(calibration_report(flat, y, t, n_bins))
    cascade.set_temperatures(temps)
    return reports
