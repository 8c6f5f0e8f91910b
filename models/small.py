"""Cheap classifiers for early cascade stages: linear, MLP and a tiny CNN."""

from __future__ import annotations

import torch
import torch.nn as nn

from gating.errors import UserError
from models.registry import register_model
from models.weights import load_pretrained


def _flat_size(in_chans: int, image_size: int | None, name: str) -> int:
    if image_size is None:
        raise UserError(f"model {name!r} has a flat input layer: pass image_size (e.g. model.net.image_size=28)")
    return in_chans * image_size * image_size


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` ReLU layers and a linear head; ``hidden=()`` is logistic regression."""

    def __init__(
        self, num_classes: int, in_chans: int, image_size: int, hidden: tuple[int, ...] = (256,), name: str = "mlp"
    ) -> None:
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        dims = [_flat_size(in_chans, image_size, name), *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.num_features = dims[-1]
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class TinyCNN(nn.Module):
    """Two conv-BN-ReLU-maxpool stages and a linear head: a cheap but decent image classifier."""

    def __init__(self, num_classes: int, in_chans: int, width: int = 8) -> None:
        super().__init__()
        self.num_classes, self.in_chans = num_classes, in_chans
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)  # keeps a little spatial layout, independent of input size
        self.num_features = 2 * width * 4
        self.fc = nn.Linear(self.num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def linear(num_classes: int = 10, in_chans: int = 1, image_size: int | None = None, pretrained: str | None = None):
    """Logistic regression on raw pixels: the cheapest cascade stage."""
    return load_pretrained(MLP(num_classes, in_chans, image_size, hidden=(), name="linear"), pretrained)


@register_model
def mlp(
    num_classes: int = 10,
    in_chans: int = 1,
    image_size: int | None = None,
    hidden: tuple[int, ...] | list[int] = (256,),
    pretrained: str | None = None,
):
    """Multi-layer perceptron on raw pixels."""
    return load_pretrained(MLP(num_classes, in_chans, image_size, hidden=tuple(hidden), name="mlp"), pretrained)


@register_model
def tiny_cnn(num_classes: int = 10, in_chans: int = 1, width: int = 8, pretrained: str | None = None):
    """Two-layer CNN, a few MFLOPs at 28x28."""
    return load_pretrained(TinyCNN(num_classes, in_chans, width=width), pretrained)
