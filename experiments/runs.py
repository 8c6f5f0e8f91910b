"""Run folders: what every step writes, how the next one finds it, and the one loader of trained models.

A run folder is Hydra's run directory, ``logs/<task>/runs/<run_name>/<time>/``, holding
``config.yaml`` (the resolved config), ``metrics.json`` (the run record: metrics, checkpoint paths,
timings; a run is finished once it is there) and ``checkpoints/`` (Lightning ``.ckpt`` files, or a
cascade's ``cascade.pt``). A **run reference** is a run folder, or a folder of runs
(``logs/train/runs/<run_name>``), which stands for its newest finished run.

A trained model is referred to that way everywhere: a training stage's starting weights
(``pretrained``), a cascade's stages (``configs/stage/``: :func:`load_net`), the evaluation's
methods and the server's models (:func:`load_run`). Before a task runs, :func:`pin_references`
replaces each reference in its config by the exact run or checkpoint file it stands for, so the
``config.yaml`` a run writes says which weights it used.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from cascades import CascadeAdapter, IDKCascade, load_cascade_state
from experiments.compat import REFERENCE_BUILDERS, upgrade_targets
from gating.adapters import ModelAdapter, StaticAdapter
from gating.errors import UserError
from models import load_pretrained
from skipnet import RandomSkipAdapter, SkipNetAdapter, SkipResNet

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINTS", "CONFIG", "RECORD", "find_run", "load_net", "load_run", "load_stage", "newest_run",
           "output_dir", "pin_references", "read_run", "resolve_checkpoint", "run_config", "write_run_record"]

CONFIG, RECORD, CHECKPOINTS = "config.yaml", "metrics.json", "checkpoints"
KINDS = ("random_skip",)  # what load_run can make of a run besides the kind it holds


# -------------------------------------------------------------------------------------------- finding
def newest_run(folder: str | Path) -> Path | None:
    """The newest finished run (a sub-folder with ``metrics.json``; run folders are named by time) in a
    folder of runs such as ``logs/train/runs/<run_name>``, or None."""
    p = Path(folder).expanduser()
    runs = sorted(r for r in p.iterdir() if (r / RECORD).is_file()) if p.is_dir() else []
    return runs[-1] if runs else None


def find_run(path: str | Path) -> Path:
    """A finished run folder: ``path`` itself, or the newest finished run inside it."""
    p = Path(path).expanduser()
    if (p / RECORD).is_file():
        return p
    run = newest_run(p)
    if run is not None:
        return run
    if not p.exists():
        raise UserError(f"run folder {str(p)!r} not found: train that model first (python -m experiments.train "
                        f"experiment=<its experiment>), or point at another run folder")
    raise UserError(f"no finished run at {str(p)!r}: run the step that writes it first (its run folder has "
                    f"{RECORD} and {CONFIG})")


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint a path stands for: a file as is; a run folder's best checkpoint (else its last);
    a folder of runs: its newest finished run's. This is how a training stage finds the previous
    stage's weights (base -> SP -> RL)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        record = p / RECORD
        ckpt_dir = p / CHECKPOINTS
        if record.is_file():
            best = json.loads(record.read_text()).get("checkpoints", {}).get("best")
            # The record holds the path it was written with; a run folder moved since keeps the file.
            for candidate in (Path(best), ckpt_dir / Path(best).name) if best else ():
                if candidate.is_file():
                    return candidate
        if (ckpt_dir / "last.ckpt").is_file():
            return ckpt_dir / "last.ckpt"
        ckpts = sorted(ckpt_dir.glob("*.ckpt"), key=lambda f: f.stat().st_mtime) if ckpt_dir.is_dir() else []
        if ckpts:
            return ckpts[-1]
        run = newest_run(p)
        if run is not None:
            return resolve_checkpoint(run)
        raise UserError(f"folder {str(p)!r} holds no checkpoint ({CHECKPOINTS}/*.ckpt) and no finished run: run "
                        f"the training stage that writes it first, or pass a .ckpt file")
    raise UserError(f"checkpoint {str(p)!r} not found: pass ckpt_path=<a .ckpt file or a training run folder "
                    f"under logs/train/runs/>")


def pin_references(cfg: DictConfig) -> DictConfig:
    """Upgrade renamed targets and pin every run reference in ``cfg`` (in place; ``hydra`` is left alone).

    ``pretrained`` and ``checkpoint`` keys that name a folder become the checkpoint file it stands for
    (:func:`resolve_checkpoint`); ``run`` keys that name a folder of runs become that run folder. A path
    that does not exist is left for the loader to report.
    """
    upgrade_targets(cfg)
    stack: list[Any] = [v for k, v in cfg.items_ex(resolve=False) if k != "hydra"]
    while stack:
        node = stack.pop()
        if not isinstance(node, (DictConfig, ListConfig)) or node._is_none() or node._is_missing():
            continue
        if isinstance(node, ListConfig):
            stack.extend(node._iter_ex(resolve=False))
            continue
        for key in ("pretrained", "checkpoint", "run"):
            value = node.get(key) if key in node else None
            if isinstance(value, str) and Path(value).expanduser().is_dir():
                node[key] = str(find_run(value) if key == "run" else resolve_checkpoint(value))
        stack.extend(v for _, v in node.items_ex(resolve=False))
    return cfg


# -------------------------------------------------------------------------------------------- records
def output_dir() -> Path:
    """The current run's folder (Hydra's ``runtime.output_dir``)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The run's resolved config as plain containers, without Hydra's own node."""
    return {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in cfg.items() if k != "hydra"}


def write_run_record(cfg: DictConfig, record: dict[str, Any], out: Path | None = None) -> Path:
    """Write the resolved config (``config.yaml``) and the run record (``metrics.json``) into the run folder."""
    out = out or output_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(OmegaConf.to_yaml(run_config(cfg)))
    path = out / RECORD
    path.write_text(json.dumps(_jsonable(record), indent=2, sort_keys=True))
    log.info("run record: %s", path)
    return path


def read_run(run: str | Path) -> tuple[Path, DictConfig, dict[str, Any]]:
    """A finished run's folder, config (targets upgraded to today's names) and record."""
    folder = find_run(run)
    cfg_file = folder / CONFIG
    if not cfg_file.is_file():
        raise UserError(f"run folder {str(folder)!r} has no {CONFIG}: pass a folder written by experiments.*")
    cfg = OmegaConf.load(cfg_file)
    upgrade_targets(cfg, where=str(cfg_file))
    return folder, cfg, json.loads((folder / RECORD).read_text())


def _jsonable(x: Any) -> Any:
    import torch

    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Path):
        return str(x)
    return x


# -------------------------------------------------------------------------------------------- loading
def _without_pretrained(node: Any) -> Any:
    """Null every ``pretrained`` key: the run's own checkpoint is loaded afterwards."""
    if isinstance(node, DictConfig):
        for k in node:
            if k == "pretrained":
                node[k] = None
            else:
                _without_pretrained(node[k])
    return node


def _trained_net(folder: Path, cfg: DictConfig, record: dict[str, Any]) -> nn.Module:
    if "model" not in cfg or "net" not in cfg.model:
        raise UserError(f"{str(folder)!r} is not a training run of a model (no model.net in its {CONFIG})")
    net = instantiate(_without_pretrained(cfg.model.net))
    load_pretrained(net, resolve_checkpoint(folder))
    point = record.get("operating_point")
    if point and isinstance(net, SkipResNet):  # the gate threshold the run chose on val (operating_cost_pct)
        net.threshold = float(point["threshold"])
    return net.eval()


def load_net(run: str | Path) -> nn.Module:
    """A trained network from its training run (its own config builds it, its best checkpoint fills
    it), in eval mode: what a cascade stage config names."""
    folder, cfg, record = read_run(run)
    return _trained_net(folder, cfg, record)


def load_stage(net: nn.Module, checkpoint: str | Path | None = None) -> nn.Module:
    """``net`` with weights from ``checkpoint`` (a file, a run folder or a folder of runs), in eval mode.

    For stages whose weights come from outside a run (torchvision's ImageNet files) and for cascade
    configs written before stages named their run (``cascades.load_stage``).
    """
    if checkpoint is not None:
        load_pretrained(net, resolve_checkpoint(checkpoint))
    return net.eval()


def _data_facts(cfg: DictConfig) -> tuple[tuple[int, ...] | None, int | None]:
    d = cfg.get("data") or {}
    shape = (int(d.in_chans), int(d.image_size), int(d.image_size)) if "in_chans" in d and "image_size" in d else None
    return shape, (int(d.num_classes) if "num_classes" in d else None)


def load_run(run: str | Path, name: str | None = None, kind: str | None = None, thresholds: Sequence[float] = (),
             seed: int = 0, match: str | None = None, frontier: bool = True, int8: bool = False,
             calibration_batches: int = 8, compile: bool = False, compile_backend: str = "inductor",
             **legacy: Any) -> ModelAdapter:
    """The model a run folder holds, behind the right adapter.

    Args:
        run: a run reference: a training run (a plain classifier -> :class:`gating.adapters.StaticAdapter`,
            a SkipNet -> :class:`skipnet.SkipNetAdapter`, an IDK-head run -> :class:`cascades.CascadeAdapter`)
            or an ``experiments.cascade`` run (a calibrated cascade -> :class:`cascades.CascadeAdapter`).
        name: the model's name in reports and on the server (default: the run's name).
        kind: ``"random_skip"`` for random skipping on a SkipNet run's network (else the run's own kind).
        thresholds: SkipNet: extra operating points, one per gate threshold.
        seed, match: random skipping: the seed, and the SkipNet model whose per-block rates to copy.
        frontier: cascades: the run's epsilon frontier as extra operating points.
        int8: quantize the network to int8 (:func:`models.quantize.quantize_int8`: a classifier whole, a
            SkipNet per block, a cascade per stage with its float thresholds; a QAT run converted with
            the ranges it learned), calibrated on ``calibration_batches`` batches of the val split of
            the run's own data. Int8 kernels run on the CPU only.
        compile: run compiled (``torch.compile``, Inductor, the batch dimension dynamic:
            :class:`gating.execution.DynamicBatchCompiled`): a classifier whole, a cascade's stages each,
            a SkipNet's residual blocks each (its gates and decisions stay eager, so rows are still
            compacted between blocks). The first calls of each input shape compile (seconds to minutes).
            ``compile_backend``: torch.compile's backend (``inductor``; ``aot_eager`` traces without
            generating code, to check a model compiles).
        **legacy: what the builders this loader replaced took (``_target_`` naming one of them,
            ``levels_from_frontier``); anything else is an error.
    """
    kind = _legacy_kind(kind, legacy)
    frontier = frontier and legacy.pop("levels_from_frontier", True)
    if legacy:
        raise UserError(f"model {name or run!r}: unknown option(s) {sorted(legacy)}; a model reference takes run, "
                        f"kind, thresholds, seed, match, frontier, int8, calibration_batches, compile, compile_backend")
    if kind is not None and kind not in KINDS:
        raise UserError(f"model {name or run!r}: kind must be one of {list(KINDS)} or left out, got {kind!r}")
    folder, cfg, record = read_run(run)
    name = name or record.get("run_name") or folder.parent.name
    shape, classes = _data_facts(cfg)
    facts = {"name": name, "input_shape": shape, "num_classes": classes}

    def as_asked(module: nn.Module) -> nn.Module:  # int8, compiled, or as it is
        return _inference_form(module, cfg, name, int8, calibration_batches, compile_backend if compile else None)

    if "cascade" in cfg and "model" not in cfg:  # an experiments.cascade run: the calibrated cascade
        node = cfg.cascade
        node.checkpoint = str(folder / CHECKPOINTS / "cascade.pt")
        return CascadeAdapter(as_asked(instantiate(node)), record.get("frontier", []) if frontier else [], **facts)
    if "cascade" in cfg.get("model", {}):  # an IDK-head training run: its learned heads
        cascade = instantiate(cfg.model.cascade)
        return CascadeAdapter(as_asked(load_cascade_state(cascade, resolve_checkpoint(folder))), **facts)
    net = as_asked(_trained_net(folder, cfg, record))
    if kind == "random_skip":
        if not isinstance(net, SkipResNet):
            raise UserError(f"random skipping needs a SkipNet run; {str(folder)!r} holds a {type(net).__name__}")
        return RandomSkipAdapter(net, seed, match, **facts)
    if isinstance(net, SkipResNet):
        return SkipNetAdapter(net, thresholds, **facts)
    return StaticAdapter(net, **facts)


def _inference_form(module: nn.Module, cfg: DictConfig, name: str, int8: bool, batches: int,
                    compile_backend: str | None) -> nn.Module:
    """``module`` as :func:`load_run` was asked to run it: int8, compiled, or as it is."""
    if int8 and compile_backend:
        raise UserError(f"model {name!r}: int8 and compile together are not supported (Inductor does not take "
                        f"the eager int8 modules); choose one")
    if compile_backend:
        return compile_for_inference(module, compile_backend)
    return _int8_of(module, cfg, batches, name) if int8 else module


def _int8_of(module: nn.Module, cfg: DictConfig, batches: int, name: str) -> nn.Module:
    """``module`` quantized to int8, calibrated on ``batches`` val batches of the run's own data."""
    from models.quantize import quantize_int8

    if "data" not in cfg:
        raise UserError(f"model {name!r}: int8 needs the run's data config to calibrate on, and its run has none")
    if batches < 1:
        raise UserError(f"model {name!r}: calibration_batches must be at least 1, got {batches}")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    calibration = [x for _, (x, _) in zip(range(batches), datamodule.val_dataloader())]
    return quantize_int8(module, calibration)


def compile_for_inference(module: nn.Module, backend: str = "inductor", options: dict[str, Any] | None = None
                          ) -> nn.Module:
    """``module`` with its static parts compiled for inference, in place where it has parts (see
    :func:`load_run`'s ``compile``): a SkipNet's blocks, a cascade's stages, else the module whole.
    ``options``: the backend's (:class:`gating.execution.DynamicBatchCompiled`)."""
    from gating.execution import DynamicBatchCompiled

    module.eval()
    if isinstance(module, SkipResNet):
        module.replace_blocks([DynamicBatchCompiled(b, backend, options=options) for b in module.blocks()])
        return module
    if isinstance(module, IDKCascade):
        for k, stage in enumerate(module.stages):
            module.stages[k] = DynamicBatchCompiled(stage, backend, options=options)
        return module
    return DynamicBatchCompiled(module, backend, options=options)


def _legacy_kind(kind: str | None, legacy: dict[str, Any]) -> str | None:
    target = legacy.pop("_target_", None)
    if target is None:
        return kind
    if target not in REFERENCE_BUILDERS:
        raise UserError(f"a model reference names _target_ {target!r}: give run=<a run folder> (and options) instead")
    return kind or REFERENCE_BUILDERS[target].get("kind")
