"""Input difficulty, defined reproducibly, as ordered buckets (0 = easiest).

- :func:`ladder_buckets`: the index of the cheapest model in a ladder of independently trained models
  that classifies the input correctly; inputs no model gets right are "unsolved" (the last bucket).
- :func:`confidence_buckets`: quantile buckets of a reference model's confidence (max-probability or
  1 - normalised entropy); the most confident inputs are the easiest.
- :func:`score_buckets`: quantile buckets of a per-sample score you supply (higher = harder), read from
  a CSV file with an ``index`` column (the test sample's position) and a score column.
- :func:`severity_buckets`: the difficulty a data set records per sample as an integer level (the
  corruption severity 0-5 of ``mnist_c`` / ``digits_c``), one bucket per level.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

import numpy as np

from gating.errors import UserError

__all__ = ["Buckets", "confidence_buckets", "ladder_buckets", "score_buckets", "severity_buckets"]


class Buckets:
    """``bucket[i]`` in ``0 .. len(labels) - 1`` for every input; ``labels`` name the buckets, easy first."""

    def __init__(self, bucket: np.ndarray, labels: Sequence[str], definition: str) -> None:
        self.bucket, self.labels, self.definition = np.asarray(bucket, dtype=np.int64), list(labels), definition

    def label_of(self) -> list[str]:
        return [self.labels[b] for b in self.bucket]


def ladder_buckets(correct: Sequence[np.ndarray], names: Sequence[str]) -> Buckets:
    """Bucket ``k``: the cheapest model right on the input is ``names[k]``; ``len(names)``: unsolved."""
    c = np.stack([np.asarray(v, dtype=bool) for v in correct])
    first = np.where(c.any(0), c.argmax(0), len(names))
    return Buckets(first, [f"{k}:{n}" for k, n in enumerate(names)] + [f"{len(names)}:unsolved"],
                   f"model ladder {' < '.join(names)}: cheapest model that is right")


def severity_buckets(severity: np.ndarray, levels: int | None = None) -> Buckets:
    """Bucket ``k``: inputs of severity ``k`` (integers from 0, the clean inputs, up)."""
    sev = np.asarray(severity)
    if sev.size and (sev.min() < 0 or not np.issubdtype(sev.dtype, np.integer)):
        raise UserError("severity buckets need integer severities from 0: use a data set that records them "
                        "(data=mnist_c or data=digits_c)")
    n = levels or (int(sev.max()) + 1 if sev.size else 1)
    return Buckets(sev, [f"{k}:severity{k}" for k in range(n)], "corruption severity (0 = clean)")


def _quantile_buckets(score: np.ndarray, n_buckets: int) -> np.ndarray:
    """Equal-count buckets by rank (ties broken by position, so every bucket has its share)."""
    order = np.argsort(score, kind="stable")
    bucket = np.empty(len(score), dtype=np.int64)
    bucket[order] = np.arange(len(score)) * n_buckets // max(len(score), 1)
    return bucket


def confidence_buckets(confidence: np.ndarray, n_buckets: int, reference: str) -> Buckets:
    """Quantile buckets of a reference model's confidence: bucket 0 holds the most confident inputs."""
    b = _quantile_buckets(-np.asarray(confidence, dtype=np.float64), n_buckets)
    return Buckets(b, [f"q{k + 1}/{n_buckets}" for k in range(n_buckets)],
                   f"{reference} confidence quantiles (q1 = most confident)")


def score_buckets(path: str | Path, column: str, n: int, n_buckets: int) -> Buckets:
    """Quantile buckets of a user score per test input (higher = harder) from a CSV file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"difficulty file {str(p)!r} not found: pass a CSV with columns index,{column}")
    with p.open() as f:
        rows = list(csv.DictReader(f))
    if not rows or column not in rows[0] or "index" not in rows[0]:
        raise UserError(f"difficulty file {str(p)!r} needs columns 'index' and {column!r}")
    score = np.full(n, np.nan)
    for r in rows:
        i = int(r["index"])
        if 0 <= i < n:
            score[i] = float(r[column])
    if np.isnan(score).any():
        raise UserError(f"difficulty file {str(p)!r} has no {column!r} for {int(np.isnan(score).sum())} of the {n} "
                        f"test inputs")
    return Buckets(_quantile_buckets(score, n_buckets), [f"q{k + 1}/{n_buckets}" for k in range(n_buckets)],
                   f"{column} from {p.name} quantiles (q1 = lowest score)")
