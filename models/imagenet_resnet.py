"""torchvision's ImageNet ResNets (18-152), with ``forward_features``/``forward_head`` and ``in_chans``.

The class extends :class:`torchvision.models.ResNet`, so parameter names match torchvision's and its
pretrained weights load unchanged when the user has them cached.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock, Bottleneck

from gating.errors import UserError
from models.registry import register_model
from models.weights import load_pretrained


class ResNet(tvm.ResNet):
    """torchvision ResNet with a configurable number of input channels and timm's forward split."""

    def __init__(self, block, layers, num_classes: int = 1000, in_chans: int = 3, **kwargs) -> None:
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.fc.in_features
        if in_chans != 3:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def blocks(self) -> list[nn.Module]:
        """The residual blocks in execution order."""
        return [*self.layer1, *self.layer2, *self.layer3, *self.layer4]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _resnet(
    block, layers, weights_enum, num_classes: int = 1000, in_chans: int = 3, pretrained: str | None = None
) -> ResNet:
    model = ResNet(block, layers, num_classes=num_classes, in_chans=in_chans)
    if pretrained and not pretrained.endswith((".pt", ".pth", ".ckpt", ".bin")):
        # A torchvision weights name such as "IMAGENET1K_V1": read from the torch hub cache.
        if num_classes != 1000 or in_chans != 3:
            raise UserError("torchvision weights need num_classes=1000 and in_chans=3; fine-tune from a local file")
        try:
            state = weights_enum[pretrained].get_state_dict(progress=False)
        except KeyError:
            raise UserError(f"unknown weights {pretrained!r}; choose one of {[w.name for w in weights_enum]}") from None
        except Exception as e:  # offline and not cached
            raise UserError(
                f"could not load torchvision weights {pretrained!r} ({e}); put them in the torch hub cache "
                f"or pass pretrained=<local .pth file>"
            ) from None
        model.load_state_dict(state)
        return model
    return load_pretrained(model, pretrained)


@register_model
def resnet18(**kwargs) -> ResNet:
    """ResNet-18 (torchvision layout)."""
    return _resnet(BasicBlock, [2, 2, 2, 2], tvm.ResNet18_Weights, **kwargs)


@register_model
def resnet34(**kwargs) -> ResNet:
    """ResNet-34 (torchvision layout)."""
    return _resnet(BasicBlock, [3, 4, 6, 3], tvm.ResNet34_Weights, **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """ResNet-50 (torchvision layout, v1.5: stride in the 3x3 conv)."""
    return _resnet(Bottleneck, [3, 4, 6, 3], tvm.ResNet50_Weights, **kwargs)


@register_model
def resnet101(**kwargs) -> ResNet:
    """ResNet-101 (torchvision layout)."""
    return _resnet(Bottleneck, [3, 4, 23, 3], tvm.ResNet101_Weights, **kwargs)


@register_model
def resnet152(**kwargs) -> ResNet:
    """ResNet-152 (torchvision layout)."""
    return _resnet(Bottleneck, [3, 8, 36, 3], tvm.ResNet152_Weights, **kwargs)
