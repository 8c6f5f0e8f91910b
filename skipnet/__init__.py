"""SkipNet: gated ResNets that skip residual blocks per input, trained by supervised pre-training and
hybrid reinforcement learning, executed with real skipping at inference."""

from skipnet.models import GATES, SkipOutput, SkipResNet

__all__ = ["GATES", "SkipOutput", "SkipResNet"]

from skipnet.module import SkipNetModule  # noqa: E402

__all__ += ["SkipNetModule"]
