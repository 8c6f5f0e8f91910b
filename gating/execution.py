"""The one execution engine for conditional computation at batch > 1.

``run_rows(fn_on, fn_off, x, on)`` computes ``fn_on`` on the rows where ``on`` is true and ``fn_off``
on the others, and returns the rows in their original order. Only the selected rows are computed, so a
batch gets cheaper as rows switch off: SkipNet's skipped blocks (``fn_off`` is the shortcut) run
through it. ``run_exits(stages, x)`` is its early-exit form: rows leave at different stages (a
cascade's answered samples) and every later stage runs on the rows still in flight only.

Where all rows agree (every gate open, or every gate closed) the whole batch takes one path with no
gather; batch size 1 always does. Knowing how many rows are on needs their count on the host: one
device synchronisation per call on a GPU (``nonzero``), which is cheap next to a residual block and
lets the sub-batch have its true size. Shape-static alternatives (``nonzero_static``, masking) keep
the full batch and so save no time.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

Fn = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def run_rows(fn_on: Fn, fn_off: Fn, x: torch.Tensor, on: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``fn_on(x[on])`` and ``fn_off(x[~on])`` merged back in row order.

    Args:
        fn_on: applied to the selected rows (e.g. a residual block).
        fn_off: applied to the others (e.g. the block's shortcut; :func:`identity` for none).
        x: the batch, rows first.
        on: ``[B]`` bool (or 0/1) selection.
        inplace: with ``fn_off is identity``, write the selected rows' results into ``x`` itself
            (one gather and one indexed write, instead of gathering and scattering both halves into
            a new tensor). Only for inference, where the caller does not need ``x`` afterwards.

    Both functions must map rows independently (eval-mode BatchNorm, convolutions) and give outputs
    of the same shape per row.
    """
    on = on.bool()
    if x.shape[0] == 1:
        return fn_on(x) if bool(on[0]) else fn_off(x)
    idx_on = on.nonzero().squeeze(1)
    n_on = idx_on.numel()
    if n_on == x.shape[0]:
        return fn_on(x)
    if n_on == 0:
        return fn_off(x)
    # index_select, not x[idx]: the same rows, in less than half the time on the CPU (64 us against 150 for
    # 32 of 64 rows of 16x32x32, docs/compression.md).
    if inplace and fn_off is identity:
        return x.index_copy_(0, idx_on, fn_on(x.index_select(0, idx_on)))
    idx_off = (~on).nonzero().squeeze(1)
    y_on, y_off = fn_on(x.index_select(0, idx_on)), fn_off(x.index_select(0, idx_off))
    out = y_on.new_empty((x.shape[0], *y_on.shape[1:]))
    out[idx_on] = y_on
    out[idx_off] = y_off
    return out


def blend(y_on: torch.Tensor, y_off: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Masked execution, as SkipNet's public code does: ``g * y_on + (1 - g) * y_off`` (every row computed).

    Used in training, where straight-through gradients need both outputs for every row, and as the
    baseline the real-skipping engine is measured against.
    """
    g = gate.view(-1, *([1] * (y_on.ndim - 1))).to(y_on.dtype)
    return g * y_on + (1.0 - g) * y_off


State = "torch.Tensor | tuple[torch.Tensor, ...]"
StageFn = Callable[[Any], "tuple[tuple[torch.Tensor, ...], torch.Tensor, Any]"]


def _rows(state: Any, idx: torch.Tensor) -> Any:
    if isinstance(state, tuple):
        return tuple(t.index_select(0, idx.to(t.device)) for t in state)
    return state.index_select(0, idx.to(state.device))


def run_exits(stages: "list[StageFn]", x: State) -> "tuple[tuple[torch.Tensor, ...], torch.Tensor]":
    """Early-exit execution with compaction: each stage runs only on the rows still in flight.

    Each ``stage(rows)`` returns ``(outputs, done, next_rows)``: a tuple of per-row outputs, a ``[b]``
    bool that says which rows exit here, and what the rows still in flight pass on (a cascade passes
    its input on unchanged; an early-exit network its features). ``x`` and what stages pass on may be
    one tensor or a tuple of tensors with the same rows (an input and the cost spent on it so far, say).
    The last stage answers every row it gets. Returns the outputs gathered back in the original row
    order and, per row, the index of the stage it exited at.

    The rows that go on are gathered once per stage into a dense sub-batch, so the later, costlier
    stages run on fewer rows and the saved computation is saved time (batch 1 takes the plain path).
    """
    first = x[0] if isinstance(x, tuple) else x
    n_rows, last = first.shape[0], len(stages) - 1
    exit_stage = torch.full((n_rows,), last, dtype=torch.long, device=first.device)
    if n_rows == 1:
        for k, stage in enumerate(stages):
            outputs, done, x = stage(x)
            if k == last or bool(done[0]):
                exit_stage.fill_(k)
                return outputs, exit_stage
    rows: torch.Tensor | None = None  # original indices of the rows in flight (None: all, in order)
    final: list[torch.Tensor] = []
    for k, stage in enumerate(stages):
        outputs, done, nxt = stage(x)
        done = done.to(exit_stage.device)
        if not final:
            final = [o.new_empty((n_rows, *o.shape[1:])) for o in outputs]
        if k == last:
            done = torch.ones_like(done, dtype=torch.bool)
        if rows is None and bool(done.all()):
            return tuple(outputs), exit_stage.fill_(k)
        here = done.nonzero().squeeze(1)
        target = here if rows is None else rows[here]
        for out, o in zip(final, outputs):
            out.index_copy_(0, target.to(out.device), o.index_select(0, here.to(o.device)))
        exit_stage.index_fill_(0, target, k)
        stay = (~done).nonzero().squeeze(1)
        if stay.numel() == 0:
            break
        rows = stay if rows is None else rows[stay]
        x = _rows(nxt, stay)
    return tuple(final), exit_stage


class DynamicBatchCompiled(torch.nn.Module):
    """``torch.compile`` of ``module`` with the batch dimension dynamic: the row-compacted sub-batches
    that :func:`run_rows` and :func:`run_exits` make (any size from 1 to the full batch) reuse one
    compiled graph instead of compiling one per size. Batch size 1 gets a graph of its own, as
    torch.compile specialises sizes 0 and 1, so at most two are built for one input shape.

    Inductor makes C++ kernels on the CPU and Triton kernels on a GPU. Parameters are the module's
    own (``self.module``), so a state dict loads into either. Under a dispatch mode (the FLOP counter
    of :mod:`gating.cost`) it runs the module eagerly, so exact costs are counted as for the module.

    Args:
        module: the network or stage, in eval mode for inference.
        backend: the torch.compile backend (``inductor``; ``eager`` or ``aot_eager`` to debug).
        mode: torch.compile's mode (``None``, ``max-autotune-no-cudagraphs``...); CUDA graphs need one
            graph per batch size, so ``reduce-overhead`` is for fixed batches only.
        options: the backend's options instead of a mode (Inductor: ``{"cpp_wrapper": True}``...).
    """

    def __init__(self, module: torch.nn.Module, backend: str = "inductor", mode: str | None = None,
                 options: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.module = module
        # The bound forward, not the module: compiling the module would register it a second time.
        self._compiled = torch.compile(module.forward, backend=backend, mode=mode, options=options)

    @property
    def downsample(self) -> torch.nn.Module | None:
        """A wrapped residual block's projection shortcut (what a skipped block runs), left eager."""
        return getattr(self.module, "downsample", None)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if _get_current_dispatch_mode() is not None:
            # Under a dispatch mode (the FLOP counter) run eagerly: the same ops, each one seen.
            return self.module(x, *args, **kwargs)
        if x.shape[0] > 1:
            # maybe_: a size-1 batch stays specialised instead of failing the dynamic-dim check.
            torch._dynamo.maybe_mark_dynamic(x, 0)
        return self._compiled(x, *args, **kwargs)
