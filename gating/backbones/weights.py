"""Loading optional pretrained weights from local files (nothing is downloaded here)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gating.errors import UserError


def read_state_dict(path: str | Path, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """Read a model state dict from a plain ``.pt`` file or a Lightning checkpoint.

    Lightning checkpoints keep the wrapped model under ``state_dict`` with a ``net.`` prefix; that
    prefix is stripped so the weights load into the bare model.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} not found: pass the path of a .pt/.ckpt file that exists")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise UserError(f"{str(path)!r} holds no state dict: save one with torch.save(model.state_dict(), path)")
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_pretrained(model: nn.Module, pretrained: str | None) -> nn.Module:
    """Load weights from a local file into ``model`` (strictly: every key must match)."""
    if pretrained:
        try:
            missing, unexpected = model.load_state_dict(read_state_dict(pretrained), strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False
            missing, unexpected = [str(e).splitlines()[1].strip()], []
        if missing or unexpected:
            raise UserError(
                f"weights in {pretrained!r} do not fit {type(model).__name__}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; check that the model name and num_classes/in_chans match the file"
            )
    return model
