"""One evaluator for every kind of model: per-input records with exact FLOPs and measured latency,
difficulty buckets, per-bucket and Pareto tables, and plots (``python -m experiments.eval``)."""

from experiments.evaluation.difficulty import Buckets, confidence_buckets, ladder_buckets, score_buckets
from experiments.evaluation.evaluator import EvaluationResult, evaluate_methods
from experiments.evaluation.methods import (
                                            CascadeMethod,
                                            Method,
                                            MethodOutput,
                                            RandomSkipMethod,
                                            SkipNetMethod,
                                            StaticMethod,
                                            cascade_from_run,
                                            random_skip_from_run,
                                            skipnet_from_run,
                                            static_from_run,
)

__all__ = ["Buckets", "CascadeMethod", "EvaluationResult", "Method", "MethodOutput", "RandomSkipMethod",
           "SkipNetMethod", "StaticMethod", "cascade_from_run", "confidence_buckets", "evaluate_methods",
           "ladder_buckets", "random_skip_from_run", "score_buckets", "skipnet_from_run", "static_from_run"]
