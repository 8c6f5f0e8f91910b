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

Quantization-aware training (:func:`qat_model`, the ``qat=x86`` config group): a trained classifier
is prepared with fake quantization (``prepare_qat_fx``: BatchNorm fused into the convolutions, int8
rounding simulated in the forward pass, straight-through gradients) and fine-tuned, so the weights
learn to live with int8 rounding. A QAT run loads as the fake-quantized network it was trained and
tested as; :meth:`QATNet.convert` (or :func:`quantize_int8` on it) gives the int8 module. Two
departures from PyTorch's default x86 QAT qconfig make the fake-quantized network compute what the int8
one will (without them MNIST ResNet-38 lost 4.25 points in conversion, docs/compression.md):

- activations clamp at the int8 tensor's range, 0..255: the default ``reduce_range`` fake quantization
  clamps at 127 scale steps, which the converted model (quint8, the same scale) does not, so every value
  above the learned range was clipped in training and passed through after conversion;
- the observers record ranges only in training mode (:meth:`QATNet.forward` follows ``training``):
  evaluation, and a test run, no longer move the learned ranges with the data they are scored on.

An :class:`cascades.IDKCascade` is quantized stage by stage (each stage calibrated on every calibration
input, the IDK deciders float); its thresholds and temperatures are kept as calibrated in float, so
the int8 cascade's accuracy and deferral are what those thresholds give on the int8 stages.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.ao.quantization import FakeQuantize

from cascades.model import IDKCascade
from gating.errors import UserError
from skipnet.models import SkipResNet

__all__ = ["QATNet", "QUANT_BACKENDS", "qat_model", "quantize_int8"]

QUANT_BACKENDS = ("x86", "fbgemm", "qnnpack")


def _check_backend(backend: str) -> None:
    if backend not in QUANT_BACKENDS:
        raise UserError(f"quantization backend must be one of {', '.join(QUANT_BACKENDS)}, got {backend!r}")
    if backend not in torch.backends.quantized.supported_engines:
        raise UserError(f"this torch build has no {backend!r} quantized engine "
                        f"(it has {', '.join(torch.backends.quantized.supported_engines)})")


class QATNet(nn.Module):
    """A classifier prepared for quantization-aware training: float in, float out, int8 rounding
    simulated by fake-quantize modules. Train it as any network; :meth:`convert` gives the int8 one.

    Args:
        prepared: the network traced by ``prepare_qat_fx``.
        backend: the quantized engine the int8 module is for.
        num_classes: the network's outputs (the trace keeps no attributes of the module it traced).
    """

    def __init__(self, prepared: nn.Module, backend: str, num_classes: int) -> None:
        super().__init__()
        self.prepared, self.backend, self.num_classes = prepared, backend, num_classes
        self._observing = True  # prepare_qat_fx leaves every observer on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Training mode records the ranges; evaluation uses them as they are. Checked here, not in
        # train(): Lightning restores modes by setting each module's ``training`` flag directly.
        if self.training != self._observing:
            from torch.ao.quantization import disable_observer, enable_observer

            self.prepared.apply(enable_observer if self.training else disable_observer)
            self._observing = self.training
        return self.prepared(x)

    @torch.no_grad()
    def convert(self) -> nn.Module:
        """The int8 module (a copy, on the CPU; this one is left as it is)."""
        from torch.ao.quantization.quantize_fx import convert_fx

        torch.backends.quantized.engine = self.backend
        return convert_fx(copy.deepcopy(self.prepared).cpu().eval())


class Int8RangeFakeQuantize(FakeQuantize):
    """Fake quantization of activations as the converted int8 model quantizes them: the scale and zero
    point come from the observer (over its reduced range, which keeps x86 kernels from saturating on
    the recorded values), while values clamp at the full quint8 range, 0..255, as a real quint8 tensor
    with that scale does. PyTorch's default clamps at the observer's reduced range instead, so values
    above the recorded range are clipped in training and not after conversion."""

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if self.observer_enabled[0] == 1:
            self.activation_post_process(X.detach())
            scale, zero_point = self.calculate_qparams()
            if self.scale.shape != scale.shape:
                self.scale.resize_(scale.shape)
                self.zero_point.resize_(zero_point.shape)
            self.scale.copy_(scale.to(self.scale.device))
            self.zero_point.copy_(zero_point.to(self.zero_point.device))
        if self.fake_quant_enabled[0] == 1:
            info = torch.iinfo(torch.uint8) if self.dtype == torch.quint8 else torch.iinfo(torch.int8)
            X = torch.fake_quantize_per_tensor_affine(X, self.scale, self.zero_point, info.min, info.max)
        return X


def _qat_qconfig_mapping(backend: str):
    """The backend's default QAT qconfig mapping, with activations fake-quantized by
    :class:`Int8RangeFakeQuantize` (weights as the default: per-channel symmetric int8)."""
    from torch.ao.quantization import QConfig, get_default_qat_qconfig_mapping
    from torch.ao.quantization.observer import MovingAverageMinMaxObserver

    mapping = get_default_qat_qconfig_mapping(backend)
    reduce_range = backend in ("x86", "fbgemm")  # as the default: 7-bit activation scales on x86
    activation = Int8RangeFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0,
                                                 quant_max=255, dtype=torch.quint8, reduce_range=reduce_range)
    # The global qconfig covers what a residual classifier quantizes (convolutions, linears, adds, ReLUs);
    # ops with fixed output ranges (sigmoid, tanh) keep the default's.
    return mapping.set_global(QConfig(activation=activation, weight=mapping.global_qconfig.weight))


def qat_model(model_name: str, example_shape: list[int], backend: str = "x86", **kwargs) -> QATNet:
    """Build the registered ``model_name`` (``kwargs`` as :func:`models.create_model` takes them, the
    float weights to start from as ``pretrained``) and prepare it for quantization-aware training.

    ``example_shape`` is one input's shape with its batch dimension (``[1, C, H, W]``): the trace
    needs an example. The preparation is deterministic, so a run's config rebuilds the same module,
    and its checkpoint (weights, fake-quantize scales and observer ranges) fills it.
    """
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    from models.registry import create_model

    _check_backend(backend)
    torch.backends.quantized.engine = backend
    net = create_model(model_name, **kwargs).train()
    try:
        prepared = prepare_qat_fx(net, _qat_qconfig_mapping(backend), (torch.zeros(*example_shape),))
    except Exception as e:  # torch.fx's trace errors name the unsupported construct
        raise UserError(f"{model_name} cannot be traced for quantization-aware training: {e}") from e
    return QATNet(prepared, backend, net.num_classes)


@torch.no_grad()
def quantize_int8(net: nn.Module, calibration: Iterable[torch.Tensor], backend: str = "x86") -> nn.Module:
    """An int8 copy of ``net`` (which is left as it was), calibrated on ``calibration`` input batches.

    Args:
        net: a float model whose forward FX can trace (no data-dependent Python control flow: plain
            classifiers and cascade stages), a :class:`skipnet.SkipResNet` (quantized per block) or an
            :class:`cascades.IDKCascade` (quantized per stage, its thresholds kept), or a
            :class:`QATNet` (converted with the ranges it learned; ``calibration`` is not used).
        calibration: input batches (``[B, C, H, W]`` floats) whose activation ranges set the scales.
        backend: ``x86`` (default; FBGEMM or oneDNN kernels), ``fbgemm`` or ``qnnpack`` (ARM).
    """
    if isinstance(net, QATNet):  # trained with fake quantization: its own ranges and backend, no calibration
        return net.convert()
    _check_backend(backend)
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
