"""Post-training static int8 quantization of any traceable registry model, with PyTorch's own stack.

    from models.quantize import quantize_int8
    qnet = quantize_int8(net, calibration_batches)      # float in, float out; int8 convs and linears inside

FX graph mode (``torch.ao.quantization.quantize_fx``): BatchNorm folds into the convolutions, ReLUs
fuse into them, and observers placed by the backend's default qconfig mapping (per-channel weights,
histogram activations for ``x86``) are calibrated on a few batches (the val split, never test). The
result runs on the CPU's int8 kernels (FBGEMM/oneDNN on x86, QNNPACK on ARM); it has no GPU path.

A SkipNet's gated forward does not trace as a whole (each decision is data-dependent), so it is
quantized block by block: each residual block, and the projection shortcut a skipped block still
runs, becomes an int8 module with float input and output, calibrated on the inputs that block sees
under the float network's own decisions. The gates, the stem (one small convolution) and the head
stay float, and the execution engine skips int8 blocks as it skips float ones.

An :class:`cascades.IDKCascade` is quantized stage by stage (each stage calibrated on every calibration
input, the IDK deciders float); its thresholds and temperatures are kept as calibrated in float, so
the int8 cascade's accuracy and deferral are what those thresholds give on the int8 stages.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn as nn

from cascades.model import IDKCascade
from gating.errors import UserError
from skipnet.models import SkipResNet

__all__ = ["QUANT_BACKENDS", "quantize_int8"]

QUANT_BACKENDS = ("x86", "fbgemm", "qnnpack")


@torch.no_grad()
def quantize_int8(net: nn.Module, calibration: Iterable[torch.Tensor], backend: str = "x86") -> nn.Module:
    """An int8 copy of ``net`` (which is left as it was), calibrated on ``calibration`` input batches.

    Args:
        net: a float model whose forward FX can trace (no data-dependent Python control flow: plain
            classifiers and cascade stages), a :class:`skipnet.SkipResNet` (quantized per block) or an
            :class:`cascades.IDKCascade` (quantized per stage, its thresholds kept).
        calibration: input batches (``[B, C, H, W]`` floats) whose activation ranges set the scales.
        backend: ``x86`` (default; FBGEMM or oneDNN kernels), ``fbgemm`` or ``qnnpack`` (ARM).
    """
    if backend not in QUANT_BACKENDS:
        raise UserError(f"quantization backend must be one of {', '.join(QUANT_BACKENDS)}, got {backend!r}")
    if backend not in torch.backends.quantized.supported_engines:
        raise UserError(f"this torch build has no {backend!r} quantized engine "
                        f"(it has {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = backend
    batches = [x.cpu() for x in calibration]
    if not batches:
        raise UserError("int8 calibration needs at least one input batch")
    float_net = copy.deepcopy(net).cpu().eval()
    if isinstance(float_net, SkipResNet):
        return _quantize_skipnet(float_net, batches, backend)
    if isinstance(float_net, IDKCascade):
        for k, stage in enumerate(float_net.stages):
            float_net.stages[k] = quantize_int8(stage, batches, backend)
        return float_net
    return _quantize_traced(float_net, batches, backend)


def _prepare(float_net: nn.Module, example: torch.Tensor, backend: str) -> nn.Module:
    """``float_net`` traced with observers (on a copy: fusing folds BatchNorm into the module it is given,
    and a block shares its shortcut)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    try:
        return prepare_fx(copy.deepcopy(float_net), get_default_qconfig_mapping(backend), (example,))
    except Exception as e:  # torch.fx's trace errors name the unsupported construct
        raise UserError(f"{type(float_net).__name__} cannot be traced for int8 quantization: {e}") from e


def _quantize_traced(float_net: nn.Module, batches: list[torch.Tensor], backend: str) -> nn.Module:
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _prepare(float_net, batches[0], backend)
    for x in batches:
        prepared(x)
    return convert_fx(prepared)


class Int8Block(nn.Module):
    """A residual block quantized whole, with its projection shortcut (what a skipped block runs)
    quantized on its own; float in, float out."""

    def __init__(self, body: nn.Module, downsample: nn.Module | None) -> None:
        super().__init__()
        self.body, self.downsample = body, downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _quantize_skipnet(net: SkipResNet, batches: list[torch.Tensor], backend: str) -> SkipResNet:
    """Each block of ``net`` (a float copy, changed in place) replaced by an :class:`Int8Block`.

    Calibration streams: each block's observers see its inputs as the float network runs (masked, so
    every block sees every row under the float decisions), and no activations are kept.
    """
    from torch.ao.quantization.quantize_fx import convert_fx

    blocks = net.blocks()
    first: list[torch.Tensor | None] = [None] * len(blocks)
    observed: list[tuple[nn.Module, nn.Module | None]] = []

    def keep_first(k: int, x: torch.Tensor) -> None:
        if first[k] is None:
            first[k] = x[:1].clone()

    def observe(k: int, x: torch.Tensor) -> None:
        for prepared in observed[k]:
            if prepared is not None:
                prepared(x)

    def run(hook: Callable[[int, torch.Tensor], None], xs: list[torch.Tensor]) -> None:
        handles = [b.register_forward_pre_hook(lambda _m, args, k=k: hook(k, args[0])) for k, b in enumerate(blocks)]
        try:
            for x in xs:
                net(x, mode="greedy", execution="masked")
        finally:
            for h in handles:
                h.remove()

    run(keep_first, batches[:1])  # one row per block: the example each trace needs
    for block, example in zip(blocks, first):
        ds = getattr(block, "downsample", None)
        observed.append((_prepare(block, example, backend), None if ds is None else _prepare(ds, example, backend)))
    run(observe, batches)
    net.replace_blocks([Int8Block(convert_fx(body), None if ds is None else convert_fx(ds)) for body, ds in observed])
    return net
