"""The model registry: every builder works, trains (every parameter gets a gradient), and fails clearly."""

from __future__ import annotations

import pytest
import torch

from gating import UserError
from gating.cost import count_flops
from models import create_model, is_model, list_models
from models.cifar_resnet import CifarResNet

# The static backbones (SkipNet's gated models are tested in test_skipnet.py: they return a SkipOutput).
BACKBONES = [n for n in list_models() if not n.startswith("skipnet")]
# Small inputs keep the whole registry fast on a CPU.
SHAPES = {"linear": (1, 8, 8), "mlp": (1, 8, 8), "tiny_cnn": (1, 16, 16)}


def _shape(name: str) -> tuple[int, int, int]:
    if name in SHAPES:
        return SHAPES[name]
    return (1, 16, 16) if name.endswith("_cifar") else (3, 32, 32)


def _build(name: str):
    c, h, _ = _shape(name)
    kw = {"image_size": h} if name in ("linear", "mlp") else {}
    return create_model(name, num_classes=7, in_chans=c, **kw)


def test_registry_lists_the_families():
    names = list_models()
    for expected in ["resnet20_cifar", "resnet32_cifar", "resnet38_cifar", "resnet56_cifar", "resnet74_cifar",
                     "resnet110_cifar", "resnet152_cifar", "resnet18", "resnet34", "resnet50", "resnet101",
                     "resnet152", "linear", "mlp", "tiny_cnn"]:
        assert expected in names
    assert list_models("resnet*_cifar") == sorted(n for n in names if n.startswith("resnet") and n.endswith("_cifar"))
    assert is_model("timm/efficientnet_b0") and not is_model("nope")


@pytest.mark.parametrize("name", BACKBONES)
def test_forward_shapes_and_split(name):
    net = _build(name).eval()
    x = torch.randn(2, *_shape(name))
    out = net(x)
    assert out.shape == (2, 7) and net.num_classes == 7
    assert torch.allclose(net.forward_head(net.forward_features(x)), out)
    assert net.forward_head(net.forward_features(x), pre_logits=True).shape == (2, net.num_features)


@pytest.mark.parametrize("name", BACKBONES)
def test_every_parameter_gets_a_gradient(name):
    net = _build(name).train()
    x = torch.randn(2, *_shape(name))
    net(x).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_cifar_depths_and_parameter_counts():
    blocks = {20: 9, 38: 18, 110: 54, 152: 75}
    for depth, n_blocks in blocks.items():
        net = create_model(f"resnet{depth}_cifar")
        assert len(net.blocks()) == n_blocks
    # He et al. report 0.27M (ResNet-20) and 1.7M (ResNet-110) parameters with identity shortcuts;
    # the projection shortcuts SkipNet uses add two 1x1 convs (~2.6k weights plus BN).
    p20 = sum(p.numel() for p in create_model("resnet20_cifar").parameters())
    p110 = sum(p.numel() for p in create_model("resnet110_cifar").parameters())
    assert 0.27e6 <= p20 <= 0.28e6 and 1.73e6 <= p110 <= 1.74e6
    with pytest.raises(ValueError, match="6n\\+2"):
        CifarResNet(21)


def test_torchvision_resnet_matches_torchvision():
    from torchvision.models import resnet50

    ours, theirs = create_model("resnet50"), resnet50()
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters()) == 25_557_032
    ours.load_state_dict(theirs.state_dict())  # same parameter names: torchvision weights load unchanged
    x = torch.randn(1, 3, 64, 64)
    assert torch.allclose(ours.eval()(x), theirs.eval()(x), atol=1e-5)


def test_in_chans_is_configurable():
    assert create_model("resnet18", in_chans=1, num_classes=3).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    assert create_model("resnet38_cifar", in_chans=1).eval()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_timm_models_by_name():
    net = create_model("timm/resnet18", num_classes=5, in_chans=1)
    assert net.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 5)
    with pytest.raises(UserError, match="timm has no model"):
        create_model("timm/not_a_model_xyz")


def test_unknown_name_is_a_clear_error():
    with pytest.raises(UserError, match="unknown model 'resnet39_cifar'.*Did you mean.*resnet38_cifar"):
        create_model("resnet39_cifar")


def test_flat_models_need_image_size():
    with pytest.raises(UserError, match="image_size"):
        create_model("mlp", num_classes=10, in_chans=1)


def test_pretrained_from_local_file(tmp_path):
    src = create_model("resnet20_cifar", num_classes=4)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    loaded = create_model("resnet20_cifar", num_classes=4, pretrained=str(path))
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(src.eval()(x), loaded.eval()(x))
    # A Lightning checkpoint (net. prefix under state_dict) loads too.
    torch.save({"state_dict": {f"net.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.ckpt")
    loaded = create_model("resnet20_cifar", num_classes=4, pretrained=str(tmp_path / "w.ckpt"))
    assert torch.equal(src(x), loaded.eval()(x))
    with pytest.raises(UserError, match="do not fit"):
        create_model("resnet20_cifar", num_classes=5, pretrained=str(path))
    with pytest.raises(UserError, match="not found"):
        create_model("resnet20_cifar", pretrained=str(tmp_path / "missing.pt"))


def test_cifar_resnets_take_a_norm_layer():
    import torch.nn as nn

    net = create_model("resnet20_cifar", num_classes=10, in_chans=1, norm_layer=lambda c: nn.GroupNorm(4, c))
    kinds = {type(m) for m in net.modules()}
    assert nn.GroupNorm in kinds and nn.BatchNorm2d not in kinds  # every norm, shortcuts included
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in create_model("resnet20_cifar").modules())  # the default


def test_int8_quantization_tracks_the_float_model():
    from models.quantize import quantize_int8

    torch.manual_seed(0)
    net = create_model("resnet20_cifar", num_classes=10, in_chans=1).eval()
    with torch.no_grad():  # give BatchNorm non-trivial statistics, so that folding it is exercised
        net.train()
        for _ in range(3):
            net(torch.randn(32, 1, 28, 28))
        net.eval()
    calib = [torch.randn(16, 1, 28, 28) for _ in range(4)]
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        before = net(x)
    qnet = quantize_int8(net, calib)
    with torch.no_grad():
        ref, out = net(x), qnet(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape  # float in, float out
    assert any("Quantized" in type(m).__name__ or "quantized" in type(m).__module__ for m in qnet.modules())
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()          # int8 error well under the logits' range
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    assert torch.equal(before, ref)  # the float model is untouched (the same batch: kernels may round by batch size)
    with pytest.raises(UserError, match="backend must be one of"):
        quantize_int8(net, calib, backend="tensorrt")
    with pytest.raises(UserError, match="at least one input batch"):
        quantize_int8(net, [])


def test_qat_network_computes_what_its_int8_conversion_computes():
    """The fake-quantized network is what the int8 one will be, beyond the recorded ranges too (PyTorch's
    default x86 QAT clamps activations at 127 scale steps, the converted quint8 model at 255: values above
    the recorded range were clipped in training and not after conversion), and evaluation freezes ranges."""
    from models.quantize import qat_model

    torch.manual_seed(0)
    net = qat_model("resnet20_cifar", [1, 1, 16, 16], num_classes=10, in_chans=1)
    with torch.no_grad():
        for _ in range(3):  # training mode: BatchNorm statistics and the activation ranges are recorded
            net(torch.randn(32, 1, 16, 16))
        net.eval()
        scales = {k: v.clone() for k, v in net.state_dict().items() if k.endswith(".scale")}
        x = 3 * torch.randn(64, 1, 16, 16)  # well beyond the recorded input range
        fake, int8 = net(x), net.convert()(x)
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in scales.items())  # evaluation moved no range
        assert (fake - int8).abs().max() < 0.05 * fake.abs().max()
        assert (fake.argmax(1) == int8.argmax(1)).float().mean() >= 0.95
        net.train()
        net(x)
        assert any(not torch.equal(v, net.state_dict()[k]) for k, v in scales.items())  # training records again


def test_int8_skipnet_is_quantized_per_block_and_still_skips():
    from models.quantize import Int8Block, quantize_int8

    torch.manual_seed(0)
    net = create_model("skipnet20_cifar", num_classes=10, in_chans=1).eval()
    with torch.no_grad():
        net.train()
        for _ in range(3):
            net(torch.randn(32, 1, 28, 28), mode="hard_st", execution="masked")
        net.eval()
    qnet = quantize_int8(net, [torch.randn(16, 1, 28, 28) for _ in range(4)])
    assert all(isinstance(b, Int8Block) for b in qnet.blocks()) and qnet.blocks()[3].downsample is not None
    assert not any(isinstance(b, Int8Block) for b in net.blocks())  # the float model is untouched
    assert [id(b) for b in qnet.blocks()] == [id(b) for b in qnet.backbone.blocks()]  # the backbone's too
    x = torch.randn(32, 1, 28, 28)
    actions = (torch.rand(32, qnet.num_blocks) < 0.5).float()
    for a in (actions, torch.zeros_like(actions)):  # the same decisions: int8 logits track float ones
        with torch.no_grad():                      # (all closed runs the int8 projection shortcuts)
            ref, out = net(x, actions=a).logits, qnet(x, actions=a).logits
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.9
    with torch.no_grad():  # its own decisions: the batched and the batch-1 paths agree
        thr = float(qnet(x[:6]).probs.median())  # untrained gates: a threshold that opens about half
        whole = qnet(x[:6], threshold=thr)
        ones = [qnet(x[i:i + 1], threshold=thr) for i in range(6)]
    assert torch.equal(whole.executed, torch.cat([o.executed for o in ones]))
    assert torch.allclose(whole.logits, torch.cat([o.logits for o in ones]), atol=1e-4)
    assert 0 < float(whole.executed[:, 1:].mean()) < 1  # the gates do skip some blocks


# ------------------------------------------------------------------------------------ structured pruning
def _kill_weakest_half(net: torch.nn.Module) -> None:
    """Make half of every block's inner channels dead (tiny filters, BatchNorm to exactly 0), so that
    removing them must leave the output unchanged."""
    from models.prune import _PAIRS

    for block in net.modules():
        for a, n, _ in _PAIRS[:1]:
            conv, bn = getattr(block, a, None), getattr(block, n, None)
            if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and hasattr(block, "conv2"):
                dead = torch.arange(conv.out_channels) % 2 == 1
                conv.weight.data[dead] *= 1e-3
                bn.weight.data[dead] = 0.0
                bn.bias.data[dead] = 0.0


def test_pruning_removes_the_weakest_inner_channels_for_real():
    from models.prune import kept_channels, prune_channels

    torch.manual_seed(0)
    net = create_model("resnet20_cifar", num_classes=10, in_chans=1).eval()
    _kill_weakest_half(net)
    x = torch.randn(4, 1, 16, 16)
    pruned = prune_channels(net, 0.5)
    assert not pruned.training
    # The dead channels are the ones removed: same outputs, half the inner width, the original untouched.
    torch.testing.assert_close(pruned(x), net(x), rtol=1e-4, atol=1e-5)
    for old, new in zip(net.blocks(), pruned.blocks()):
        assert new.conv1.out_channels == new.bn1.num_features == new.conv2.in_channels == old.conv1.out_channels // 2
        assert new.conv2.out_channels == old.conv2.out_channels  # the block's output width is kept
        assert old.conv1.out_channels == old.conv2.in_channels
    # Real savings: the two 3x3 convs of every block halve, so the whole net's FLOPs nearly do.
    full, small = count_flops(net, x[:1]), count_flops(pruned, x[:1])
    assert 0.45 < small / full < 0.6
    assert kept_channels(16, 0.5) == 8 and kept_channels(3, 0.9) == 1  # never a block with no channel
    # A live channel is kept over a dead one whatever its index (the L2 ranking too).
    torch.testing.assert_close(prune_channels(net, 0.5, norm=2)(x), net(x), rtol=1e-4, atol=1e-5)


def test_pruning_bottlenecks_and_skipnets_and_refusing_what_cannot_be_pruned():
    from models.prune import prune_channels, pruned_model

    torch.manual_seed(0)
    r50 = create_model("resnet50", num_classes=10, in_chans=3).eval()
    p50 = prune_channels(r50, 0.5)
    b_old, b_new = r50.layer1[0], p50.layer1[0]
    assert (b_new.conv1.out_channels, b_new.conv2.in_channels, b_new.conv2.out_channels, b_new.conv3.in_channels) == (
        32, 32, 32, 32)
    assert b_new.conv3.out_channels == b_old.conv3.out_channels
    x = torch.randn(2, 3, 32, 32)
    assert p50(x).shape == (2, 10)
    torch.testing.assert_close(prune_channels(r50, 0.0)(x), r50(x))  # amount 0: the same network
    # A SkipNet's blocks prune in place under its gates; the engine runs the slimmer blocks.
    sk = create_model("skipnet20_cifar", num_classes=10, in_chans=1).eval()
    psk = prune_channels(sk, 0.5)
    out = psk(torch.randn(3, 1, 16, 16))
    assert out.logits.shape == (3, 10) and psk.blocks()[0].conv1.out_channels == 8
    # The builder a config names: same shapes as pruning the registered model.
    built = pruned_model("resnet20_cifar", amount=0.25, num_classes=10, in_chans=1)
    assert built.blocks()[-1].conv1.out_channels == 48
    with pytest.raises(UserError, match=r"amount must be in \[0, 1\)"):
        prune_channels(r50, 1.0)
    with pytest.raises(UserError, match="norm must be 1 or 2"):
        prune_channels(r50, 0.5, norm=3)
    with pytest.raises(UserError, match="ResNet-style"):
        prune_channels(create_model("mlp", num_classes=10, in_chans=1, image_size=8), 0.5)
