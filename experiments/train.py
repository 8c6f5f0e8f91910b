"""Train a model and test its best checkpoint.

    python -m experiments.train experiment=mnist_resnet38
    python -m experiments.train -m experiment=mnist_resnet20,mnist_resnet38      # a sweep

The run folder (``logs/train/runs/<run_name>/<time>/``) receives ``config.yaml`` (resolved),
``metrics.json`` (final metrics, checkpoint paths, timings) and ``checkpoints/``.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor

import experiments  # noqa: F401  (sets PROJECT_ROOT)
from experiments.runs import output_dir, run_config, write_run_record
from experiments.utils import (
    Stopwatch,
    count_parameters,
    extras,
    instantiate_list,
    metrics_dict,
    run_hydra,
    user_facing,
)

log = logging.getLogger(__name__)


@user_facing
def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test as the config says; returns the run record (also written to ``metrics.json``)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    model: pl.LightningModule = instantiate(cfg.model)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    if not loggers:  # the LR monitor has nowhere to write without a logger
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(run_config(cfg))

    watch = Stopwatch()
    if cfg.get("train"):
        with watch("fit_s"):
            trainer.fit(model=model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    train_metrics = metrics_dict(trainer.callback_metrics)
    # Read the paths now: testing a checkpoint restores the callback's state as it was in that file.
    ckpt = trainer.checkpoint_callback
    best = getattr(ckpt, "best_model_path", "") or None
    last = getattr(ckpt, "last_model_path", "") or None
    global_step = trainer.global_step
    test_metrics: dict[str, float] = {}
    if cfg.get("test"):
        with watch("test_s"):
            if best is None and cfg.get("train"):
                log.warning("no best checkpoint (checkpointing off or fast_dev_run): testing the current weights")
            trainer.test(model=model, datamodule=datamodule, ckpt_path=best if cfg.get("train") else None)
        test_metrics = metrics_dict(trainer.callback_metrics)

    record = {
        "task": cfg.task_name,
        "run_name": cfg.get("run_name"),
        "output_dir": str(output_dir()),
        "metrics": {**train_metrics, **test_metrics},
        "checkpoints": {"best": best, "last": last},
        "timings": watch.times,
        "global_step": global_step,
        "model": {"name": cfg.model.get("name"), "params": count_parameters(model)},
        "data": {"name": cfg.data.get("name"), "splits": datamodule.split_sizes()
                 if hasattr(datamodule, "split_sizes") else None},
    }
    if getattr(model, "operating_point", None):  # a gate threshold chosen on val: every later loader uses it
        record["operating_point"] = model.operating_point
    if getattr(model, "test_report", None):  # dynamic models: execution rates, skip patterns, ...
        record["test_report"] = model.test_report
    if getattr(model, "test_inputs", None):  # does the cost follow the input? (by severity where recorded)
        from experiments.evaluation.adaptivity import run_adaptivity

        levels = datamodule.difficulty("test") if hasattr(datamodule, "difficulty") else None
        record["adaptivity"] = run_adaptivity(model.test_inputs, None if levels is None else levels.numpy())
    write_run_record(cfg, record)
    for key in ("val/acc_best", "test/acc", "test/gflops_per_img"):
        if key in record["metrics"]:
            log.info("%s = %.4f", key, record["metrics"][key])
    return record


@hydra.main(version_base="1.3", config_path="../configs", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    extras(cfg)
    record = train(cfg)
    metric = cfg.get("optimized_metric")
    return record["metrics"].get(metric) if metric else None


if __name__ == "__main__":
    run_hydra(main)
