"""Run folders and the one model loader: every kind of run becomes its adapter, references are pinned,
and runs written before the modules moved (old ``_target_`` names) still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from cascades import CascadeAdapter, build_cascade
from experiments.runs import find_run, load_net, load_run, pin_references, resolve_checkpoint
from gating import UserError
from gating.adapters import StaticAdapter
from gating.idk import MaxProbIDK
from models import create_model
from skipnet import RandomSkipAdapter, SkipNetAdapter

DATA = {"_target_": "experiments.data.DigitsDataModule", "name": "digits", "num_classes": 10, "in_chans": 1,
        "image_size": 8}
# How configs named things before the layout of issue 11 (gating.create_model, skipnet.SkipResNet, ...).
OLD_SKIPNET = {
    "_target_": "skipnet.SkipNetModule", "name": "skipnet20",
    "net": {"_target_": "skipnet.SkipResNet", "threshold": 0.5, "pretrained": "/gone/digits_skipnet20_sp",
            "backbone": {"_target_": "gating.create_model", "model_name": "resnet20_cifar", "num_classes": 10,
                         "in_chans": 1, "pretrained": None},
            "gate": {"_target_": "gating.gates.RNNGate", "_partial_": True, "embed_dim": 10, "hidden_dim": 10}},
}
OLD_STATIC = {"_target_": "gating.classifier.ClassifierModule", "name": "tiny_cnn",
              "net": {"_target_": "gating.create_model", "model_name": "tiny_cnn", "width": 4, "num_classes": 10,
                      "in_chans": 1}}


def _write_run(folder: Path, config: dict, state: dict[str, torch.Tensor], name: str, ckpt_name: str = "best.ckpt",
               extra: dict | None = None) -> Path:
    ckpt = folder / "checkpoints" / ckpt_name
    ckpt.parent.mkdir(parents=True)
    torch.save({"state_dict": state}, ckpt)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    record = {"run_name": name, "checkpoints": {"best": str(ckpt), "last": None}, **(extra or {})}
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def _train_run(folder: Path, model_cfg: dict, net: torch.nn.Module, name: str) -> Path:
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    return _write_run(folder, {"task_name": "train", "data": DATA, "model": model_cfg}, state, name)


def test_old_training_runs_load_as_their_kind(tmp_path):
    torch.manual_seed(0)
    sk = create_model("skipnet20_cifar", num_classes=10, in_chans=1).eval()
    cnn = create_model("tiny_cnn", num_classes=10, in_chans=1, width=4).eval()
    runs = tmp_path / "runs"
    _train_run(runs / "digits_skipnet20_rl" / "2026-01-01_00-00-00", OLD_SKIPNET, sk, "digits_skipnet20_rl")
    _train_run(tmp_path / "runs" / "digits_tiny_cnn" / "2026-01-01_00-00-00", OLD_STATIC, cnn, "digits_tiny_cnn")
    x = torch.randn(16, 1, 8, 8)

    adapter = load_run(tmp_path / "runs" / "digits_skipnet20_rl", thresholds=[0.7])  # a folder of runs: its newest
    assert isinstance(adapter, SkipNetAdapter) and adapter.name == "digits_skipnet20_rl"
    assert adapter.input_shape == (1, 8, 8) and adapter.num_classes == 10
    assert [p.label for p in adapter.points] == ["default", "thr=0.7"]
    with torch.no_grad():
        want = sk(x)
    out = adapter.run(x)
    assert torch.allclose(out.logits, want.logits, atol=1e-5) and torch.equal(out.executed, want.executed)
    assert torch.allclose(out.flops, sk.cost_table(x[:1]).per_sample(want.executed))

    rnd = load_run(tmp_path / "runs" / "digits_skipnet20_rl", kind="random_skip", match="sk", name="rnd")
    assert isinstance(rnd, RandomSkipAdapter) and rnd.match_name == "sk" and rnd.name == "rnd"
    static = load_run(tmp_path / "runs" / "digits_tiny_cnn")
    assert isinstance(static, StaticAdapter)
    assert torch.allclose(static.run(x).logits, cnn(x), atol=1e-6)
    assert torch.allclose(load_net(tmp_path / "runs" / "digits_tiny_cnn")(x), cnn(x), atol=1e-6)
    with pytest.raises(UserError, match="needs a SkipNet run"):
        load_run(tmp_path / "runs" / "digits_tiny_cnn", kind="random_skip")
    with pytest.raises(UserError, match="unknown option"):
        load_run(tmp_path / "runs" / "digits_tiny_cnn", threshold=0.7)
    # The builders load_run replaced still work by name in a model list (an old evaluation config).
    legacy = load_run(tmp_path / "runs" / "digits_skipnet20_rl", _target_="experiments.evaluation.random_skip_from_run")
    assert isinstance(legacy, RandomSkipAdapter)


def test_an_old_cascade_run_loads_with_its_frontier(tmp_path):
    torch.manual_seed(0)
    lin = create_model("linear", num_classes=10, in_chans=1, image_size=8).eval()
    cnn = create_model("tiny_cnn", num_classes=10, in_chans=1, width=4).eval()
    runs = tmp_path / "logs" / "train" / "runs"
    _train_run(runs / "digits_linear" / "0", {"net": {"_target_": "gating.create_model", "model_name": "linear"}},
               lin, "digits_linear")
    _train_run(runs / "digits_tiny_cnn" / "0", OLD_STATIC, cnn, "digits_tiny_cnn")
    cascade = build_cascade({"linear": lin, "tiny_cnn": cnn}, MaxProbIDK(), thresholds=[0.2], temperatures=[1.5, 0.9])
    stage = {"_target_": "cascades.load_stage"}  # how stages were named before they named their run
    old_cfg = {"task_name": "cascade", "data": DATA, "cascade": {
        "_target_": "cascades.build_cascade", "_convert_": "all", "name": "linear-tiny_cnn", "checkpoint": None,
        "decider": {"_target_": "gating.idk.MaxProbIDK", "_partial_": True},
        "stages": {"linear": {**stage, "checkpoint": str(runs / "digits_linear"),
                              "net": {"_target_": "gating.create_model", "model_name": "linear", "num_classes": 10,
                                      "in_chans": 1, "image_size": 8}},
                   "tiny_cnn": {**stage, "checkpoint": str(runs / "digits_tiny_cnn"), "net": OLD_STATIC["net"]}}}}
    state = {f"cascade.{k}": v for k, v in cascade.state_dict().items()}
    frontier = [{"epsilon": 0.01, "thresholds": [0.5]}, {"epsilon": 1.0, "thresholds": ["-inf"]}]
    folder = _write_run(tmp_path / "logs" / "cascade" / "runs" / "c" / "0", old_cfg, state, "c", "cascade.pt",
                        {"frontier": frontier})
    adapter = load_run(folder.parent)
    assert isinstance(adapter, CascadeAdapter) and adapter.num_stages == 2
    assert [p.label for p in adapter.points] == ["default", "eps=0.01", "eps=1"]  # eps=1 is first-stage only
    x = torch.randn(40, 1, 8, 8)
    with torch.no_grad():
        want = cascade(x)
    out = adapter.run(x)
    assert torch.equal(out.exit_stage, want.exit_stage) and torch.allclose(out.logits, want.logits, atol=1e-5)
    assert out.flops.tolist() == cascade.stage_costs(x).per_sample(want.exit_stage).tolist()


def test_references_are_pinned_to_the_run_and_checkpoint_they_stand_for(tmp_path):
    cnn = create_model("tiny_cnn", num_classes=10, in_chans=1, width=4)
    older = _train_run(tmp_path / "runs" / "a" / "2026-01-01_00-00-00", OLD_STATIC, cnn, "a")
    newer = _train_run(tmp_path / "runs" / "a" / "2026-02-01_00-00-00", OLD_STATIC, cnn, "a")
    (tmp_path / "runs" / "a" / "2026-03-01_00-00-00").mkdir()  # not finished: no metrics.json
    assert find_run(tmp_path / "runs" / "a") == newer != older
    cfg = OmegaConf.create({"model": {"net": {"_target_": "gating.create_model",
                                              "pretrained": str(tmp_path / "runs" / "a")}},
                            "stage": {"run": str(tmp_path / "runs" / "a")}, "other": {"run": "/not/there"},
                            "hydra": {"run": str(tmp_path / "runs" / "a")}})
    pin_references(cfg)
    assert cfg.model.net.pretrained == str(newer / "checkpoints" / "best.ckpt")
    assert cfg.model.net._target_ == "models.create_model"  # renamed targets are upgraded too
    assert cfg.stage.run == str(newer) and cfg.other.run == "/not/there"  # what is not there is the loader's to report
    assert cfg.hydra.run == str(tmp_path / "runs" / "a")  # Hydra's own node is left alone
    with pytest.raises(UserError, match="not found: train"):
        load_run(tmp_path / "runs" / "nope")


def test_a_moved_run_folder_still_finds_its_best_checkpoint(tmp_path):
    cnn = create_model("tiny_cnn", num_classes=10, in_chans=1, width=4)
    run = _train_run(tmp_path / "old" / "0", OLD_STATIC, cnn, "a")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not this one")
    moved = tmp_path / "new" / "0"
    shutil.move(str(run.parent), str(moved.parent))
    assert resolve_checkpoint(moved) == moved / "checkpoints" / "best.ckpt"  # the record names the old path
    assert isinstance(load_run(moved), StaticAdapter)
