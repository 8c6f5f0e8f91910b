"""Post-training static int8 quantization of any traceable registry model, with PyTorch's own stack.

    from models.quantize import quantize_int8
    qnet = quantize_int8(net, calibration_batches)      # float in, float out; int8 convs and linears inside

FX graph mode (``torch.ao.quantization.quantize_fx``): BatchNorm folds into the convolutions, ReLUs
fuse into them, and observers placed by the backend's default qconfig mapping (per-channel weights,
histogram activations for ``x86``) are calibrated on a few batches (the val split, never test). The
result runs on the CPU's int8 kernels (FBGEMM/oneDNN on x86, QNNPACK on ARM); it has no GPU path.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from gating.errors import UserError

__all__ = ["QUANT_BACKENDS", "quantize_int8"]

QUANT_BACKENDS = ("x86", "fbgemm", "qnnpack")


@torch.no_grad()
def quantize_int8(net: nn.Module, calibration: Iterable[torch.Tensor], backend: str = "x86") -> nn.Module:
    """An int8 copy of ``net`` (which is left as it was), calibrated on ``calibration`` input batches.

    Args:
        net: a float model whose forward FX can trace (no data-dependent Python control flow: plain
            classifiers and cascade stages; SkipNet's gated forward is not traceable as a whole).
        calibration: input batches (``[B, C, H, W]`` floats) whose activation ranges set the scales.
        backend: ``x86`` (default; FBGEMM or oneDNN kernels), ``fbgemm`` or ``qnnpack`` (ARM).
    """
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    if backend not in QUANT_BACKENDS:
        raise UserError(f"quantization backend must be one of {', '.join(QUANT_BACKENDS)}, got {backend!r}")
    if backend not in torch.backends.quantized.supported_engines:
        raise UserError(f"this torch build has no {backend!r} quantized engine "
                        f"(it has {', '.join(torch.backends.quantized.supported_engines)})")
    torch.backends.quantized.engine = backend
    batches = iter(calibration)
    first = next(batches, None)
    if first is None:
        raise UserError("int8 calibration needs at least one input batch")
    float_net = copy.deepcopy(net).cpu().eval()
    try:
        prepared = prepare_fx(float_net, get_default_qconfig_mapping(backend), (first,))
    except Exception as e:  # torch.fx's trace errors name the unsupported construct
        raise UserError(f"{type(net).__name__} cannot be traced for int8 quantization: {e}") from e
    prepared(first)
    for x in batches:
        prepared(x)
    return convert_fx(prepared)
