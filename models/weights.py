"""Loading weights from a local file into a model (nothing is downloaded here).

Only files: which checkpoint of which run a folder stands for is the experiments' convention
(:func:`experiments.runs.resolve_checkpoint`), and the entry points turn run folders into files
before a builder sees them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from gating.errors import UserError

__all__ = ["load_pretrained", "read_state_dict"]


def read_state_dict(path: str | Path, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """A model state dict from a plain ``.pt``/``.pth`` file or a Lightning checkpoint.

    Lightning checkpoints keep the wrapped model under ``state_dict`` with a ``net.`` prefix; that
    prefix is stripped so the weights load into the bare model. Files are read with
    ``weights_only=True``: tensors and plain values, no pickled code.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{str(path)!r} is a folder: pass a weights file, or load a run folder with "
                        f"experiments.runs.load_run / resolve_checkpoint")
    if not path.is_file():
        raise UserError(f"weights {str(path)!r} not found: train the model that writes it first (its run folder "
                        f"under logs/train/runs/), or pass the path of a .pt/.ckpt file or run folder")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(state, dict):
        raise UserError(f"{str(path)!r} holds no state dict: save one with torch.save(model.state_dict(), path)")
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return state


def load_pretrained(model: nn.Module, pretrained: str | Path | None) -> nn.Module:
    """Load weights from a local file into ``model`` (strictly: every key must match)."""
    if pretrained:
        try:
            missing, unexpected = model.load_state_dict(read_state_dict(pretrained), strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False
            missing, unexpected = [str(e).splitlines()[1].strip()], []
        if missing or unexpected:
            raise UserError(
                f"weights in {str(pretrained)!r} do not fit {type(model).__name__}: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}; check that the model name and num_classes/in_chans match the file"
            )
    return model
