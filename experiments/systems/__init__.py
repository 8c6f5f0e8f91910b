"""The Lightning systems that train the models (the style guide's "systems"): each wraps a plain
``nn.Module`` from :mod:`models`, :mod:`skipnet` or :mod:`cascades` with its losses, metrics and
optimizers. Only training imports Lightning; evaluation and serving run the modules through their
adapters (:mod:`gating.adapters`).
"""

from experiments.systems.classifier import ClassifierModule
from experiments.systems.distillation import DistillationModule
from experiments.systems.idk_cascade import IDKCascadeModule
from experiments.systems.skipnet import SkipNetModule

__all__ = ["ClassifierModule", "DistillationModule", "IDKCascadeModule", "SkipNetModule"]
