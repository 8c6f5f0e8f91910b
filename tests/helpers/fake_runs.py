"""Finished training runs with untrained weights, in the real run-folder layout (config.yaml,
metrics.json, checkpoints/), for tests of the steps that read runs (cascades, evaluation, serving)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from experiments.runs import write_run_record

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def write_untrained_run(folder: Path, experiment: str, data: DictConfig) -> Path:
    """The run ``python -m experiments.train experiment=<experiment>`` would write, with the model as
    initialised (no training) and ``data`` as its data config. Leaves Hydra's global state alone."""
    GlobalHydra.instance().clear()
    # A distilled run (<experiment>_kd_<teacher>, from distill=<teacher>) has its experiment's network;
    # a pruned one (<experiment>_pruned, from prune=l1_50) its experiment's, pruned.
    base = experiment.partition("_kd_")[0]
    overrides = ([f"experiment={base.removesuffix('_pruned')}", "prune=l1_50"] if base.endswith("_pruned")
                 else [f"experiment={base}"])
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name="train.yaml", overrides=overrides)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.data = OmegaConf.create(OmegaConf.to_container(data, resolve=True))
        cfg.paths = {"root_dir": "", "data_dir": "", "log_dir": str(folder.parent), "output_dir": str(folder)}
        for node in (cfg.model.net, cfg.model.net.get("backbone")):  # untrained: it starts from no earlier stage
            if node is not None and "pretrained" in node:
                node.pretrained = None
    net = instantiate(cfg.model.net)
    ckpt = folder / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"net.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    record = {"task": "train", "run_name": experiment, "checkpoints": {"best": str(ckpt), "last": str(ckpt)},
              "metrics": {}}
    plain = {"model": OmegaConf.to_container(cfg.model, resolve=True), "data": OmegaConf.to_container(cfg.data)}
    write_run_record(OmegaConf.create(plain), record, folder)
    return folder


def write_stage_runs(cfg: DictConfig, log_dir: Path) -> None:
    """An untrained run for every cascade stage of ``cfg`` that names a run (ensemble members too)."""
    stages = list(cfg.cascade.stages.values())
    while stages:
        stage = stages.pop()
        if "run" in stage:
            name = Path(stage.run).name
            write_untrained_run(log_dir / "train" / "runs" / name / "0", name, cfg.data)
        stages.extend((stage.get("members") or {}).values())
