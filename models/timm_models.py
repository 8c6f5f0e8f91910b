"""Any timm model by name, built without downloads."""

from __future__ import annotations

import torch.nn as nn

from gating.errors import UserError
from models.weights import load_pretrained


def create_timm_model(name: str, num_classes: int | None = None, in_chans: int | None = None,
                      pretrained: str | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)``; ``pretrained`` is a local weights file."""
    import timm

    if not timm.is_model(name):
        raise UserError(f"timm has no model {name!r}: see timm.list_models('*{name[:6]}*')")
    kw = {k: v for k, v in dict(num_classes=num_classes, in_chans=in_chans, **kwargs).items() if v is not None}
    kw.pop("image_size", None)  # timm models take img_size where they need it
    return load_pretrained(timm.create_model(name, pretrained=False, **kw), pretrained)
