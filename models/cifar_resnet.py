"""CIFAR-style ResNets of depth 6n+2 (He et al. 2016, Sec. 4.2), as SkipNet uses them.

Three stages of ``n`` BasicBlocks with 16/32/64 channels; a stage's first block downsamples with a
1x1 conv + BN shortcut (SkipNet's choice, which keeps the shortcut when the block is skipped).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from models.registry import register_model
from models.weights import load_pretrained

NormLayer = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection. ``residual(x)`` is the branch a gate can skip."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.residual(x) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet 6n+2 for small images.

    Args:
        depth: 6n+2 (20, 32, 38, 56, 74, 110, 152, ...).
        num_classes: output classes.
        in_chans: input channels (1 for MNIST, 3 for CIFAR/SVHN).
        norm_layer: the normalisation layer, called with the channel count (default ``nn.BatchNorm2d``),
            as torchvision's ResNets take it: e.g. ``partial(nn.GroupNorm, 8)`` or a frozen BN.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3,
                 norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth, self.num_classes, self.in_chans = depth, num_classes, in_chans
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = 16
        self.conv1 = conv3x3(in_chans, 16)
        self.bn1 = self._norm_layer(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n, stride=1)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 64 * BasicBlock.expansion
        self.fc = nn.Linear(self.num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        norm = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False),
                norm(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, norm)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes, norm_layer=norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def blocks(self) -> list[nn.Module]:
        """The residual blocks in execution order (the units a gate may skip)."""
        return [*self.layer1, *self.layer2, *self.layer3]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer3(self.layer2(self.layer1(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cifar_resnet(depth: int, num_classes: int = 10, in_chans: int = 3, pretrained: str | None = None,
                  norm_layer: NormLayer | None = None) -> CifarResNet:
    net = CifarResNet(depth, num_classes=num_classes, in_chans=in_chans, norm_layer=norm_layer)
    return load_pretrained(net, pretrained)


@register_model
def resnet20_cifar(**kwargs) -> CifarResNet:
    """ResNet-20 (n=3) for 32x32 images."""
    return _cifar_resnet(20, **kwargs)


@register_model
def resnet32_cifar(**kwargs) -> CifarResNet:
    """ResNet-32 (n=5)."""
    return _cifar_resnet(32, **kwargs)


@register_model
def resnet38_cifar(**kwargs) -> CifarResNet:
    """ResNet-38 (n=6): SkipNet's smallest CIFAR backbone."""
    return _cifar_resnet(38, **kwargs)


@register_model
def resnet56_cifar(**kwargs) -> CifarResNet:
    """ResNet-56 (n=9)."""
    return _cifar_resnet(56, **kwargs)


@register_model
def resnet74_cifar(**kwargs) -> CifarResNet:
    """ResNet-74 (n=12)."""
    return _cifar_resnet(74, **kwargs)


@register_model
def resnet110_cifar(**kwargs) -> CifarResNet:
    """ResNet-110 (n=18)."""
    return _cifar_resnet(110, **kwargs)


@register_model
def resnet152_cifar(**kwargs) -> CifarResNet:
    """ResNet-152 (n=25), SkipNet's SVHN backbone."""
    return _cifar_resnet(152, **kwargs)
