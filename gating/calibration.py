"""Calibration of stage confidences: expected calibration error and temperature scaling.

A threshold on max-probability means what it says only when the probabilities are calibrated;
temperature scaling (Guo et al., 2017) divides the logits by one scalar fitted on validation data,
which changes confidences but never the predicted class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CalibrationReport", "calibration_report", "expected_calibration_error", "fit_temperature"]


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE: the sample-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    conf, pred = probs.float().max(-1)
    correct = (pred == labels).float()
    bins = torch.linspace(0, 1, n_bins + 1, device=probs.device)
    # Bin i holds (lo, hi]; confidence 0 cannot occur for a max over classes.
    which = torch.bucketize(conf, bins[1:-1], right=False)
    ece = conf.new_zeros(())
    for i in range(n_bins):
        m = which == i
        if m.any():
            ece += m.float().mean() * (correct[m].mean() - conf[m].mean()).abs()
    return float(ece)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (L-BFGS on log T)."""
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


@dataclass(frozen=True)
class CalibrationReport:
    """One stage's calibration on one split."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    accuracy: float


def calibration_report(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                       n_bins: int = 15) -> CalibrationReport:
    """ECE and NLL of ``logits`` before and after dividing them by ``temperature``."""
    logits = logits.float()
    scaled = logits / temperature
    return CalibrationReport(
        temperature=float(temperature),
        ece_before=expected_calibration_error(logits.softmax(-1), labels, n_bins),
        ece_after=expected_calibration_error(scaled.softmax(-1), labels, n_bins),
        nll_before=float(F.cross_entropy(logits, labels)),
        nll_after=float(F.cross_entropy(scaled, labels)),
        accuracy=float((logits.argmax(-1) == labels).float().mean()),
    )
