"""Loading optional pretrained weights from local files (nothing is downloaded here)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from gating.errors import UserError


def resolve_checkpoint(path: str | Path) -> Path:
    """Find a checkpoint: a file as is; a training run folder's best (else last) checkpoint; or, for a
    folder of runs (``logs/train/runs/<run_name>``), the newest finished run's.

    This is how a training stage finds the previous stage's weights (base -> SP -> RL).
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        record = p / "metrics.json"
        if record.is_file():
            best = json.loads(record.read_text()).get("checkpoints", {}).get("best")
            if best and Path(best).is_file():
                return Path(best)
        ckpt_dir = p / "checkpoints"
        if (ckpt_dir / "last.ckpt").is_file():
            return ckpt_dir / "last.ckpt"
        ckpts = sorted(ckpt_dir.glob("*.ckpt"), key=lambda f: f.stat().st_mtime) if ckpt_dir.is_dir() else []
        if ckpts:
            return ckpts[-1]
        run = newest_run(p)
        if run is not None:
            return resolve_checkpoint(run)
        raise UserError(f"folder {str(p)!r} holds no checkpoint (checkpoints/*.ckpt) and no finished run: run the "
                        f"training stage that writes it first, or pass a .ckpt file")
    raise UserError(f"checkpoint {str(p)!r} not found: pass ckpt_path=<a .ckpt file or a training run folder "
                    f"under logs/train/runs/>")


def newest_run(folder: str | Path) -> Path | None:
    """The newest finished run (a sub-folder with ``metrics.json``; run folders are named by time) in a
    folder of runs such as ``logs/train/runs/<run_name>``, or None."""
    p = Path(folder).expanduser()
    runs = sorted(r for r in p.iterdir() if (r / "metrics.json").is_file()) if p.is_dir() else []
    return runs[-1] if runs else None


def find_run(path: str | Path) -> Path:
    """A finished run folder: ``path`` itself, or the newest finished run inside it."""
    p = Path(path).expanduser()
    if (p / "metrics.json").is_file():
        return p
    run = newest_run(p)
    if run is None:
        raise UserError(f"no finished run at {str(p)!r}: run the step that writes it first (its run folder has "
                        f"metrics.json and config.yaml)")
    return run


def read_state_dict(path: str | Path, prefix: str = "net.") -> dict[str, torch.Tensor]:
    """Read a model state dict from a plain ``.pt`` file, a Lightning checkpoint or a run folder.

    Lightning checkpoints keep the wrapped model under ``state_dict`` with a ``net.`` prefix; that
    prefix is stripped so the weights load into the bare model.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = resolve_checkpoint(path)
    if not path.is_file():
        raise UserError(f"weights {str(path)!r} not found: train the model that writes it first (its run folder "
                        f"under logs/train/runs/), or pass the path of a .pt/.ckpt file or run folder")
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
