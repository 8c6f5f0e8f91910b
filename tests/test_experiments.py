"""Every experiment config composes and runs one fast_dev_run step on the CPU, on small files in the
real formats of its data set."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import open_dict

from experiments.train import train
from tests.conftest import ROOT, compose_config, shrink
from tests.helpers.fake_data import write_cifar, write_image_folder, write_mnist_full, write_svhn
from tests.helpers.fake_runs import write_stage_runs

ALL_EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
# Experiments of `python -m experiments.cascade` (tests/test_cascade_run.py); the rest are training runs.
CASCADE_EXPERIMENTS = [e for e in ALL_EXPERIMENTS if "_cascade_" in e]
# Of `python -m experiments.eval` (tests/test_evaluation.py) and `python -m experiments.serve` (tests/test_serve.py).
EVAL_EXPERIMENTS = [e for e in ALL_EXPERIMENTS if "_eval_" in e]
SERVE_EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e.endswith("_serve")]
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e not in CASCADE_EXPERIMENTS + EVAL_EXPERIMENTS + SERVE_EXPERIMENTS]


def _fake_data_for(cfg, tmp_path: Path) -> None:
    """Point the experiment's data module at small files of its format."""
    name = cfg.data.name
    with open_dict(cfg):
        if name in ("mnist", "mnist_c"):  # mnist_c grades torchvision's layout the same way
            cfg.data.data_dir = str(write_mnist_full(tmp_path / "mnist", n_train=40, n_test=16))
            cfg.data.val_size = 8
        elif name in ("cifar10", "cifar100"):
            cfg.data.data_dir = str(write_cifar(tmp_path / name, hundred=name == "cifar100"))
            cfg.data.val_size = 10
            cfg.data.download = False
        elif name == "svhn":
            cfg.data.data_dir = str(write_svhn(tmp_path / "svhn", n=24))
            cfg.data.val_size = 4
            cfg.data.download = False
        elif name == "imagenet":
            cfg.data.data_dir = str(write_image_folder(tmp_path / "imagenet", classes=3, per_class=4))
            cfg.data.num_classes = 3
            cfg.data.image_size = 64
            cfg.data.val_size = 2
        cfg.data.batch_size = 4
        cfg.data.eval_batch_size = 4
        if "cascade" in cfg:  # untrained runs for the stages (ensemble members included)
            write_stage_runs(cfg, Path(cfg.paths.log_dir))
            stages = list(cfg.cascade.stages.values())
            while stages:  # weights from outside a run (torchvision's ImageNet files): random ones instead
                stage = stages.pop()
                if "checkpoint" in stage:
                    stage.checkpoint = None
                stages.extend((stage.get("members") or {}).values())
            cfg.cascade.checkpoint = None
        if "model" in cfg and "skipnet" in cfg.model.get("name", ""):  # start from scratch instead of a previous stage's run
            cfg.model.net.pretrained = None
            cfg.model.net.backbone.pretrained = None


def test_experiments_are_found():
    assert {"digits_resnet20", "mnist_resnet20", "mnist_resnet38", "mnist_resnet74", "mnist_linear", "mnist_mlp",
            "mnist_tiny_cnn", "cifar10_resnet110"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(experiment, tmp_path, skip_integrity_checks):
    cfg = shrink(compose_config("train.yaml", [f"experiment={experiment}"], tmp_path))
    _fake_data_for(cfg, tmp_path)
    with open_dict(cfg):
        cfg.trainer.fast_dev_run = True
        cfg.callbacks = None
    record = train(cfg)
    assert math.isfinite(record["metrics"]["train/loss_step"])  # RL losses include a signed policy term
    assert "test/acc" in record["metrics"] and record["metrics"]["test/gflops_per_img"] > 0
    assert (tmp_path / "metrics.json").is_file() and (tmp_path / "config.yaml").is_file()


def test_cifar10_resnet110_is_the_papers_recipe(tmp_path):
    cfg = compose_config("train.yaml", ["experiment=cifar10_resnet110"], tmp_path)
    assert cfg.model.net.model_name == "resnet110_cifar" and cfg.data.batch_size == 128
    assert cfg.trainer.max_steps == 64000 and list(cfg.model.scheduler.milestones) == [32000, 48000]
    opt = cfg.model.optimizer
    assert (opt.lr, opt.momentum, opt.weight_decay) == (0.1, 0.9, 1e-4)
    module = instantiate(cfg.model)
    assert module.num_classes == 10


def test_model_configs_fit_every_data_set(tmp_path):
    """The model group takes num_classes/in_chans/image_size from the data group."""
    for data, (c, n) in {"digits": (1, 10), "cifar100": (3, 100), "imagenet": (3, 1000)}.items():
        for model in ("resnet20", "tv_resnet18", "linear", "tiny_cnn"):
            cfg = compose_config("train.yaml", [f"data={data}", f"model={model}"], tmp_path)
            net = instantiate(cfg.model.net)
            assert net.num_classes == n and net.in_chans == c


PIPELINES = sorted(p.stem for p in (ROOT / "configs" / "pipeline").glob("*.yaml"))


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_pipeline_step_composes(pipeline, tmp_path):
    """Each step's overrides compose with its entry point's config, a bench step names a script of
    bench/, and a step that names its run names the run its config writes (the next steps find it)."""
    cfg = compose_config("pipeline.yaml", [f"pipeline={pipeline}"], tmp_path)
    entry = {"train": "train.yaml", "cascade": "cascade.yaml", "eval": "eval.yaml"}
    for i, step in enumerate(cfg.pipeline.steps):
        if step.task == "bench":
            assert (ROOT / "bench" / f"{step.script}.py").is_file(), step
            names = [o.split("=", 1)[1] for o in step.overrides if o.startswith("--config-name=")]
            rest = [o for o in step.overrides if not o.startswith("--")]
            compose_config(names[0] if names else f"bench/{step.script}.yaml", rest, tmp_path / f"s{i}")
            continue
        step_cfg = compose_config(entry[step.task], list(step.overrides), tmp_path / f"s{i}")
        if step.get("run"):
            assert step_cfg.run_name == step.run, (pipeline, i)


@pytest.mark.parametrize("experiment", EVAL_EXPERIMENTS)
def test_eval_experiment_composes_and_names_its_own_models(experiment, tmp_path):
    """Every evaluation experiment composes; its reference and every random-skip ``match`` name one of its
    methods, and each method names a run under the log folder (what the pipeline trains)."""
    cfg = compose_config("eval.yaml", [f"experiment={experiment}"], tmp_path)
    methods = {k: v for k, v in cfg.evaluation.methods.items() if v is not None}
    assert methods and cfg.evaluation.reference in methods
    for name, ref in methods.items():
        assert str(ref.run).startswith(cfg.paths.log_dir), name
        if ref.get("kind") == "random_skip":
            assert ref.match in methods and methods[ref.match].run == ref.run, name
