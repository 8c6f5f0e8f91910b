"""Shared fixtures: the real configs composed and shrunk for fast CPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

os.environ.setdefault("WANDB_MODE", "disabled")  # tests never talk to wandb
import experiments  # noqa: E402,F401  (sets PROJECT_ROOT)
from experiments.cascade import run_cascade  # noqa: E402
from experiments.train import train  # noqa: E402
from tests.helpers.fake_data import skip_integrity_checks  # noqa: E402,F401

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "configs")
MNIST_T10K = ROOT.parent / "shared" / "data" / "mnist-t10k"

needs_mnist = pytest.mark.skipif(
    not (MNIST_T10K / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"the real MNIST test set is not at {MNIST_T10K} (it is beside the repository on the project's machines)",
)


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a real entry-point config with overrides, pointing every output at ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir / "logs")
        cfg.hydra.runtime.output_dir = str(output_dir)
        if "extras" in cfg:
            cfg.extras.print_config = False
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


def shrink(cfg: DictConfig) -> DictConfig:
    """One short CPU epoch without external loggers."""
    with open_dict(cfg):
        cfg.trainer.accelerator = "cpu"
        cfg.trainer.devices = 1
        cfg.trainer.max_epochs = 1
        cfg.trainer.max_steps = -1
        cfg.trainer.limit_train_batches = 2
        cfg.trainer.limit_val_batches = 1
        cfg.trainer.limit_test_batches = 1
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        cfg.data.num_workers = 0
        cfg.data.pin_memory = False
        cfg.logger = None
    return cfg


@pytest.fixture
def train_cfg(tmp_path) -> DictConfig:
    """train.yaml on synthetic data with a tiny CNN, one short epoch on the CPU."""
    return shrink(compose_config("train.yaml", ["data=synthetic", "model=tiny_cnn"], tmp_path))


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory):
    """Every run the digits evaluation reads, trained for a couple of steps."""
    root = tmp_path_factory.mktemp("digits")
    logs = root / "logs"
    for exp in ("digits_linear", "digits_tiny_cnn", "digits_resnet20", "digits_skipnet20_sp", "digits_skipnet20_rl"):
        out = logs / "train" / "runs" / exp / "0"
        cfg = shrink(compose_config("train.yaml", [f"experiment={exp}"], out))
        with open_dict(cfg):
            cfg.paths.log_dir = str(logs)
            cfg.trainer.max_epochs = 1
            cfg.trainer.limit_train_batches = 3
            cfg.trainer.limit_val_batches = 2
            cfg.trainer.limit_test_batches = 2
            cfg.callbacks.early_stopping = None
            cfg.callbacks.lr_monitor = None
            if "skipnet20_sp" in exp:
                cfg.model.net.backbone.pretrained = str(logs / "train" / "runs" / "digits_resnet20")
            if "skipnet20_rl" in exp:
                cfg.model.net.pretrained = str(logs / "train" / "runs" / "digits_skipnet20_sp")
        train(cfg)
    out = logs / "cascade" / "runs" / "digits_linear-tiny_cnn-resnet20_max_prob" / "0"
    cfg = compose_config("cascade.yaml", ["experiment=digits_cascade_3stage"], out)
    with open_dict(cfg):
        cfg.paths.log_dir = str(logs)
        cfg.device = "cpu"
        cfg.latency.repeats = 2
    for node in cfg.cascade.stages.values():  # compose_config re-points log_dir after interpolation
        node.run = str(logs / "train" / "runs" / node.run.split("/")[-1])
    run_cascade(cfg)
    return logs
