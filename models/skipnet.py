"""SkipNet's gated ResNets in the registry: ``skipnet{20,38,74,110,152}_cifar`` and ``skipnet{34,50,101}``.

Each builder makes the backbone through the registry, puts a gate (``rnn``, ``ffgate1``, ``ffgate2``)
before every block but the first, and loads weights from local files: the backbone's
(``backbone_pretrained``, where supervised pre-training starts) or the whole gated network's
(``pretrained``, where RL starts from SP).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch.nn as nn

from gating.errors import UserError
from models.registry import create_model, register_model
from models.weights import load_pretrained
from skipnet.models import GATES, SkipResNet

__all__ = ["skipnet_from_backbone"]


def skipnet_from_backbone(backbone: nn.Module, gate: nn.Module | Callable[..., nn.Module], threshold: float = 0.5,
                          pretrained: str | None = None) -> SkipResNet:
    """A :class:`skipnet.SkipResNet` over ``backbone``, with a whole gated network's weights from ``pretrained``.

    What ``configs/model/skipnet.yaml`` instantiates: the backbone and the gate come from their own
    config nodes.
    """
    return load_pretrained(SkipResNet(backbone, gate, threshold=threshold), pretrained)


def _skipnet(backbone_name: str, gate: str = "rnn", num_classes: int = 10, in_chans: int = 3,
             pretrained: str | None = None, backbone_pretrained: str | None = None, threshold: float = 0.5,
             **gate_kwargs: Any) -> SkipResNet:
    if gate not in GATES:
        raise UserError(f"unknown gate {gate!r}; one of {sorted(GATES)}")
    backbone = create_model(backbone_name, num_classes=num_classes, in_chans=in_chans, pretrained=backbone_pretrained)
    return skipnet_from_backbone(backbone, partial(GATES[gate], **gate_kwargs), threshold, pretrained)


@register_model
def skipnet20_cifar(**kwargs) -> SkipResNet:
    """SkipNet-20 (CIFAR-style ResNet-20, 9 blocks): small, for the digits recipe and tests."""
    return _skipnet("resnet20_cifar", **kwargs)


@register_model
def skipnet38_cifar(**kwargs) -> SkipResNet:
    """SkipNet-38 (CIFAR-style ResNet-38, 18 blocks); ``gate`` in rnn/ffgate1/ffgate2."""
    return _skipnet("resnet38_cifar", **kwargs)


@register_model
def skipnet74_cifar(**kwargs) -> SkipResNet:
    """SkipNet-74 (36 blocks)."""
    return _skipnet("resnet74_cifar", **kwargs)


@register_model
def skipnet110_cifar(**kwargs) -> SkipResNet:
    """SkipNet-110 (54 blocks)."""
    return _skipnet("resnet110_cifar", **kwargs)


@register_model
def skipnet152_cifar(**kwargs) -> SkipResNet:
    """SkipNet-152 (75 blocks), SkipNet's SVHN model."""
    return _skipnet("resnet152_cifar", **kwargs)


@register_model
def skipnet34(**kwargs) -> SkipResNet:
    """SkipNet over torchvision ResNet-34."""
    kwargs.setdefault("num_classes", 1000)
    return _skipnet("resnet34", **kwargs)


@register_model
def skipnet50(**kwargs) -> SkipResNet:
    """SkipNet over torchvision ResNet-50."""
    kwargs.setdefault("num_classes", 1000)
    return _skipnet("resnet50", **kwargs)


@register_model
def skipnet101(**kwargs) -> SkipResNet:
    """SkipNet over torchvision ResNet-101 (the paper's ImageNet headline)."""
    kwargs.setdefault("num_classes", 1000)
    return _skipnet("resnet101", **kwargs)
