"""SkipNet: real skipping equals masking, skipped blocks are not run, exact per-sample cost, stage chaining."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import open_dict

from experiments.runs import pin_references, resolve_checkpoint
from experiments.train import train
from gating.cost import count_flops
from models import create_model
from models.skipnet import skipnet_from_backbone
from skipnet import SkipResNet
from tests.conftest import compose_config, shrink


def _random_actions(batch: int, blocks: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(batch, blocks, generator=g) < p).float()
    a[:, 0] = 1.0
    return a


@pytest.mark.parametrize("name,shape", [("skipnet38_cifar", (1, 28, 28)), ("skipnet110_cifar", (3, 16, 16)),
                                        ("skipnet50", (3, 64, 64))])
@pytest.mark.parametrize("seed", [0, 1])
def test_real_skipping_equals_masked_execution(name, shape, seed):
    torch.manual_seed(seed)
    net = create_model(name, num_classes=10, in_chans=shape[0]).eval()
    x = torch.randn(6, *shape)
    actions = _random_actions(6, net.num_blocks, 0.5, seed)
    with torch.no_grad():
        real = net(x, execution="skip", actions=actions)
        masked = net(x, execution="masked", actions=actions)
    assert torch.allclose(real.logits, masked.logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(real.executed, actions)


@pytest.mark.parametrize("gate", ["rnn", "ffgate1", "ffgate2"])
def test_gated_decisions_agree_between_engines(gate):
    """With the gates deciding (not forced), both engines take the same decisions and give the same output."""
    torch.manual_seed(0)
    net = create_model("skipnet38_cifar", gate=gate, in_chans=1).eval()
    # Scatter the decisions: push the gate logits around 0 so both outcomes occur.
    with torch.no_grad():
        for p in net.gate.parameters():
            p.mul_(3.0)
    x = torch.randn(16, 1, 16, 16)
    with torch.no_grad():
        real, masked = net(x), net(x, execution="masked")
    assert 0 < real.executed[:, 1:].mean() < 1
    assert torch.equal(real.executed, masked.executed)
    assert torch.allclose(real.logits, masked.logits, atol=1e-4)


def test_a_block_closed_for_every_sample_is_not_run():
    net = create_model("skipnet38_cifar", in_chans=1).eval()
    calls: dict[int, list[int]] = {}
    for i, b in enumerate(net.blocks()):
        b.register_forward_hook(lambda m, a, o, i=i: calls.setdefault(i, []).append(a[0].shape[0]))
    ds_calls = []
    net.blocks()[6].downsample.register_forward_hook(lambda m, a, o: ds_calls.append(a[0].shape[0]))
    actions = torch.ones(8, net.num_blocks)
    actions[:, 3] = 0  # an identity block, closed for all
    actions[:, 6] = 0  # the stride-2 block of stage 2, closed for all: only its shortcut runs
    actions[:4, 9] = 0  # half the batch skips block 9
    with torch.no_grad():
        net(torch.randn(8, 1, 28, 28), actions=actions)
    assert 3 not in calls and 6 not in calls
    assert ds_calls == [8]
    assert calls[9] == [4] and calls[10] == [8]


def test_batch_one_matches_batched_rows():
    torch.manual_seed(0)
    net = create_model("skipnet38_cifar", in_chans=1).eval()
    x = torch.randn(4, 1, 28, 28)
    actions = _random_actions(4, net.num_blocks, 0.5, 3)
    with torch.no_grad():
        batched = net(x, actions=actions).logits
        single = torch.cat([net(x[i : i + 1], actions=actions[i : i + 1]).logits for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-4)


@pytest.mark.parametrize("name,shape", [("skipnet38_cifar", (1, 28, 28)), ("skipnet50", (3, 64, 64))])
def test_per_sample_cost_matches_batch1_flop_counts(name, shape):
    """cost(x) = fixed + gates + executed blocks + shortcuts of skipped ones, exactly as FlopCounterMode sees it."""
    net = create_model(name, num_classes=10, in_chans=shape[0]).eval()
    x = torch.randn(5, *shape)
    table = net.cost_table(x)
    actions = _random_actions(5, net.num_blocks, 0.5, 7)
    actions[0] = 1.0
    predicted = table.per_sample(actions)
    for i in range(5):
        counted = count_flops(lambda inp: net(inp, actions=actions[i : i + 1]), x[i : i + 1])
        assert predicted[i].item() == counted
    assert table.gate_flops > 0 and predicted[0].item() == table.full_flops
    # A batch executed with real skipping costs the sum of its samples' costs.
    assert count_flops(lambda inp: net(inp, actions=actions), x) == pytest.approx(predicted.sum().item())


def test_rnn_gate_cost_is_tiny():
    net = create_model("skipnet110_cifar")
    table = net.cost_table(torch.randn(1, 3, 32, 32))
    per_gate = table.gate_flops / net.num_gates
    assert per_gate / table.block_flops[1].item() < 0.001  # SkipNet: about 0.04% of a block


@pytest.mark.parametrize("mode", ["hard_st", "soft"])
def test_supervised_pretraining_trains_every_parameter(mode):
    net = create_model("skipnet38_cifar", in_chans=1).train()
    out = net(torch.randn(4, 1, 16, 16), mode=mode)
    torch.nn.functional.cross_entropy(out.logits, torch.randint(0, 10, (4,))).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing


def test_rl_mode_gives_gate_gradients_through_log_probs():
    torch.manual_seed(0)
    net = create_model("skipnet38_cifar", in_chans=1).train()
    out = net(torch.randn(8, 1, 16, 16), mode="sample", execution="skip")
    assert out.log_probs.shape == (8, net.num_gates)
    out.log_probs.sum().backward()
    assert all(p.grad is not None for p in net.gate.parameters())
    with pytest.raises(ValueError, match="execution='masked'"):
        net(torch.randn(2, 1, 16, 16), mode="hard_st", execution="skip")


def test_higher_threshold_skips_more():
    torch.manual_seed(0)
    net = create_model("skipnet38_cifar", in_chans=1).eval()
    x = torch.randn(32, 1, 16, 16)
    with torch.no_grad():
        rates = [net(x, threshold=t).executed.mean().item() for t in (0.2, 0.5, 0.8)]
    assert rates[0] >= rates[1] >= rates[2]


def _stage(tmp_path, name, overrides):
    cfg = shrink(compose_config("train.yaml", ["data=synthetic", *overrides], tmp_path / name))
    with open_dict(cfg):
        cfg.paths.log_dir = str(tmp_path / "logs")
    return train(cfg)


def test_stages_chain_by_checkpoints(tmp_path):
    """base -> SP -> RL, each finding the previous stage's newest run by its folder."""
    base = _stage(tmp_path, "base", ["model=resnet20"])
    sp = _stage(tmp_path, "sp", ["model=skipnet20", "model.stage=sp",
                                 f"model.net.backbone.pretrained={tmp_path / 'base'}"])
    rl = _stage(tmp_path, "rl", ["model=skipnet20", "model.stage=rl", "model.train_execution=skip",
                                 "model.rl_batchnorm=eval", "model.reward_cost=flops", "model.baseline=true",
                                 f"model.net.pretrained={tmp_path / 'sp'}"])
    rl_w = torch.load(rl["checkpoints"]["last"], weights_only=True)["state_dict"]
    sp_best = torch.load(resolve_checkpoint(tmp_path / "sp"), weights_only=True)["state_dict"]
    stats = [k for k in sp_best if k.startswith("net.backbone.") and k.endswith(("running_mean", "running_var"))]
    # rl_batchnorm=eval under a real fit: the backbone's statistics are SP's, untouched by RL's batches,
    # while the weights trained.
    assert stats and all(torch.equal(rl_w[k], sp_best[k]) for k in stats)
    assert not torch.equal(rl_w["net.backbone.fc.weight"], sp_best["net.backbone.fc.weight"])
    base_w = torch.load(base["checkpoints"]["best"], weights_only=True)["state_dict"]
    # The entry points hand builders the checkpoint a run folder stands for.
    sp_start = create_model("skipnet20_cifar", in_chans=1, backbone_pretrained=resolve_checkpoint(tmp_path / "base"))
    assert torch.equal(sp_start.backbone.conv1.weight, base_w["net.conv1.weight"])
    sp_w = torch.load(sp["checkpoints"]["best"], weights_only=True)["state_dict"]
    rl_start = skipnet_from_backbone(create_model("resnet20_cifar", in_chans=1),
                                     create_model("skipnet20_cifar", in_chans=1).gate,
                                     pretrained=resolve_checkpoint(tmp_path / "sp"))
    assert isinstance(rl_start, SkipResNet)
    assert torch.equal(rl_start.gate.proj.weight, sp_w["net.gate.proj.weight"])
    for key in ("test/acc", "test/gflops_per_img", "test/computation_pct", "test/blocks_per_img",
                "test/exec_rate/block_01", "val/gflops_per_img"):
        assert key in rl["metrics"], key
    assert "train/reward" in rl["metrics"] and "train/pg_loss" in rl["metrics"]
    report = json.loads((tmp_path / "rl" / "metrics.json").read_text())["test_report"]
    assert report["distinct_patterns"] >= 1 and sum(p["count"] for p in report["skip_patterns"]) <= 128
    assert len(report["exec_rate_per_block"]) == 9 and report["exec_rate_per_block"][0] == 1.0


def test_missing_previous_stage_is_one_clear_error(tmp_path):
    from gating import UserError

    (tmp_path / "runs").mkdir()
    cfg = compose_config("train.yaml", ["model=skipnet20", f"model.net.backbone.pretrained={tmp_path / 'runs'}"],
                         tmp_path / "out")
    with pytest.raises(UserError, match="no checkpoint"):  # what every entry point does before building
        pin_references(cfg)
    with pytest.raises(UserError, match="a folder"):  # a builder takes files only, and says so
        create_model("skipnet20_cifar", backbone_pretrained=str(tmp_path))


def test_finetune_stage_freezes_the_gates(tmp_path):
    sp = _stage(tmp_path, "sp", ["model=skipnet20", "model.stage=sp"])
    ft = _stage(tmp_path, "ft", ["model=skipnet20", "model.stage=finetune", "model.train_execution=skip",
                                 "model.rl_batchnorm=eval", f"model.net.pretrained={tmp_path / 'sp'}"])
    before = torch.load(sp["checkpoints"]["best"], weights_only=True)["state_dict"]
    after = torch.load(ft["checkpoints"]["best"], weights_only=True)["state_dict"]
    gate_keys = [k for k in before if k.startswith("net.gate.")]
    assert gate_keys and all(torch.equal(before[k], after[k]) for k in gate_keys)
    assert not torch.equal(before["net.backbone.fc.weight"], after["net.backbone.fc.weight"])


@pytest.mark.parametrize("gate", ["rnn", "ffgate1"])
def test_batch_one_fast_path_takes_the_same_decisions(gate):
    torch.manual_seed(0)
    net = create_model("skipnet38_cifar", in_chans=1, gate=gate).eval()
    with torch.no_grad():
        for p in net.gate.parameters():
            p.mul_(3.0)
        x = torch.randn(12, 1, 16, 16)
        batched = net(x)
        for i in range(12):
            one = net(x[i : i + 1])
            assert torch.equal(one.executed, batched.executed[i : i + 1])
            assert torch.allclose(one.logits, batched.logits[i : i + 1], atol=1e-4)
            assert torch.allclose(one.probs, batched.probs[i : i + 1], atol=1e-5)
    assert 0 < batched.executed[:, 1:].mean() < 1


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,shape", [("skipnet38_cifar", (1, 16, 16)), ("skipnet50", (3, 32, 32))])
def test_training_mode_skip_equals_masked_with_eval_batchnorm(name, shape):
    """In training mode, with the backbone's BatchNorm on running statistics, real skipping computes what
    masked execution computes: the same logits and the same gradient for every backbone parameter."""
    torch.manual_seed(0)
    net = create_model(name, num_classes=10, in_chans=shape[0])
    with torch.no_grad():  # non-trivial running statistics, as a trained stage has
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    actions = _random_actions(8, net.num_blocks, 0.5, seed=3)
    assert 0 < actions[:, 1:].mean() < 1
    net.train()
    net.batchnorm_eval()
    assert all(not m.training for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    outs, grads = {}, {}
    for execution in ("skip", "masked"):
        net.zero_grad()
        out = net(x, mode="sample", execution=execution, actions=actions)
        torch.nn.functional.cross_entropy(out.logits, y).backward()
        outs[execution], grads[execution] = out.logits.detach(), _grads(net.backbone)
    assert torch.allclose(outs["skip"], outs["masked"], atol=1e-5, rtol=1e-4)
    assert grads["skip"].keys() == grads["masked"].keys()
    for k in grads["skip"]:
        assert torch.allclose(grads["skip"][k], grads["masked"][k], atol=1e-5, rtol=1e-3), k
    # With batch statistics the two differ: the sub-batches have other statistics than the whole batch.
    net.train()
    with torch.no_grad():
        skip_bn = net(x, mode="sample", execution="skip", actions=actions).logits
        masked_bn = net(x, mode="sample", execution="masked", actions=actions).logits
    assert not torch.allclose(skip_bn, masked_bn, atol=1e-3)


def _module(**kwargs):
    from functools import partial

    from experiments.systems import SkipNetModule

    net = create_model("skipnet20_cifar", in_chans=1, gate=kwargs.pop("gate", "rnn"))
    return SkipNetModule(net, partial(torch.optim.SGD, lr=0.1), **kwargs)


def test_rl_batchnorm_eval_holds_through_lightnings_train_calls():
    m = _module(stage="rl", train_execution="skip", rl_batchnorm="eval", gate="ffgate2")
    m.on_train_epoch_start()  # what a fit calls; it never calls train() itself
    bns = [b for b in m.net.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)
    m.eval()
    m.train()
    bns = [b for b in m.net.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    gate_bns = [b for b in m.net.gate.modules() if isinstance(b, torch.nn.BatchNorm2d)]
    assert bns and gate_bns and not any(b.training for b in bns)
    assert all(b.training for b in gate_bns)  # the gates see the whole batch either way, and keep learning
    assert m.net.backbone.conv1.training
    m.eval()
    m.train()
    assert not any(b.training for b in bns)
    # SP and the default keep batch statistics.
    sp = _module(stage="sp")
    sp.train()
    assert all(b.training for b in sp.net.backbone.modules() if isinstance(b, torch.nn.BatchNorm2d))


def test_skip_execution_with_batch_statistics_is_refused():
    with pytest.raises(ValueError, match="rl_batchnorm='eval'"):
        _module(stage="rl", train_execution="skip")
    with pytest.raises(ValueError, match="pg_reduction"):
        _module(stage="rl", pg_reduction="total")
    with pytest.raises(ValueError, match="rl_batchnorm must be"):
        _module(stage="rl", rl_batchnorm="frozen")


def test_gate_learning_rate_is_its_own_parameter_group():
    m = _module(stage="rl", gate_lr=0.003)
    rest, gate = m.param_groups()
    assert gate["lr"] == 0.003 and "lr" not in rest
    ids = [id(p) for p in rest["params"]] + [id(p) for p in gate["params"]]
    assert sorted(ids) == sorted(id(p) for p in m.parameters())  # every parameter, once
    assert {id(p) for p in gate["params"]} == {id(p) for p in m.net.gate.parameters()}
    opt = m.optimizer_factory(params=m.param_groups())
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.003]
    with pytest.raises(ValueError, match="gate_lr"):
        _module(stage="rl", gate_lr=0.0)


def test_gate_temperature_sharpens_the_projection_once():
    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1)
    before = net.gate.proj.weight.clone()
    from functools import partial

    from experiments.systems import SkipNetModule

    m = SkipNetModule(net, partial(torch.optim.SGD, lr=0.1), stage="rl", gate_temperature=0.05)
    assert torch.allclose(m.net.gate.proj.weight, before / 0.05)


@pytest.mark.parametrize("experiment,reduction", [("cifar10_skipnet38_rl", "sum"), ("cifar10_skipnet110_rl", "sum"),
                                                  ("cifar100_skipnet110_rl", "sum"), ("svhn_skipnet152_rl", "sum"),
                                                  ("imagenet_skipnet101_rl", "mean")])
def test_paper_recipes_reproduce_the_code_they_cite(tmp_path, experiment, reduction):
    """CIFAR/SVHN code: .reinforce(0.01 R) sums over the batch; ImageNet code: .mean(), hotter(0.05) once."""
    cfg = compose_config("train.yaml", [f"experiment={experiment}"], tmp_path)
    m = cfg.model
    assert (m.pg_reduction, m.rl_weight, m.baseline, m.entropy_weight) == (reduction, 0.01, False, 0.0)
    assert m.train_execution == "masked" and m.rl_batchnorm == "train"  # the code: masked, model.train()
    assert m.gate_temperature == (0.05 if experiment.startswith("imagenet") else 1.0)
    assert "temperature" not in cfg.gate
    if not experiment.startswith("imagenet"):  # SP from random initialisation, as train_sp.py
        sp = compose_config("train.yaml", [f"experiment={experiment.replace('_rl', '_sp')}"], tmp_path / "sp")
        assert sp.model.net.backbone.pretrained is None and sp.model.stage == "sp"


def test_a_skipnet_run_records_its_adaptivity_by_severity(tmp_path):
    cfg = shrink(compose_config("train.yaml", ["data=digits_c", "model=skipnet20", "model.stage=sp"], tmp_path))
    with open_dict(cfg):
        cfg.trainer.limit_test_batches = None  # the whole test split: every severity present
    record = train(cfg)
    a = record["adaptivity"]
    assert a["buckets"] == [f"{k}:severity{k}" for k in range(6)] and len(a["gflops_mean"]) == 6
    assert a["distinct_patterns"] == record["test_report"]["distinct_patterns"]
    assert a["shape"] in ("rises", "flat", "falls", "mixed") and len(a["exec_rate"][0]) == 9
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["adaptivity"]["difficulty"] == "corruption severity (0 = clean)"


def _fit_few_steps(module, steps: int = 4, epochs: int = 1):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 12, 12, generator=g), torch.randint(0, 10, (64,), generator=g))
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=16))
    return trainer


@pytest.mark.parametrize("options", [
    {"stage": "rl", "baseline": "self_critical"},
    {"stage": "rl", "baseline": "moving", "normalize_advantage": True},
    {"stage": "rl", "entropy_weight": 0.1},
    {"stage": "rl", "curriculum_epochs": 2},
    {"stage": "rl", "reward": "budget", "budget": 0.3, "alpha": 0.0},
    {"stage": "gumbel", "target_rate": 0.3, "target_rate_per_layer": False},
    {"stage": "gumbel", "target_rate": 0.3},
    {"stage": "rl", "reward": "correct", "wrong_penalty": 2.0, "baseline": "self_critical"},
    {"stage": "rl", "prob_bound": 0.8},
    {"stage": "rl", "backbone_lr": 0.0, "train_execution": "skip", "rl_batchnorm": "eval"},
    {"stage": "sp", "drop_rate": 0.5, "drop_per_sample": True},
    {"stage": "rl", "depth_weight": 1.0, "drop_rate": 0.5, "drop_per_sample": True},
], ids=["self_critical", "normalized", "entropy", "curriculum", "budget", "gumbel_global", "gumbel_per_layer",
        "correct", "prob_bound", "frozen_backbone", "stochastic_depth", "depth_weight"])
def test_each_training_switch_trains_the_gates(options):
    from functools import partial

    from experiments.systems import SkipNetModule

    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1)
    module = SkipNetModule(net, partial(torch.optim.SGD, lr=0.5), rl_weight=1.0, **options)
    before = {k: v.clone() for k, v in net.gate.state_dict().items()}
    _fit_few_steps(module)
    after = net.gate.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), options


@pytest.mark.parametrize("depth_weight", [0.0, 1.0])
def test_depth_weight_trains_the_blocks_the_policy_leaves_out(depth_weight):
    """Hybrid RL trains the backbone through the policy's paths only: a block no input runs gets no gradient.
    ``depth_weight`` adds the network at random depths, which reaches it."""
    from functools import partial

    from experiments.systems import SkipNetModule

    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1)
    with torch.no_grad():  # every gate closed: the policy runs block 0 and the shortcuts, nothing else
        net.gate.proj.weight.zero_()
        net.gate.proj.bias.fill_(-30.0)
    options = {"depth_weight": depth_weight, "drop_rate": 0.5} if depth_weight else {}
    module = SkipNetModule(net, partial(torch.optim.SGD, lr=0.5), stage="rl", **options)
    block = net.blocks()[4]
    before = {k: v.clone() for k, v in block.named_parameters()}
    _fit_few_steps(module)
    moved = any(not torch.equal(before[k], v) for k, v in block.named_parameters())
    assert moved == bool(depth_weight)


def test_depth_weight_needs_the_rl_stage_and_a_drop_rate():
    from functools import partial

    from experiments.systems import SkipNetModule

    net = create_model("skipnet20_cifar", in_chans=1)
    opt = partial(torch.optim.SGD, lr=0.1)
    for bad in ({"stage": "rl", "depth_weight": 1.0}, {"stage": "sp", "depth_weight": 1.0, "drop_rate": 0.5},
                {"stage": "rl", "depth_weight": -1.0, "drop_rate": 0.5}, {"stage": "rl", "drop_rate": 0.5}):
        with pytest.raises(ValueError, match="depth_weight|drop_rate"):
            SkipNetModule(net, opt, **bad)


def test_curriculum_opens_the_gates_from_the_last():
    from functools import partial

    from experiments.systems import SkipNetModule

    net = create_model("skipnet20_cifar", in_chans=1)  # 8 gates
    module = SkipNetModule(net, partial(torch.optim.SGD, lr=0.1), stage="rl", curriculum_epochs=4)
    seen = []

    import pytorch_lightning as pl

    class Record(pl.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append(pl_module.curriculum_open_first())

    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(torch.randn(16, 1, 12, 12), torch.randint(0, 10, (16,)))
    pl.Trainer(max_epochs=5, limit_train_batches=1, logger=False, enable_checkpointing=False, callbacks=[Record()],
               enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(
        module, train_dataloaders=DataLoader(data, batch_size=16))
    assert seen == [6, 4, 2, 0, 0]  # 2, 4, 6, 8 gates learned, then all
    x = torch.randn(5, 1, 12, 12)
    out = net(x, mode="sample", execution="masked", open_first=6)
    assert out.executed[:, 1:7].eq(1).all() and out.log_probs[:, :6].eq(0).all()


def test_budget_penalty_and_target_rate_by_hand():
    from gating.policy import decide, target_rate_loss
    from gating.reinforce import budget_penalty

    share = torch.tensor([0.2, 0.8, 0.9])  # mean 0.633 > 0.5: over budget, each pays its own excess
    assert torch.allclose(budget_penalty(share, 0.5, 2.0), torch.tensor([0.6, -0.6, -0.8]))
    assert torch.equal(budget_penalty(torch.tensor([0.2, 0.6]), 0.5, 2.0), torch.zeros(2))  # within budget
    gates = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # per-gate rates 1.0 and 0.5
    assert target_rate_loss(gates, 0.5).item() == pytest.approx((0.25 + 0.0) / 2)
    assert target_rate_loss(gates, 0.5, per_layer=False).item() == pytest.approx(0.0625)
    torch.manual_seed(0)
    logit = torch.zeros(4000, requires_grad=True)
    d = decide(logit, "gumbel", temperature=0.5)
    assert set(d.action.detach().unique().tolist()) <= {0.0, 1.0} and 0.45 < d.action.mean().item() < 0.55
    d.action.sum().backward()
    assert logit.grad.abs().sum() > 0  # the straight-through gradient reaches the logits


def test_self_critical_baseline_is_the_greedy_policys_return_per_input():
    from functools import partial

    from experiments.systems import SkipNetModule

    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1)
    with torch.no_grad():
        for p in net.gate.parameters():
            p.mul_(3.0)
    module = SkipNetModule(net, partial(torch.optim.SGD, lr=0.1), stage="rl", baseline="self_critical", alpha=1.0)
    module.train()
    stats = net.backbone.bn1.running_mean.clone()
    x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))
    base = module._baseline(x, y, 0)
    assert base.shape == (8, net.num_gates) and base[:, 0].unique().numel() > 1  # one baseline per input
    assert net.training and net.backbone.bn1.training  # the greedy pass ran in eval mode and left no trace
    assert torch.equal(net.backbone.bn1.running_mean, stats)
    with torch.no_grad():
        net.eval()
        g = net(x)
        net.train()
    expected = module.returns(g.executed, torch.nn.functional.cross_entropy(g.logits, y, reduction="none"), x)
    assert torch.allclose(base, expected)
    with pytest.raises(ValueError, match="baseline"):
        SkipNetModule(net, partial(torch.optim.SGD, lr=0.1), stage="rl", baseline="greedy")


def test_frozen_backbone_trains_the_gates_only():
    from functools import partial

    from experiments.systems import SkipNetModule

    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1)
    module = SkipNetModule(net, partial(torch.optim.SGD, lr=0.5), stage="rl", rl_weight=1.0, backbone_lr=0.0,
                           train_execution="skip", rl_batchnorm="eval")
    backbone = {k: v.clone() for k, v in net.backbone.state_dict().items()}  # BatchNorm statistics included
    gates = {k: v.clone() for k, v in net.gate.state_dict().items()}
    _fit_few_steps(module)
    assert all(torch.equal(backbone[k], v) for k, v in net.backbone.state_dict().items())
    assert any(not torch.equal(gates[k], v) for k, v in net.gate.state_dict().items())
    (group,) = module.param_groups()  # the gates alone
    assert {id(p) for p in group["params"]} == {id(p) for p in net.gate.parameters()}
    lr = SkipNetModule(create_model("skipnet20_cifar", in_chans=1), partial(torch.optim.SGD, lr=0.1), stage="rl",
                       backbone_lr=0.01, gate_lr=0.3)
    assert [g["lr"] for g in lr.optimizer_factory(params=lr.param_groups()).param_groups] == [0.01, 0.3]
    with pytest.raises(ValueError, match="backbone_lr"):
        SkipNetModule(create_model("skipnet20_cifar", in_chans=1), partial(torch.optim.SGD, lr=0.1), stage="sp",
                      backbone_lr=0.0)


def test_stochastic_depth_drops_blocks_whatever_the_gates_say():
    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", in_chans=1).train()
    x = torch.randn(400, 1, 12, 12)
    with torch.no_grad():
        for p in net.gate.proj.parameters():
            p.zero_()
        net.gate.proj.bias.fill_(10.0)  # every gate open
        assert net(x, mode="hard_st", execution="masked").executed.eq(1).all()
        rate = net(x, mode="hard_st", execution="masked", drop_rate=0.5).executed[:, 1:].mean().item()
        assert 0.45 < rate < 0.55
        per_sample = torch.cat([torch.zeros(200), torch.full((200,), 0.9)])
        ex = net(x, mode="hard_st", execution="masked", drop_rate=per_sample).executed[:, 1:]
        assert ex[:200].eq(1).all() and ex[200:].mean() < 0.2  # each row at its own rate
    with pytest.raises(ValueError, match="drop_rate"):
        net(x, drop_rate=1.0)
    with pytest.raises(ValueError, match="drop_rate"):
        net(x, mode="sample", drop_rate=0.5)


def test_correctness_reward_and_exploration_bound_by_hand():
    from gating.policy import decide
    from gating.reinforce import correctness_reward

    r = correctness_reward(torch.tensor([True, True, False]), torch.tensor([0.5, 1.0, 0.2]), 2.0)
    assert torch.allclose(r, torch.tensor([0.75, 0.0, -2.0]))  # cost counts only when the answer is right
    torch.manual_seed(0)
    logit = torch.full((20000,), -20.0, requires_grad=True)  # p ~ 0: without the bound, never executed
    assert decide(logit, "sample").action.sum() == 0
    d = decide(logit, "sample", prob_bound=0.8)
    assert 0.19 < d.action.mean().item() < 0.21  # executed with probability 1 - 0.8
    expected = torch.where(d.action > 0.5, torch.tensor(0.2).log(), torch.tensor(0.8).log())
    assert torch.allclose(d.log_prob, expected, atol=1e-5)
    with pytest.raises(ValueError, match="prob_bound"):
        decide(logit, "sample", prob_bound=0.4)


def test_operating_point_is_chosen_on_val_and_kept_by_the_run(tmp_path):
    """operating_cost_pct: the test runs at the threshold chosen on val for the budget, and every later
    loader of the run (evaluation, serving, gate_flip) gets that threshold from the run record."""
    from experiments.runs import load_run

    record = _stage(tmp_path, "rl", ["model=skipnet20", "model.stage=rl", "model.operating_cost_pct=70",
                                     "model.operating_thresholds=[0.2,0.5,0.8]"])
    point = record["operating_point"]
    costs = {c["threshold"]: c["val/gflops_per_img"] for c in point["candidates"]}
    budget = 0.7 * point["full_gflops_per_img"]
    assert sorted(costs) == [0.2, 0.5, 0.8]
    if point["within_budget"]:  # the costliest candidate within the budget
        assert costs[point["threshold"]] <= budget
        assert all(c > budget or c <= costs[point["threshold"]] for c in costs.values())
    else:
        assert costs[point["threshold"]] == min(costs.values())
    saved = json.loads((tmp_path / "rl" / "metrics.json").read_text())
    assert saved["operating_point"]["threshold"] == point["threshold"]
    adapter = load_run(tmp_path / "rl")
    assert adapter.net.threshold == point["threshold"]
    with pytest.raises(ValueError, match="operating_cost_pct"):
        _module(operating_cost_pct=0)
    with pytest.raises(ValueError, match="operating_thresholds"):
        _module(operating_cost_pct=50, operating_thresholds=[0.5, 1.0])


def test_on_device_decisions_give_the_skipnets_outputs_eager_and_compiled():
    """OnDeviceDecisions (each block a torch.cond on its gate) decides, answers and reports as the
    SkipNet's own batch-1 pass, eagerly and compiled whole, with forced actions and without gates too."""
    from skipnet import OnDeviceDecisions, compile_on_device

    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", num_classes=10, in_chans=1).eval()
    with torch.no_grad():  # spread the gates' logits so that some blocks run and some do not
        net.gate.proj.bias.zero_()
        net.gate.proj.weight.normal_(0.0, 20.0)
    xs = torch.randn(6, 1, 16, 16)
    eager, compiled = OnDeviceDecisions(net), compile_on_device(net)
    some_on = torch.tensor([[1.0, 0, 1, 1, 0, 0, 1, 0, 1]])
    seen = set()
    with torch.no_grad():
        for i in range(len(xs)):
            xi = xs[i:i + 1]
            ref = net(xi)
            seen.add(tuple(ref.executed[0].tolist()))
            for fn, variants in ((eager, ({}, {"actions": some_on}, {"actions": some_on, "run_gates": False})),
                                 (compiled, ({}, {"actions": some_on}))):  # a graph per variant: two compiled
                for kwargs in variants:
                    want, got = net(xi, **kwargs), fn(xi, **kwargs)
                    assert torch.equal(got.executed, want.executed)
                    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(got.probs, want.probs, rtol=1e-4, atol=1e-4)
    assert len(seen) > 1 and all(0 < sum(p) < net.num_blocks for p in seen)  # the inputs took different paths
    with pytest.raises(ValueError, match="one input at a time"):
        eager(xs[:2])
