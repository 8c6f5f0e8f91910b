"""SkipNet: gated ResNets that skip residual blocks per input (Wang et al., ECCV'18), executed with real
skipping at inference, and their adapters for evaluation and serving.

The registry's builders (``skipnet38_cifar``, ...) are in :mod:`models.skipnet`; the Lightning system
that trains them (supervised pre-training, hybrid RL) is :class:`experiments.systems.SkipNetModule`.
"""

from skipnet.adapters import RandomSkipAdapter, SkipNetAdapter
from skipnet.models import GATES, OnDeviceDecisions, SkipOutput, SkipResNet, compile_on_device

__all__ = ["GATES", "OnDeviceDecisions", "RandomSkipAdapter", "SkipNetAdapter", "SkipOutput", "SkipResNet", "compile_on_device"]
