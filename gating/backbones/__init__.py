"""Backbones through one registry: CIFAR ResNets, torchvision ResNets, timm models, cheap stage models."""

from gating.backbones.registry import create_model, is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "register_model"]
