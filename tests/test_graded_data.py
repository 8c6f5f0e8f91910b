"""Graded-difficulty data (mnist_c, digits_c): deterministic corruptions, severity labels, every split mixed."""

from __future__ import annotations

import pytest
import torch

from experiments.data import DigitsDataModule, GradedDigitsDataModule, GradedMNISTDataModule, MNISTDataModule
from experiments.data.corrupted import CORRUPTIONS, corrupt, draw_corruptions
from tests.conftest import MNIST_T10K, compose_config, needs_mnist


def test_corruptions_are_deterministic_and_graded():
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(12, 1, 28, 28, generator=g) * 255).to(torch.uint8)
    family, severity = draw_corruptions(12, seed=5)
    assert torch.equal(family, draw_corruptions(12, seed=5)[0]) and not torch.equal(severity,
                                                                                    draw_corruptions(12, seed=6)[1])
    a, b = corrupt(images, family, severity, seed=5), corrupt(images, family, severity, seed=5)
    assert torch.equal(a, b) and a.dtype == torch.uint8
    clean = severity == 0
    assert torch.equal(a[clean], images[clean])  # severity 0 is the image itself
    # For every family, a stronger severity moves the image further from the original.
    digit = torch.zeros(1, 1, 28, 28, dtype=torch.uint8)
    digit[..., 6:22, 12:16] = 255
    digit[..., 6:10, 8:20] = 255
    for k, name in enumerate(CORRUPTIONS):
        dist = [(corrupt(digit, torch.tensor([k]), torch.tensor([s]), seed=1).float() - digit.float()).abs().mean()
                for s in (1, 3, 5)]
        assert dist[0] > 0 and dist[2] > dist[0], name


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown corruption"):
        draw_corruptions(4, 0, ("gaussian_noise", "snow"))


def _mix_ok(dm) -> None:
    for split in ("train", "val", "test"):
        mix = dm.mix(split)
        assert all(c > 0 for c in mix["severity"]), (split, mix)  # every split mixes every severity
        assert set(mix["family"]) == {"clean", *dm.families}
        assert dm.difficulty(split).tolist() == getattr(dm, f"data_{split}").difficulty.tolist()


def test_digits_c_keeps_the_split_and_labels_severity():
    dm, plain = GradedDigitsDataModule(augment=False), DigitsDataModule(augment=False)
    dm.setup()
    plain.setup()
    assert dm.split_sizes() == plain.split_sizes()
    assert torch.equal(dm.data_test.targets, plain.data_test.targets)  # same images, same order
    sev = dm.data_test.difficulty
    same = (dm.data_test.images == plain.data_test.images).flatten(1).all(1)
    assert torch.equal(same[sev == 0], torch.ones(int((sev == 0).sum()), dtype=torch.bool))
    assert same[sev > 0].float().mean() < 0.05  # corrupted images differ (a rare occlusion can miss the digit)
    _mix_ok(dm)
    again = GradedDigitsDataModule(augment=False)
    again.setup()
    assert torch.equal(again.data_test.images, dm.data_test.images)
    other = GradedDigitsDataModule(augment=False, corruption_seed=1)
    other.setup()
    assert not torch.equal(other.data_test.difficulty, sev)
    only = GradedDigitsDataModule(families=["occlusion"])
    only.setup()
    assert set(only.mix("test")["family"]) == {"clean", "occlusion"}


def test_data_config_builds_the_graded_module(tmp_path):
    from hydra.utils import instantiate

    cfg = compose_config("train.yaml", ["data=digits_c", "data.families=[contrast]"], tmp_path)
    dm = instantiate(cfg.data)
    assert isinstance(dm, GradedDigitsDataModule) and dm.families == ("contrast",) and dm.name == "digits_c"


@needs_mnist
def test_mnist_c_keeps_the_t10k_split_and_mixes_severities():
    dm, plain = GradedMNISTDataModule(data_dir=str(MNIST_T10K), augment=False), MNISTDataModule(str(MNIST_T10K))
    dm.setup()
    plain.setup()
    assert dm.split_sizes() == {"train": 7000, "val": 1000, "test": 2000}
    assert torch.equal(dm.data_test.targets, plain.data_test.targets)
    _mix_ok(dm)
    sev = dm.data_test.difficulty
    assert torch.equal(dm.data_test.images[sev == 0], plain.data_test.images[sev == 0])


@pytest.mark.parametrize("config,experiment", [
    ("train.yaml", "mnist_c_resnet38"), ("train.yaml", "mnist_c_skipnet38_sp"), ("train.yaml", "mnist_c_skipnet38_rl"),
    ("train.yaml", "mnist_c_skipnet38_gumbel"), ("cascade.yaml", "mnist_c_cascade_3stage"),
    ("eval.yaml", "mnist_c_eval_dynamic"), ("train.yaml", "digits_c_skipnet20_rl"),
    ("eval.yaml", "digits_c_eval_dynamic"),
])
def test_graded_study_configs_name_graded_runs_only(tmp_path, config, experiment):
    """Every run a graded-study config trains from or evaluates is a run of the graded data set."""
    from omegaconf import OmegaConf

    cfg = compose_config(config, [f"experiment={experiment}"], tmp_path)
    prefix = experiment.split("_")[0] + "_c"
    assert cfg.data.name == prefix
    refs = [v for k, v in _walk(OmegaConf.to_container(cfg, resolve=False)) if k in ("run", "pretrained") and v]
    resolved = [str(v).replace("${paths.log_dir}", "").replace("${data.name}", cfg.data.name) for v in refs]
    assert all(f"/{prefix}_" in r for r in resolved), resolved
    if config == "eval.yaml":
        assert cfg.evaluation.difficulty.kind == "severity"


def _walk(node, key=None):
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "hydra":
                yield from _walk(v, k)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)
    else:
        yield key, node
