"""Cost accounting against hand-computed counts and batch-1 FlopCounterMode runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from gating.cost import (
    CostTable,
    analytic_flops,
    block_modules,
    build_cost_table,
    conv2d_flops,
    count_flops,
    flops_by_module,
    linear_flops,
    measure_interleaved,
    measure_latency,
    profile_blocks,
)
from models import create_model


def test_conv_flops_by_hand():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1, bias=True)
    x = torch.randn(1, 3, 10, 10)
    hand = 2 * (3 * 3 * 3) * 8 * 10 * 10  # 2 x (C_in k_h k_w) x C_out x H_out x W_out
    assert hand == 43_200
    assert count_flops(conv, x) == hand
    assert analytic_flops(conv, x) == hand
    assert conv2d_flops(3, 8, (3, 3), (10, 10)) == hand


def test_strided_grouped_conv_flops_by_hand():
    conv = nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1, groups=2, bias=False)
    x = torch.randn(3, 8, 9, 9)  # output 5x5; batch 3
    hand = 3 * 2 * (8 // 2) * 3 * 3 * 16 * 5 * 5
    assert count_flops(conv, x) == hand == analytic_flops(conv, x)


def test_linear_flops_by_hand():
    lin = nn.Linear(20, 7)
    assert count_flops(lin, torch.randn(5, 20)) == 2 * 20 * 7 * 5 == linear_flops(20, 7, rows=5)
    # Leading dimensions multiply the rows.
    assert count_flops(lin, torch.randn(5, 4, 20)) == 2 * 20 * 7 * 20 == analytic_flops(lin, torch.randn(5, 4, 20))


def test_flops_scale_linearly_with_batch():
    net = create_model("resnet20_cifar", num_classes=10, in_chans=3).eval()
    one = count_flops(net, torch.randn(1, 3, 32, 32))
    assert count_flops(net, torch.randn(4, 3, 32, 32)) == 4 * one


@pytest.mark.parametrize(
    "name,shape",
    [("resnet20_cifar", (3, 32, 32)), ("resnet38_cifar", (1, 28, 28)), ("resnet18", (3, 64, 64)),
     ("resnet50", (3, 64, 64)), ("tiny_cnn", (1, 28, 28)), ("timm/resnet18", (3, 64, 64))],
)
def test_block_table_sums_to_whole_model(name, shape):
    net = create_model(name, num_classes=10, in_chans=shape[0]).eval()
    x = torch.randn(1, *shape)
    table = build_cost_table(net, x)
    whole = count_flops(net, x)
    assert table.full_flops == whole
    assert analytic_flops(net, x) == whole  # the shape formula agrees with FlopCounterMode
    assert table.num_blocks > 0 and table.block_flops.sum() > 0  # pooling layers may count 0


def test_cifar_resnet_block_table_structure():
    net = create_model("resnet110_cifar", num_classes=10, in_chans=3)
    table = build_cost_table(net, torch.randn(1, 3, 32, 32))
    assert table.num_blocks == 54
    assert table.block_names[0] == "layer1.0" and table.block_names[-1] == "layer3.17"
    # Only the two downsampling blocks keep a cost when skipped: their 1x1 projection shortcut.
    downsampling = [n for n, s in zip(table.block_names, table.skip_flops.tolist()) if s > 0]
    assert downsampling == ["layer2.0", "layer3.0"]
    # 1x1 conv 16->32 at 16x16, stride 2, by hand.
    assert table.skip_flops[table.block_names.index("layer2.0")] == conv2d_flops(16, 32, (1, 1), (16, 16))


def _conditional_forward(net, x, executed):
    """Reference conditional execution: skipped blocks run only their shortcut."""
    x = net.stem(x)
    for run, block in zip(executed.tolist(), net.blocks()):
        if run:
            x = block(x)
        elif block.downsample is not None:
            x = block.downsample(x)
    return net.forward_head(x)


@pytest.mark.parametrize("name,shape", [("resnet38_cifar", (1, 28, 28)), ("resnet50", (3, 64, 64))])
def test_per_sample_cost_matches_batch1_conditional_runs(name, shape):
    torch.manual_seed(0)
    net = create_model(name, num_classes=10, in_chans=shape[0]).eval()
    x = torch.randn(6, *shape)
    table = build_cost_table(net, x)
    executed = torch.rand(6, table.num_blocks) < 0.5
    executed[0] = True  # all blocks
    executed[1] = False  # none
    predicted = table.per_sample(executed)
    assert predicted.dtype == torch.float64 and predicted.shape == (6,)
    for i in range(6):
        counted = count_flops(lambda inp: _conditional_forward(net, inp, executed[i]), x[i : i + 1])
        assert predicted[i].item() == counted
    assert predicted[0].item() == table.full_flops


def test_gate_costs_and_computation_percentage():
    table = CostTable(("a", "b", "c"), torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64),
                      torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64), fixed_flops=7.0, gate_flops=3.0)
    executed = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 0, 1]])
    assert table.per_sample(executed).tolist() == [70.0, 15.0, 55.0]
    assert table.full_flops == 70.0
    assert table.computation_percentage(executed).tolist() == pytest.approx([100.0, 0.0, 200 / 3])
    with pytest.raises(ValueError, match="3 blocks"):
        table.per_sample(torch.ones(1, 2))


def test_flops_by_module_paths():
    net = create_model("resnet20_cifar", num_classes=10, in_chans=3).eval()
    counts = flops_by_module(net, torch.randn(1, 3, 32, 32))
    assert counts[""] == count_flops(net, torch.randn(1, 3, 32, 32))
    assert counts["layer1"] == sum(counts[f"layer1.{i}"] for i in range(3))
    assert counts["fc"] == 2 * 64 * 10


def test_block_discovery_falls_back_to_children():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    net(torch.randn(1, 1, 8, 8))
    names = [n for n, _ in block_modules(net)]
    assert names == ["0", "1", "2", "3"]
    assert build_cost_table(net, torch.randn(1, 1, 8, 8)).full_flops == count_flops(net, torch.randn(1, 1, 8, 8))


def test_latency_profiler():
    net = create_model("resnet20_cifar", num_classes=10, in_chans=1).eval()
    stats = measure_latency(lambda: net(torch.randn(2, 1, 16, 16)), warmup=1, repeats=5)
    assert stats.repeats == 5 and stats.device == "cpu"
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    per_block = profile_blocks(net, torch.randn(2, 1, 16, 16), warmup=1, repeats=3)
    assert set(per_block) == {"(model)"} | {n for n, _ in block_modules(net)}
    assert all(s.median_ms > 0 for s in per_block.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_latency_profiler_cuda():
    net = create_model("resnet20_cifar", num_classes=10, in_chans=3).cuda().eval()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    stats = measure_latency(lambda: net(x), device="cuda", warmup=2, repeats=5)
    assert stats.device.startswith("cuda") and stats.median_ms > 0


@pytest.mark.parametrize("name,weights", [("resnet50", "ResNet50_Weights"), ("resnet18", "ResNet18_Weights")])
def test_imagenet_resnets_match_torchvision_published_gmacs(name, weights):
    from torchvision import models as tvm

    net = create_model(name).eval()
    flops = count_flops(net, torch.randn(1, 3, 224, 224))
    published_gmacs = getattr(tvm, weights).IMAGENET1K_V1.meta["_ops"]  # 4.089 for ResNet-50
    assert flops / 2e9 == pytest.approx(published_gmacs, abs=5e-4)
    if name == "resnet50":
        assert flops == 8_178_368_512  # 8.18 GFLOPs = 4.09 GMACs


def test_cifar_resnet110_flops_by_hand():
    """ResNet-110 at 32x32: He et al.'s ~253M multiply-adds, here as an exact sum over its convs."""
    n = 18
    stem = conv2d_flops(3, 16, (3, 3), (32, 32))
    stage1 = 2 * n * conv2d_flops(16, 16, (3, 3), (32, 32))
    stage2 = conv2d_flops(16, 32, (3, 3), (16, 16)) + (2 * n - 1) * conv2d_flops(32, 32, (3, 3), (16, 16)) \
        + conv2d_flops(16, 32, (1, 1), (16, 16))
    stage3 = conv2d_flops(32, 64, (3, 3), (8, 8)) + (2 * n - 1) * conv2d_flops(64, 64, (3, 3), (8, 8)) \
        + conv2d_flops(32, 64, (1, 1), (8, 8))
    head = linear_flops(64, 10)
    net = create_model("resnet110_cifar", num_classes=10, in_chans=3)
    assert count_flops(net, torch.randn(1, 3, 32, 32)) == stem + stage1 + stage2 + stage3 + head == 506_299_648


def test_model_cost_counts_int8_work_apart_from_float_flops():
    from gating.cost import analytic_flops, int8_ops, model_cost
    from models import create_model
    from models.quantize import quantize_int8

    torch.manual_seed(0)
    net = create_model("resnet20_cifar", num_classes=10, in_chans=1).eval()
    x = torch.randn(1, 1, 28, 28)
    qnet = quantize_int8(net, [torch.randn(8, 1, 28, 28)])
    f, q = model_cost(net, x, batch_sizes=(1, 4), repeats=3), model_cost(qnet, x)
    assert f.int8_gops == 0 and f.gflops * 1e9 == analytic_flops(net, x)
    assert q.gflops == 0 and q.int8_gops * 1e9 == analytic_flops(net, x)  # same convs and fc, now in int8
    assert int8_ops(qnet, torch.randn(3, 1, 28, 28)) == 3 * q.int8_gops * 1e9  # per input, exactly
    assert 0.95 * f.params < q.params <= f.params and q.weight_bytes < f.weight_bytes / 2.5
    assert set(f.latency_ms) == {1, 4} and all(ms > 0 for ms in f.latency_ms.values()) and q.latency_ms == {}
    assert set(f.to_dict()) >= {"gflops_per_img", "int8_gops_per_img", "params", "weight_bytes", "latency_ms_b1"}
    skip = create_model("skipnet20_cifar", num_classes=10, in_chans=1).eval()
    qskip = quantize_int8(skip, [torch.randn(8, 1, 28, 28)])
    on, off = torch.ones(1, skip.num_blocks), torch.zeros(1, skip.num_blocks)
    ops_on, ops_off = (int8_ops(qskip, x, forward=lambda inp, a=a: qskip(inp, actions=a)) for a in (on, off))
    assert 0 < ops_off < ops_on  # a skipped block's int8 work is not counted (its int8 shortcut is)


def test_cost_table_prices_an_int8_skipnet_per_input_as_its_int8_layers_count():
    """An int8 SkipNet's table holds each block's int8 operations (run and skipped) apart from float FLOPs,
    so the per-input int8 cost of any decisions is what the int8 layers count when those decisions run;
    the adapters carry it per row, through a cascade's compaction too."""
    from cascades import CascadeAdapter
    from cascades.model import IDKCascade
    from gating.adapters import StaticAdapter, price_points, triage_levels
    from gating.idk import MaxProbIDK
    from gating.cost import counting_int8_ops, int8_ops
    from models import create_model
    from models.quantize import quantize_int8
    from skipnet import SkipNetAdapter

    torch.manual_seed(0)
    skip = create_model("skipnet20_cifar", num_classes=10, in_chans=1).eval()
    float_table = skip.cost_table(torch.randn(1, 1, 28, 28))
    assert not float_table.has_int8 and float_table.block_int8 is None and "int8_ops" not in float_table.to_dict()
    qskip = quantize_int8(skip, [torch.randn(8, 1, 28, 28)])
    x = torch.randn(6, 1, 28, 28)
    table = qskip.cost_table(x[:1])
    assert table.has_int8 and float(table.block_flops.sum()) == 0  # the blocks' work is int8 work only
    # The same convolutions, now int8; a skipped downsampling block still runs its int8 projection shortcut.
    assert table.full_int8 == float(float_table.block_flops.sum())
    assert torch.equal(table.skip_int8, float_table.skip_flops) and (table.skip_int8 > 0).sum() >= 2
    assert float(table.skip_flops.sum()) == 0
    actions = (torch.rand(6, qskip.num_blocks, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    actions[:, 0] = 1
    for i in range(6):
        ran = int8_ops(qskip, x[i:i + 1], forward=lambda inp, a=actions[i:i + 1]: qskip(inp, actions=a))
        assert float(table.per_sample_int8(actions[i:i + 1])) == ran
    rows = {r["unit"]: r for r in table.rows()}
    assert sum(r["share_pct"] for r in rows.values()) == pytest.approx(100.0)

    adapter = SkipNetAdapter(qskip, name="q")
    adapter.cost_table(x)  # measured before counting: the batch below is all the hooks see
    with counting_int8_ops(qskip) as hooks:
        out = adapter.run(x)
    assert out.int8_ops is not None and float(out.int8_ops.sum()) == hooks[0]
    assert float(out.flops.max()) == table.fixed_flops + table.gate_flops  # float work: stem, gates, head
    # Its operating points differ in int8 work only: priced and ordered as triage levels by all operations.
    qskip.threshold = 0.01  # untrained gates: every block runs at 0.01, none past block 0 at 0.99
    points = price_points(SkipNetAdapter(qskip, thresholds=[0.99], name="q"), x, torch.zeros(6, dtype=torch.long))
    assert len({p.val_gflops_per_img for p in points}) == 1 and len({p.val_int8_gops_per_img for p in points}) == 2
    assert [p.settings["threshold"] for p in triage_levels(points)] == [0.01, 0.99]

    tiny = create_model("tiny_cnn", num_classes=10, in_chans=1, width=8).eval()
    qtiny = quantize_int8(tiny, [torch.randn(8, 1, 28, 28)])
    assert StaticAdapter(tiny).run(x).int8_ops is None
    static = StaticAdapter(qtiny).run(x)
    assert torch.equal(static.int8_ops, torch.full((6,), float(int8_ops(qtiny, x[:1])), dtype=torch.float64))
    second = quantize_int8(create_model("tiny_cnn", num_classes=10, in_chans=1, width=16).eval(),
                           [torch.randn(8, 1, 28, 28)])
    with torch.no_grad():
        middle = float(qtiny(x).softmax(-1).amax(-1).median())  # half the rows under it defer
    cascade = IDKCascade([qtiny, second], [MaxProbIDK()], thresholds=[middle + 1e-6])
    cadapter = CascadeAdapter(cascade, name="c")
    cadapter.stage_costs(x)
    with counting_int8_ops(cascade) as hooks:
        out = cadapter.run(x)
    assert 0 < (out.exit_stage == 1).sum() < 6  # some rows deferred, some not: compaction counts per row
    assert float(out.int8_ops.sum()) == hooks[0]
    costs = cadapter.stage_costs(x)
    assert torch.equal(out.int8_ops, costs.per_sample_int8(out.exit_stage))


def test_measure_interleaved_primed_times_the_call_after_an_untimed_one():
    """``primed``: each timed call follows an untimed call of the same variant (warm caches)."""
    import time

    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1
            if calls[name] % 2 == 1:  # every first call of a pair is slow: only primed timing misses them
                time.sleep(0.01)
        return fn

    fns = {"a": make("a"), "b": make("b")}
    stats = measure_interleaved(fns, warmup=0, repeats=5, primed=True)
    assert calls == {"a": 10, "b": 10}
    assert all(s.median_ms < 5.0 for s in stats.values())
    calls.update(a=0, b=0)
    unprimed = measure_interleaved(fns, warmup=0, repeats=5)
    assert calls == {"a": 5, "b": 5} and all(s.median_ms >= 9.0 for s in unprimed.values())
