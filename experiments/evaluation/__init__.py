"""One evaluator for every kind of model: per-input records with exact FLOPs and measured latency,
difficulty buckets, per-bucket and Pareto tables, and plots (``python -m experiments.eval``).

Models are loaded with :func:`experiments.runs.load_run`, behind the same adapters the server runs.
"""

from experiments.evaluation.difficulty import (
    Buckets,
    confidence_buckets,
    ladder_buckets,
    score_buckets,
    severity_buckets,
)
from experiments.evaluation.evaluator import EvaluationResult, evaluate_models, run_all

__all__ = ["Buckets", "EvaluationResult", "confidence_buckets", "evaluate_models", "ladder_buckets", "run_all",
           "score_buckets", "severity_buckets"]
