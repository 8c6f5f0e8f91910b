"""Structured channel pruning of residual blocks (Li et al., "Pruning Filters for Efficient ConvNets", ICLR'17).

    from models.prune import prune_channels
    small = prune_channels(net, amount=0.5)        # a copy; ``net`` is left as it was

In every residual block the channels *inside* the block (the outputs of each convolution that feeds
another convolution of the same block) are ranked by the L1 (or L2) norm of their filters, and the
weakest ``amount`` of them are removed for real: the convolution loses those filters, its BatchNorm
those channels, the next convolution those input channels. The block's input and output width, and
so the shortcut, the gates and the head, are untouched. The result is a smaller dense network whose
FLOPs and time both fall, unlike a 0/1 mask (``torch.nn.utils.prune``), which keeps every
multiply-add. Any model whose blocks have ``conv1, bn1, conv2`` (BasicBlock) or ``conv1..3, bn1..3``
(Bottleneck) is handled, a :class:`skipnet.SkipResNet` included, since its blocks are the same modules.

``pruned_model`` is the registry-style builder a training config names: it builds the registered
model (with the weights being pruned as ``pretrained``) and prunes it. A pruned run's config therefore
rebuilds the pruned shapes, and its checkpoint fills them: the kept channel *counts* depend only on
``amount``, not on the weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from gating.errors import UserError
from models.registry import create_model

__all__ = ["prune_channels", "pruned_model", "pruned_skipnet", "kept_channels"]

# (conv, its norm, the conv it feeds) inside one block, in the order the block runs them.
_PAIRS = (("conv1", "bn1", "conv2"), ("conv2", "bn2", "conv3"))


def kept_channels(channels: int, amount: float) -> int:
    """How many of ``channels`` inner channels a block keeps when ``amount`` of them are pruned (at least 1)."""
    return max(1, int(round(channels * (1.0 - amount))))


def _inner_pair(block: nn.Module, a: str, n: str, b: str) -> tuple[nn.Conv2d, nn.BatchNorm2d, nn.Conv2d] | None:
    conv, norm, nxt = getattr(block, a, None), getattr(block, n, None), getattr(block, b, None)
    if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and isinstance(nxt, nn.Conv2d):
        if conv.groups == 1 and nxt.groups == 1 and norm.num_features == conv.out_channels == nxt.in_channels:
            return conv, norm, nxt
    return None


def _slim_conv(conv: nn.Conv2d, out_idx: torch.Tensor | None = None, in_idx: torch.Tensor | None = None) -> nn.Conv2d:
    w = conv.weight.detach()
    if out_idx is not None:
        w = w.index_select(0, out_idx)
    if in_idx is not None:
        w = w.index_select(1, in_idx)
    new = nn.Conv2d(w.shape[1], w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if conv.bias is not None:
        b = conv.bias.detach()
        new.bias.data.copy_(b if out_idx is None else b.index_select(0, out_idx))
    return new


def _slim_norm(norm: nn.BatchNorm2d, idx: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                         track_running_stats=norm.track_running_stats, device=idx.device)
    if norm.affine:
        new.weight.data.copy_(norm.weight.detach().index_select(0, idx))
        new.bias.data.copy_(norm.bias.detach().index_select(0, idx))
    if norm.track_running_stats:
        new.running_mean.copy_(norm.running_mean.index_select(0, idx))
        new.running_var.copy_(norm.running_var.index_select(0, idx))
        new.num_batches_tracked.copy_(norm.num_batches_tracked)
    return new


@torch.no_grad()
def prune_channels(net: nn.Module, amount: float, norm: int = 1) -> nn.Module:
    """A copy of ``net`` with ``amount`` of every residual block's inner channels removed.

    Args:
        net: any model with BasicBlock- or Bottleneck-shaped blocks (CIFAR and ImageNet ResNets,
            SkipNets, timm ResNets).
        amount: the share of each block's inner channels to remove, in [0, 1); each block keeps
            ``kept_channels(c, amount)`` of its ``c``.
        norm: 1 (Li et al.) or 2: the norm of each channel's filter that ranks it.

    Returns the pruned copy, in the mode ``net`` was in. Raises :class:`UserError` when ``net`` has no
    block to prune or the arguments are out of range.
    """
    if not 0.0 <= float(amount) < 1.0:
        raise UserError(f"pruning amount must be in [0, 1) (the share of channels removed), got {amount!r}")
    if norm not in (1, 2):
        raise UserError(f"pruning norm must be 1 or 2, got {norm!r}")
    pruned = copy.deepcopy(net)
    found = 0
    for block in list(pruned.modules()):
        for a, n, b in _PAIRS:
            # Read the modules now: Bottleneck's conv2 is slimmed as the first pair's next conv.
            pair = _inner_pair(block, a, n, b)
            if pair is None:
                continue
            conv, bn, nxt = pair
            found += 1
            score = conv.weight.detach().flatten(1).norm(p=norm, dim=1)
            # The kept channels stay in their original order: only the set is chosen.
            idx = torch.topk(score, kept_channels(conv.out_channels, amount), sorted=False).indices.sort().values
            setattr(block, a, _slim_conv(conv, out_idx=idx))
            setattr(block, n, _slim_norm(bn, idx))
            setattr(block, b, _slim_conv(nxt, in_idx=idx))
    if not found:
        raise UserError(f"{type(net).__name__} has no residual block with inner conv -> BatchNorm -> conv layers "
                        f"(conv1/bn1/conv2): structured pruning applies to ResNet-style models")
    return pruned.train(net.training)


def pruned_model(model_name: str, amount: float, norm: int = 1, **kwargs: Any) -> nn.Module:
    """Build the registered ``model_name`` (``kwargs`` as :func:`models.create_model` takes them, the
    weights to prune as ``pretrained``) and prune it with :func:`prune_channels`."""
    return prune_channels(create_model(model_name, **kwargs), amount, norm)


def pruned_skipnet(backbone: nn.Module, gate: Any, amount: float, norm: int = 1, threshold: float = 0.5,
                   pretrained: str | None = None) -> nn.Module:
    """A trained SkipNet (:func:`models.skipnet.skipnet_from_backbone`'s arguments, its weights as
    ``pretrained``) with :func:`prune_channels` applied: the gates are kept as trained, each block's
    inner channels are cut (the gates see block outputs, whose width pruning keeps)."""
    from models.skipnet import skipnet_from_backbone

    return prune_channels(skipnet_from_backbone(backbone, gate, threshold, pretrained), amount, norm)
