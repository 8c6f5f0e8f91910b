"""Evaluate: compare dynamic models per input difficulty, or test one trained checkpoint.

    python -m experiments.eval experiment=mnist_eval_dynamic        # SkipNet, cascades, baselines, per difficulty
    python -m experiments.eval experiment=mnist_resnet38 ckpt_path=logs/train/runs/mnist_resnet38/<time>

With an ``evaluation`` node (the ``*_eval_*`` experiments) every listed method runs on every test
input through :mod:`experiments.evaluation`: per-input records (``records.csv``), operating points
(``points.csv``, ``pareto.csv``), the table per difficulty bucket (``buckets.csv``, ``report.md``), and
``accuracy_vs_gflops.png``, ``accuracy_vs_latency.png``, ``bucket_cost.png``; wandb gets the tables
and plots when ``logger=wandb``.

Without it, ``ckpt_path`` (a ``.ckpt`` file or a training run folder) is tested with Lightning; the
model and data configs must match the checkpoint's (the same ``experiment=``).
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig

import experiments  # noqa: F401
from experiments.runs import output_dir, resolve_checkpoint, write_run_record
from experiments.utils import extras, instantiate_list, metrics_dict, run_hydra, user_facing
from gating.errors import UserError

log = logging.getLogger(__name__)


@user_facing
def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Load the checkpoint into the configured model and test it; returns the run record."""
    ckpt = resolve_checkpoint(cfg.ckpt_path)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule: pl.LightningDataModule = instantiate(cfg.data)
    model: pl.LightningModule = instantiate(cfg.model)
    loggers = instantiate_list(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=[])
    try:
        if cfg.get("split", "test") == "val":
            trainer.validate(model=model, datamodule=datamodule, ckpt_path=str(ckpt))
        else:
            trainer.test(model=model, datamodule=datamodule, ckpt_path=str(ckpt))
    except RuntimeError as e:
        if "state_dict" in str(e):
            raise UserError(f"checkpoint {str(ckpt)!r} does not fit model {cfg.model.get('name')!r}: evaluate with "
                            f"the experiment it was trained with (experiment=...)") from None
        raise
    record = {
        "task": cfg.task_name,
        "checkpoint": str(ckpt),
        "split": cfg.get("split", "test"),
        "output_dir": str(output_dir()),
        "metrics": metrics_dict(trainer.callback_metrics),
    }
    write_run_record(cfg, record)
    return record


@hydra.main(version_base="1.3", config_path="../configs", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    if cfg.get("evaluation"):
        from experiments.evaluation.run import compare

        compare(cfg)
    else:
        evaluate(cfg)


if __name__ == "__main__":
    run_hydra(main)
