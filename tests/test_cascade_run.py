"""`python -m experiments.cascade`: every cascade experiment composes and runs end to end on small
files (random stages), writing its records; mistakes are one clear line."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch
from omegaconf import open_dict

from experiments.cascade import run_cascade
from experiments.train import train
from tests.conftest import ROOT, compose_config, shrink
from tests.test_experiments import CASCADE_EXPERIMENTS, _fake_data_for


def _small(cfg):
    with open_dict(cfg):
        cfg.device = "cpu"
        cfg.latency.batch_size = 16
        cfg.latency.repeats = 2
        cfg.latency.warmup = 1
        cfg.data.num_workers = 0
    return cfg


def test_cascade_experiments_are_found():
    assert {"mnist_cascade_2stage", "mnist_cascade_3stage", "mnist_cascade_learned"} <= set(CASCADE_EXPERIMENTS)


@pytest.mark.parametrize("experiment", CASCADE_EXPERIMENTS)
def test_cascade_experiment_runs(experiment, tmp_path, skip_integrity_checks):
    cfg = _small(compose_config("cascade.yaml", [f"experiment={experiment}"], tmp_path))
    _fake_data_for(cfg, tmp_path)
    record = run_cascade(cfg)
    k = len(record["stages"])
    m = record["metrics"]
    assert m["test/acc_ci_low"] <= m["test/acc"] <= m["test/acc_ci_high"]
    assert 0 < m["test/gflops_per_img"] <= sum(s["gflops_per_img"] for s in record["stages"]) + 1e-12
    assert len(record["operating_point"]["val"]["thresholds"]) == k - 1
    assert record["latency"]["measured_ms"] > 0
    assert record["latency"]["batch_size"] == min(16, record["operating_point"]["test"]["n"])
    for name in ("metrics.json", "config.yaml", "frontier.csv", "stages.csv", "predictions.csv"):
        assert (tmp_path / name).is_file(), name
    with (tmp_path / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == record["operating_point"]["test"]["n"]
    mean_flops = sum(float(r["flops"]) for r in rows) / len(rows)
    assert mean_flops / 1e9 == pytest.approx(m["test/gflops_per_img"])
    # The saved cascade reloads with the thresholds that were chosen.
    saved = torch.load(tmp_path / "checkpoints" / "cascade.pt", weights_only=True)
    assert saved["state_dict"]["cascade.thresholds"].tolist() == [
        float(t) for t in record["operating_point"]["val"]["thresholds"]]


def test_learned_head_trains_then_calibrates(tmp_path, skip_integrity_checks):
    """experiment=mnist_idk_head trains the head; experiment=mnist_cascade_learned loads it."""
    train_dir = tmp_path / "head"
    cfg = shrink(compose_config("train.yaml", ["experiment=mnist_idk_head"], train_dir))
    _fake_data_for(cfg, train_dir)
    with open_dict(cfg):
        cfg.trainer.max_epochs = 2
        cfg.callbacks.early_stopping = None
        cfg.callbacks.lr_monitor = None
    record = train(cfg)
    assert "test/objective" in record["metrics"] and record["metrics"]["test/gflops_per_img"] > 0
    assert record["checkpoints"]["best"]

    cfg = _small(compose_config("cascade.yaml", ["experiment=mnist_cascade_learned"], tmp_path / "cascade"))
    _fake_data_for(cfg, tmp_path / "cascade")
    with open_dict(cfg):
        cfg.cascade.checkpoint = str(train_dir)
    out = run_cascade(cfg)
    assert out["metrics"]["test/gflops_per_img"] > 0


def test_missing_stage_checkpoint_is_one_clear_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.cascade", "experiment=mnist_cascade_2stage",
         f"paths.log_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "mnist_tiny_cnn" in last and "not found: train" in last
