"""A timm-like model registry: a name maps to a builder, ``create_model(name, **kw)`` builds it.

Every model built here is a plain ``nn.Module`` with ``num_classes``, ``forward_features`` and
``forward_head``. Names prefixed ``timm/`` are passed to ``timm.create_model``. The family modules
register their builders when :mod:`models` is imported; this module imports none of them, so a family
can import it without a cycle.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Callable

import torch.nn as nn

from gating.errors import UserError

__all__ = ["TIMM_PREFIX", "create_model", "is_model", "list_models", "register_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
TIMM_PREFIX = "timm/"


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn`` under its function name."""
    name = fn.__name__
    if name in _REGISTRY and _REGISTRY[name] is not fn:
        raise ValueError(f"model name {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (timm models are not listed)."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    """Whether ``name`` builds a model: a registered name or ``timm/<name>``."""
    return name in _REGISTRY or name.startswith(TIMM_PREFIX)


def create_model(model_name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model by name.

    Args:
        model_name: a registered name (see :func:`list_models`) or ``timm/<any timm model>``.
        **kwargs: passed to the builder; ``None`` values are dropped so configs can leave them unset.
            Common ones: ``num_classes``, ``in_chans``, ``image_size`` (for models with a flat input
            layer), ``pretrained`` (a local weights file, or a torchvision weights name).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if model_name.startswith(TIMM_PREFIX):
        from models.timm_models import create_timm_model

        return create_timm_model(model_name[len(TIMM_PREFIX) :], **kwargs)
    if model_name not in _REGISTRY:
        close = difflib.get_close_matches(model_name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown model {model_name!r}.{hint} Registered models: {', '.join(sorted(_REGISTRY))}; "
            f"any timm model as 'timm/<name>'."
        )
    return _REGISTRY[model_name](**kwargs)
