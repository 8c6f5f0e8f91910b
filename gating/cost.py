"""Cost accounting, in one place: exact FLOPs, per-block cost tables, per-sample cost, latency.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` over the aten ops that really
run: matrix multiplies and convolutions, 2 FLOPs per multiply-add (so FLOPs = 2 x MACs; torchvision's
ResNet-50 at 224x224 is 8.18 GFLOPs = 4.09 GMACs). Element-wise ops (BN, ReLU, adds, pooling) are not
counted, as in torchvision's and fvcore's figures.

A conditional model's cost for one input is ``fixed + gates + sum_i executed_i * block_i +
(1 - executed_i) * skipped_i`` where ``skipped_i`` is what a skipped block still runs (the projection
shortcut of a downsampling block). :class:`CostTable` holds those numbers, measured once at batch 1.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "CostTable",
    "LatencyStats",
    "ModelCost",
    "analytic_flops",
    "block_modules",
    "build_cost_table",
    "conv2d_flops",
    "count_flops",
    "flops_by_module",
    "counting_int8_ops",
    "counting_int8_ops_by_module",
    "int8_ops",
    "is_quantized",
    "model_cost",
    "linear_flops",
    "measure_interleaved",
    "measure_latency",
    "profile_blocks",
    "stage_flops",
    "StageCosts",
    "weight_bytes",
]


# ---------------------------------------------------------------------------------------------- FLOPs
def count_flops(fn: Callable[..., Any] | nn.Module, *inputs: Any) -> int:
    """Exact FLOPs of one call ``fn(*inputs)``, counted over the ops that run (no_grad).

    Outside inference mode even when called inside it (as Lightning's test loop does): the counter's
    module tracker hooks the autograd graph of what a module is given, and a module given a parameter
    (a fake-quantize module given its layer's weight) has none under inference mode.
    """
    with torch.inference_mode(False), torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return int(counter.get_total_flops())


def flops_by_module(model: nn.Module, *inputs: Any) -> dict[str, int]:
    """FLOPs of one forward pass per submodule path (``""`` is the whole call; ``"layer1.0"`` a block).

    A module called several times (a shared gate, say) accumulates all its calls.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    root = type(model).__name__
    out: dict[str, int] = {}
    for key, per_op in counter.get_flop_counts().items():
        if key == "Global":
            out[""] = int(sum(per_op.values()))
        elif key == root or key.startswith(root + "."):
            out[key[len(root) + 1 :]] = int(sum(per_op.values()))
    out.setdefault("", int(counter.get_total_flops()))
    return out


def conv2d_flops(
    in_channels: int, out_channels: int, kernel_size: tuple[int, int], out_hw: tuple[int, int], groups: int = 1,
    bias: bool = False, batch: int = 1,
) -> int:
    """Hand formula: 2 x (C_in/groups x k_h x k_w) x C_out x H_out x W_out multiply-adds per sample.

    ``bias`` is accepted for completeness and adds nothing: the counters treat bias adds as element-wise.
    """
    macs = (in_channels // groups) * kernel_size[0] * kernel_size[1] * out_channels * out_hw[0] * out_hw[1]
    return 2 * macs * batch


def linear_flops(in_features: int, out_features: int, rows: int = 1) -> int:
    """Hand formula: 2 x in x out per row."""
    return 2 * in_features * out_features * rows


def analytic_flops(model: nn.Module, *inputs: Any) -> int:
    """FLOPs from module shapes (forward hooks on Conv2d and Linear), independent of FlopCounterMode.

    Used to cross-check :func:`count_flops`; models whose matmuls are not in Conv2d/Linear modules
    (attention, say) are under-counted here, not by :func:`count_flops`.
    """
    total = 0

    def conv_hook(m: nn.Conv2d, args, out: torch.Tensor) -> None:
        nonlocal total
        total += conv2d_flops(m.in_channels, m.out_channels, m.kernel_size, tuple(out.shape[-2:]), m.groups,
                              batch=out.shape[0])

    def linear_hook(m: nn.Linear, args, out: torch.Tensor) -> None:
        nonlocal total
        total += linear_flops(m.in_features, m.out_features, rows=out.numel() // m.out_features)

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return total


def _quantized_kinds() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """The int8 convolution and linear module types (their fused ReLU variants subclass them)."""
    import torch.ao.nn.quantized as nnq

    return (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d), (nnq.Linear,)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds int8 convolutions or linears (which run on the CPU's int8 kernels only)."""
    convs, linears = _quantized_kinds()
    return any(isinstance(m, convs + linears) for m in model.modules())


@contextmanager
def counting_int8_ops(model: nn.Module) -> Iterator[list[int]]:
    """Count the integer operations of whatever runs ``model``'s int8 layers inside the block: yields a
    one-element list whose item is the running total (2 per int8 multiply-add of the quantized
    convolutions and linears that run; forward hooks, so a skipped block counts nothing)."""
    convs, linears = _quantized_kinds()
    total = [0]

    def conv_hook(m: nn.Module, args, out: torch.Tensor) -> None:
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,)
        total[0] += 2 * (m.in_channels // m.groups) * math.prod(k) * out.numel()

    def linear_hook(m: nn.Module, args, out: torch.Tensor) -> None:
        total[0] += linear_flops(m.in_features, m.out_features, rows=out.numel() // m.out_features)

    handles = [m.register_forward_hook(conv_hook if isinstance(m, convs) else linear_hook)
               for m in model.modules() if isinstance(m, convs + linears)]
    try:
        yield total
    finally:
        for h in handles:
            h.remove()


@contextmanager
def counting_int8_ops_by_module(model: nn.Module) -> Iterator[dict[str, int]]:
    """Like :func:`counting_int8_ops`, per module path: yields ``{path: ops}`` where each int8 layer's
    operations count towards its own path and every enclosing one (``""`` is the whole model), as
    :func:`flops_by_module` attributes FLOPs."""
    paths = {m: name for name, m in model.named_modules()}
    out: dict[str, int] = {}
    with counting_int8_ops(model) as total:
        convs, linears = _quantized_kinds()
        last = [0]

        def attribute(m: nn.Module, args, output) -> None:  # runs after counting_int8_ops' own hook
            spent, last[0] = total[0] - last[0], total[0]
            parts = paths[m].split(".") if paths[m] else []
            for k in range(len(parts) + 1):
                key = ".".join(parts[:k])
                out[key] = out.get(key, 0) + spent

        handles = [m.register_forward_hook(attribute) for m in model.modules() if isinstance(m, convs + linears)]
        try:
            yield out
        finally:
            for h in handles:
                h.remove()


def int8_ops(model: nn.Module, *inputs: Any, forward: Callable[..., Any] | None = None) -> int:
    """Integer operations of one call ``model(*inputs)`` (or ``forward(*inputs)``, calling into ``model``),
    as :func:`counting_int8_ops` counts them.

    :class:`~torch.utils.flop_counter.FlopCounterMode` does not see these ops at all, so a quantized
    model's :func:`count_flops` is only what it still computes in float; the two together are its cost.
    """
    with counting_int8_ops(model) as total, torch.no_grad():
        (forward or model)(*inputs)
    return total[0]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the serialized state dict: what a checkpoint or a replica holds (int8 weights and their
    scales for a quantized model, float ones otherwise; BatchNorm statistics included)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _num_params(model: nn.Module) -> int:
    """Weights and biases, float or packed int8 (quantized modules keep theirs outside ``parameters()``)."""
    convs, linears = _quantized_kinds()
    total = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, convs + linears):
            weight, bias = m.weight(), m.bias()
            total += weight.numel() + (bias.numel() if bias is not None else 0)
    return total


@dataclass
class ModelCost:
    """One model's cost on one axis: float and int8 work per input, size, and measured latency.

    Attributes:
        gflops: float FLOPs per input (what still runs in float in a quantized model).
        int8_gops: int8 operations per input (2 per multiply-add), 0 for a float model.
        params: weights and biases.
        weight_bytes: bytes of the serialized state dict.
        latency_ms: median latency by batch size (per call, not per input), if measured.
    """

    gflops: float
    int8_gops: float
    params: int
    weight_bytes: int
    latency_ms: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {"gflops_per_img": self.gflops, "int8_gops_per_img": self.int8_gops, "params": self.params,
               "weight_bytes": self.weight_bytes}
        out.update({f"latency_ms_b{b}": ms for b, ms in self.latency_ms.items()})
        return out


def model_cost(model: nn.Module, example: torch.Tensor, batch_sizes: Sequence[int] = (),
               repeats: int = 20, max_seconds: float | None = 10.0) -> ModelCost:
    """The cost of ``model`` on ``example`` (one input, ``[1, ...]``), and its latency at each of
    ``batch_sizes`` (the example repeated). A conditional model's work depends on the input: this is the
    cost of this one (the evaluator gives it per test input)."""
    model.eval()
    n = example.shape[0]
    latency = {}
    for b in batch_sizes:
        xb = example.repeat(b, *([1] * (example.ndim - 1)))
        latency[b] = measure_latency(lambda xb=xb: model(xb), example.device, warmup=3, repeats=repeats,
                                     max_seconds=max_seconds).median_ms
    return ModelCost(gflops=count_flops(model, example) / n / 1e9, int8_gops=int8_ops(model, example) / n / 1e9,
                     params=_num_params(model), weight_bytes=weight_bytes(model), latency_ms=latency)


# ----------------------------------------------------------------------------------------- cost table
def block_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's conditional units (residual blocks) as ``(path, module)`` in execution order.

    Uses ``model.blocks()`` where the model defines it (every ResNet in the registry does); otherwise
    the residual blocks torchvision and timm define; otherwise the model's direct children.
    """
    paths = {m: name for name, m in model.named_modules()}
    blocks_fn = getattr(model, "blocks", None)
    if callable(blocks_fn):
        return [(paths[m], m) for m in blocks_fn()]
    residual = _known_residual_block_types()
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, residual)]
    return found or list(model.named_children())


def _known_residual_block_types() -> tuple[type, ...]:
    from torchvision.models.resnet import BasicBlock as TvBasic
    from torchvision.models.resnet import Bottleneck as TvBottleneck

    types: list[type] = [TvBasic, TvBottleneck]
    try:
        from timm.models.resnet import BasicBlock as TimmBasic
        from timm.models.resnet import Bottleneck as TimmBottleneck

        types += [TimmBasic, TimmBottleneck]
    except ImportError:  # pragma: no cover - timm is a dependency, but the table does not need it
        pass
    return tuple(types)


@dataclass(frozen=True)
class CostTable:
    """Per-sample cost of a model split into fixed parts and skippable blocks (measured at batch 1).

    Float FLOPs and int8 operations are kept apart (the FLOP counter does not see int8 kernels, and an
    int8 operation is not a float FLOP): an int8 network's blocks have ``block_flops`` 0 and their work in
    ``block_int8``.

    Attributes:
        block_names: module paths of the skippable blocks, in execution order.
        block_flops: float FLOPs of each block when it runs, shape ``[N]``.
        skip_flops: float FLOPs each block still spends when skipped (its projection shortcut), ``[N]``.
        fixed_flops: float FLOPs outside blocks and gates (stem, head).
        gate_flops: float FLOPs of all decision modules (gates) for one sample; 0 for static models.
        input_shape: the per-sample input shape the table was measured at.
        block_int8, skip_int8: int8 operations of each block when it runs / when skipped, ``[N]``
            (None: a float network, all zero).
        fixed_int8: int8 operations outside blocks and gates.
    """

    block_names: tuple[str, ...]
    block_flops: torch.Tensor
    skip_flops: torch.Tensor
    fixed_flops: float
    gate_flops: float = 0.0
    input_shape: tuple[int, ...] = field(default=())
    block_int8: torch.Tensor | None = None
    skip_int8: torch.Tensor | None = None
    fixed_int8: float = 0.0

    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    @property
    def has_int8(self) -> bool:
        """Whether any part of the network runs int8 operations."""
        return bool(self.fixed_int8) or any(t is not None and bool(t.any()) for t in (self.block_int8, self.skip_int8))

    @property
    def full_flops(self) -> float:
        """Float FLOPs per sample with every block executed (gates included)."""
        return self.fixed_flops + self.gate_flops + float(self.block_flops.sum())

    @property
    def full_int8(self) -> float:
        """Int8 operations per sample with every block executed."""
        return self.fixed_int8 + (float(self.block_int8.sum()) if self.block_int8 is not None else 0.0)

    def _check(self, executed: torch.Tensor) -> torch.Tensor:
        if executed.shape[-1] != self.num_blocks:
            raise ValueError(f"executed has {executed.shape[-1]} columns, the table has {self.num_blocks} blocks")
        return executed.to(torch.float64)

    def per_sample(self, executed: torch.Tensor) -> torch.Tensor:
        """Float FLOPs per sample for block-execution indicators ``executed`` of shape ``[B, N]`` (0/1).

        Returns a float64 tensor ``[B]``: fixed + gates + executed blocks + shortcuts of skipped ones.
        """
        e = self._check(executed)
        full, skip = self.block_flops.to(e.device), self.skip_flops.to(e.device)
        return self.fixed_flops + self.gate_flops + e @ full + (1.0 - e) @ skip

    def per_sample_int8(self, executed: torch.Tensor) -> torch.Tensor:
        """Int8 operations per sample for ``executed [B, N]``, as :meth:`per_sample` counts FLOPs."""
        e = self._check(executed)
        if self.block_int8 is None:
            return torch.full((e.shape[0],), self.fixed_int8, dtype=torch.float64, device=e.device)
        full = self.block_int8.to(e.device)
        skip = self.skip_int8.to(e.device) if self.skip_int8 is not None else torch.zeros_like(full)
        return self.fixed_int8 + e @ full + (1.0 - e) @ skip

    def computation_percentage(self, executed: torch.Tensor) -> torch.Tensor:
        """SkipNet's "computation percentage", per sample: the share of blocks executed, in percent.

        With block 0 always executed this is SkipNet's ``(sum_gates exec_rate + 1) / (num_gates + 1)``.
        It weights blocks equally and ignores gates: kept to compare with the paper, not as a cost.
        """
        return 100.0 * self._check(executed).mean(-1)

    def _int8_of(self, k: int) -> tuple[float, float]:
        if self.block_int8 is None:
            return 0.0, 0.0
        return float(self.block_int8[k]), float(self.skip_int8[k]) if self.skip_int8 is not None else 0.0

    def rows(self) -> list[dict[str, Any]]:
        """One row per block plus the fixed and gate parts, for tables and JSON (``share_pct`` of all
        operations, float and int8 together)."""
        rows = [{"unit": "(fixed: stem, head)", "flops": self.fixed_flops, "skipped_flops": self.fixed_flops}]
        if self.has_int8:
            rows[0].update(int8_ops=self.fixed_int8, skipped_int8_ops=self.fixed_int8)
        if self.gate_flops:
            rows.append({"unit": "(gates)", "flops": self.gate_flops, "skipped_flops": self.gate_flops})
        for k, (n, f, s) in enumerate(zip(self.block_names, self.block_flops.tolist(), self.skip_flops.tolist())):
            rows.append({"unit": n, "flops": float(f), "skipped_flops": float(s)})
            if self.has_int8:
                rows[-1]["int8_ops"], rows[-1]["skipped_int8_ops"] = self._int8_of(k)
        total = self.full_flops + self.full_int8
        for r in rows:
            r["share_pct"] = 100.0 * (r["flops"] + r.get("int8_ops", 0.0)) / total if total else 0.0
        return rows

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "input_shape": list(self.input_shape),
            "full_flops": self.full_flops,
            "fixed_flops": self.fixed_flops,
            "gate_flops": self.gate_flops,
            "blocks": [
                {"name": n, "flops": float(f), "skipped_flops": float(s)}
                for n, f, s in zip(self.block_names, self.block_flops.tolist(), self.skip_flops.tolist())
            ],
        }
        if self.has_int8:
            out.update(full_int8_ops=self.full_int8, fixed_int8_ops=self.fixed_int8)
            for k, b in enumerate(out["blocks"]):
                b["int8_ops"], b["skipped_int8_ops"] = self._int8_of(k)
        return out


def build_cost_table(
    model: nn.Module,
    example_input: torch.Tensor,
    blocks: Sequence[tuple[str, nn.Module]] | None = None,
    gates: Iterable[str] = (),
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> CostTable:
    """Measure a :class:`CostTable` with one batch-1 forward pass under FlopCounterMode.

    Args:
        model: the network (static, or conditional with every block executed by ``forward``).
        example_input: one input; only its first sample is used.
        blocks: the skippable blocks; by default :func:`block_modules`.
        gates: module paths of decision modules (their FLOPs go to ``gate_flops``).
        forward: how to run the model with every block executed; default ``model(x)``.
    """
    x = example_input[:1]
    blocks = list(blocks) if blocks is not None else block_modules(model)
    inputs: dict[str, tuple] = {}
    handles = [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.setdefault(n, args)) for n, m in blocks]
    was_training = model.training
    model.eval()
    try:
        with counting_int8_ops_by_module(model) as int8:
            per_module = _flops_by_module_call(model, forward or model, x)
        # What a skipped block still runs: its projection shortcut (torchvision/timm name it downsample),
        # counted on the input the block received. (Inside a running block it may not run at all: an int8
        # block computes its shortcut within its fused body and keeps the separate one for when skipped.)
        shortcuts = [_shortcut_cost(m, inputs.get(n)) for n, m in blocks]
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    names = tuple(n for n, _ in blocks)

    def split(count: dict[str, int]) -> tuple[torch.Tensor, float, float]:
        full = torch.tensor([float(count.get(n, 0)) for n in names], dtype=torch.float64)
        gate = float(sum(count.get(g, 0) for g in gates))
        return full, gate, float(count.get("", 0)) - float(full.sum()) - gate

    block_flops, gate_flops, fixed = split(per_module)
    skip_flops = torch.tensor([f for f, _ in shortcuts], dtype=torch.float64)
    table = CostTable(names, block_flops, skip_flops, fixed, gate_flops, tuple(x.shape[1:]))
    skip_int8 = torch.tensor([q for _, q in shortcuts], dtype=torch.float64)
    if not int8 and not skip_int8.any():
        return table
    block_int8, gate_int8, fixed_int8 = split(int8)
    # a quantized gate would be int8 work outside the blocks: it is counted with the fixed part
    return replace(table, block_int8=block_int8, skip_int8=skip_int8, fixed_int8=fixed_int8 + gate_int8)


def _shortcut_cost(block: nn.Module, args: tuple | None) -> tuple[float, float]:
    """(float FLOPs, int8 operations) of ``block``'s projection shortcut on ``args``; (0, 0) for none."""
    ds = getattr(block, "downsample", None)
    if not isinstance(ds, nn.Module) or args is None:
        return 0.0, 0.0
    return float(count_flops(ds, *args)), float(int8_ops(ds, *args)) if is_quantized(ds) else 0.0


def _flops_by_module_call(model: nn.Module, forward: Callable[..., Any], x: torch.Tensor) -> dict[str, int]:
    if forward is model:
        return flops_by_module(model, x)

    class _Call(nn.Module):  # lets a custom forward be tracked with the model's module paths
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, inp):
            return forward(inp)

    counts = flops_by_module(_Call(), x)
    return {("" if k == "" else k[2:] if k.startswith("m.") else k): v for k, v in counts.items() if k != "m"}


# -------------------------------------------------------------------------------------------- latency
@dataclass(frozen=True)
class LatencyStats:
    """Wall-time statistics over repeats, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    repeats: int
    device: str

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], device: str) -> "LatencyStats":
        s = sorted(samples_ms)
        q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
        return cls(
            median_ms=statistics.median(s), p10_ms=q[0], p90_ms=q[-1], mean_ms=statistics.fmean(s),
            std_ms=statistics.pstdev(s), min_ms=s[0], repeats=len(s), device=device,
        )


def measure_latency(
    fn: Callable[[], Any], device: torch.device | str | None = None, warmup: int = 10, repeats: int = 50,
    max_seconds: float | None = None, min_repeats: int = 3,
) -> LatencyStats:
    """Time ``fn()`` after ``warmup`` calls: CUDA events on a GPU, ``perf_counter`` on the CPU.

    ``max_seconds`` stops early (after at least ``min_repeats``) once the timed calls add up to it,
    so one benchmark can hold both millisecond and multi-second cases.
    """
    return measure_interleaved({"fn": fn}, device, warmup, repeats, max_seconds, min_repeats)["fn"]


def _time_call_ms(fn: Callable[[], Any], cuda: bool) -> float:
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def measure_interleaved(
    fns: dict[str, Callable[[], Any]], device: torch.device | str | None = None, warmup: int = 3, repeats: int = 20,
    max_seconds: float | None = None, min_repeats: int = 3, primed: bool = False,
) -> dict[str, LatencyStats]:
    """Time several variants of one job in interleaved rounds (A, B, C, A, B, C, ...).

    Machine drift (frequency, neighbours, caches) then hits every variant alike, which matters when
    the point is their ratio. ``max_seconds`` bounds the timed work of all variants together.

    ``primed``: each timed call directly follows one untimed call of the same variant, so every
    variant is timed with its own weights in the CPU's caches, as in a server that runs one model.
    Without it, a variant whose weights the others do not share is timed cold after them while
    variants that share weights warm each other: at batch 1 on a 2 MB ResNet-38 that made the plain
    ResNet about 2.5% slower than itself warm (docs/compression.md).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    samples: dict[str, list[float]] = {k: [] for k in fns}
    cuda = device.type == "cuda"
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        if cuda:
            torch.cuda.synchronize(device)
        for _ in range(repeats):
            total_s = sum(sum(v) for v in samples.values()) / 1e3
            if max_seconds is not None and len(next(iter(samples.values()))) >= min_repeats and total_s >= max_seconds:
                break
            for name, fn in fns.items():
                if primed:
                    fn()
                samples[name].append(_time_call_ms(fn, cuda))
    return {k: LatencyStats.from_samples(v, str(device)) for k, v in samples.items()}


def profile_blocks(
    model: nn.Module,
    example_input: torch.Tensor,
    blocks: Sequence[tuple[str, nn.Module]] | None = None,
    warmup: int = 5,
    repeats: int = 20,
) -> dict[str, LatencyStats]:
    """Latency of the whole model and of each block on the input it really receives.

    Each block's input is captured with a forward pre-hook during one pass, then the block is timed
    alone on it. Returns ``{"(model)": stats, "<block path>": stats, ...}``.
    """
    blocks = list(blocks) if blocks is not None else block_modules(model)
    device = example_input.device
    captured: dict[str, tuple] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: captured.__setitem__(n, args)) for n, m in blocks]
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    out = {"(model)": measure_latency(lambda: model(example_input), device, warmup, repeats)}
    for n, m in blocks:
        if n in captured:
            args = captured[n]
            out[n] = measure_latency(lambda m=m, a=args: m(*a), device, warmup, repeats)
    return out


# ------------------------------------------------------------------------------------- staged models
@dataclass(frozen=True)
class StageCosts:
    """Per-sample cost of each stage of a cascade (or early-exit network), in execution order.

    A sample that exits at stage ``e`` pays ``stage[0] + ... + stage[e]``; over a population,
    ``E[cost] = sum_k stage[k] * P(reach k)``. The unit is the caller's (FLOPs, or ms per image).
    ``int8`` holds each stage's int8 operations where a stage is quantized (empty: none is), since the
    FLOP counter does not see them.
    """

    names: tuple[str, ...]
    stage: tuple[float, ...]
    int8: tuple[float, ...] = ()

    @property
    def cumulative(self) -> torch.Tensor:
        """Cost of exiting at each stage, ``[K]`` float64."""
        return torch.tensor(self.stage, dtype=torch.float64).cumsum(0)

    @property
    def has_int8(self) -> bool:
        return any(self.int8)

    def per_sample(self, exit_stage: torch.Tensor) -> torch.Tensor:
        """Cost per sample (float64 ``[B]``) for the stage index each sample exited at."""
        return self.cumulative.to(exit_stage.device)[exit_stage.long()]

    def per_sample_int8(self, exit_stage: torch.Tensor) -> torch.Tensor:
        """Int8 operations per sample (float64 ``[B]``) for the stage each sample exited at."""
        int8 = torch.tensor(self.int8 or (0.0,) * len(self.stage), dtype=torch.float64).cumsum(0)
        return int8.to(exit_stage.device)[exit_stage.long()]

    def expected(self, reach: "Sequence[float] | torch.Tensor") -> float:
        """``sum_k stage[k] * P(reach k)`` for per-stage reach probabilities."""
        reach = torch.as_tensor(reach, dtype=torch.float64)
        return float((torch.tensor(self.stage, dtype=torch.float64) * reach).sum())

    def to_dict(self) -> dict[str, Any]:
        out = {"names": list(self.names), "stage": list(self.stage), "cumulative": self.cumulative.tolist()}
        if self.has_int8:
            out["int8_ops"] = list(self.int8)
        return out


def stage_flops(stages: Sequence[Callable[[torch.Tensor], Any]], example_input: torch.Tensor,
                names: Sequence[str] | None = None, model: nn.Module | None = None) -> StageCosts:
    """Exact FLOPs per sample of each stage (a callable run on one sample, its IDK decision included),
    and, where ``model`` (the module the stages run) holds int8 layers, each stage's int8 operations."""
    x = example_input[:1]
    flops = tuple(float(count_flops(s, x)) for s in stages)
    names = tuple(names or (f"stage{k}" for k in range(len(stages))))
    if model is None or not is_quantized(model):
        return StageCosts(names, flops)
    return StageCosts(names, flops, tuple(float(int8_ops(model, x, forward=s)) for s in stages))
