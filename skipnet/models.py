"""SkipNet: residual networks that skip blocks per input (Wang et al., ECCV'18).

Block rule: ``x_{i+1} = g_i * F_i(x_i) + (1 - g_i) * shortcut_i(x_i)``; block 0 always runs; the gate
reading block ``i``'s output decides block ``i + 1``; a skipped downsampling block still runs its
projection shortcut.

Two ways to execute the same decisions:

* ``execution="masked"``: every block runs on every row and is blended with the gate, as SkipNet's
  public code does. Training with straight-through gates needs it (the gradient of a closed gate
  involves the block's output).
* ``execution="skip"``: each block runs only on the rows whose gate is open
  (:func:`gating.execution.run_rows`), so skipped FLOPs become saved time at any batch size. The
  default at inference, and usable in RL training, where sampled actions need no block output for
  skipped rows.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn as nn

from gating.cost import CostTable, build_cost_table
from gating.execution import blend, identity, run_rows
from gating.gates import FFGateI, FFGateII, RNNGate
from gating.policy import GateDecision, decide, threshold_logit

GATES: dict[str, type[nn.Module]] = {"rnn": RNNGate, "ffgate1": FFGateI, "ffgate2": FFGateII}


class SkipOutput(NamedTuple):
    """What a SkipNet forward pass returns.

    Attributes:
        logits: class scores ``[B, num_classes]``.
        executed: 1.0 where a block ran for that sample, ``[B, N]`` (column 0 is always 1).
        probs: each gate's probability of executing its block, ``[B, N - 1]``.
        log_probs: log-probabilities of the sampled actions (``mode="sample"``), else None.
    """

    logits: torch.Tensor
    executed: torch.Tensor
    probs: torch.Tensor
    log_probs: torch.Tensor | None


def shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a skipped block computes: its projection shortcut, or nothing (identity)."""
    ds = getattr(block, "downsample", None)
    return x if ds is None else ds(x)


def block_out_channels(block: nn.Module) -> int:
    """Output channels of a torchvision-style BasicBlock (``bn2``) or Bottleneck (``bn3``)."""
    bn = getattr(block, "bn3", None) or block.bn2
    return bn.num_features


def _stochastic_depth(drop_rate: float | torch.Tensor, x: torch.Tensor, mode: str) -> torch.Tensor | None:
    """``drop_rate`` as a tensor on ``x``'s device, checked; None for none (the default path, inference,
    makes no tensor and no host synchronisation for it)."""
    if not (isinstance(drop_rate, torch.Tensor) or drop_rate):
        return None
    drop = torch.as_tensor(drop_rate, dtype=x.dtype, device=x.device)
    if not (drop.ge(0).all() and drop.lt(1).all()):
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
    if mode == "sample":
        raise ValueError("drop_rate forces skips the policy did not choose: not with mode='sample' (RL)")
    return drop


def _dropped(d: GateDecision, drop: torch.Tensor | None) -> GateDecision:
    """``d`` with each row's block skipped with probability ``drop`` (stochastic depth), recorded as skipped."""
    if drop is None:
        return d
    keep = torch.bernoulli((1.0 - drop).expand_as(d.action))
    return GateDecision(d.gate * keep, d.action * keep, d.prob, d.log_prob)


class SkipResNet(nn.Module):
    """A gated ResNet over any backbone that exposes ``stem``, ``blocks()`` and ``forward_head``.

    Args:
        backbone: a ResNet from the registry (CIFAR-style or torchvision).
        gate: a gate module, or a factory called with ``channels=[...]`` (one entry per gate position),
            as Hydra's ``_partial_`` gate configs give.
        threshold: execute a block when its gate's probability exceeds this (inference and SP).

    Build one with weights through the registry (:func:`models.create_model` ``"skipnet38_cifar"``) or
    :func:`models.skipnet.skipnet_from_backbone`.
    """

    def __init__(self, backbone: nn.Module, gate: nn.Module | Callable[..., nn.Module], threshold: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self._blocks = list(backbone.blocks())  # a plain list: the modules are registered by the backbone
        channels = [block_out_channels(b) for b in self._blocks[:-1]]
        self.gate = gate if isinstance(gate, nn.Module) else gate(channels=channels)
        self.num_classes = backbone.num_classes
        self.in_chans = getattr(backbone, "in_chans", None)
        self.num_features = backbone.num_features
        self.threshold = threshold

    @property
    def num_blocks(self) -> int:
        return len(self._blocks)

    @property
    def num_gates(self) -> int:
        return len(self._blocks) - 1

    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def replace_blocks(self, new: list[nn.Module]) -> None:
        """Put ``new[i]`` in block ``i``'s place, in the backbone too (a compressed copy of each block).
        A replacement keeps its block's interface: ``forward`` and ``downsample`` (the shortcut)."""
        if len(new) != self.num_blocks:
            raise ValueError(f"replace_blocks needs {self.num_blocks} blocks, got {len(new)}")
        swap = dict(zip(map(id, self._blocks), new))
        for parent in list(self.backbone.modules()):
            for name, child in list(parent.named_children()):
                if id(child) in swap:
                    setattr(parent, name, swap[id(child)])
        self._blocks = list(new)

    def forward(
        self,
        x: torch.Tensor,
        mode: str | None = None,
        execution: str | None = None,
        actions: torch.Tensor | None = None,
        threshold: float | None = None,
        run_gates: bool = True,
        open_first: int = 0,
        temperature: float = 1.0,
        drop_rate: float | torch.Tensor = 0.0,
        prob_bound: float = 1.0,
    ) -> SkipOutput:
        """Run the gated network.

        Args:
            x: input images.
            mode: gate decision mode (see :func:`gating.policy.decide`); default ``hard_st`` in
                training, ``greedy`` in eval.
            execution: ``"masked"`` or ``"skip"``; default ``masked`` in training, ``skip`` in eval.
            actions: ``[B, N]`` 0/1 decisions to use instead of the gates' (column 0 ignored); the
                gates still run. For tests and benchmarks at fixed skip rates.
            threshold: overrides the model's execute threshold (a server raises it to skip more).
            run_gates: with ``actions``, False leaves the gates out (their probabilities are reported
                as the actions): isolates the execution engine's own cost in benchmarks.
            open_first: blocks ``1 .. open_first`` execute whatever their gate says (BlockDrop's curriculum
                from the last block); their gates run, with log-probability 0 (no policy gradient).
            temperature, prob_bound: the Gumbel-sigmoid temperature (``mode="gumbel"``); BlockDrop's
                exploration bound (``mode="sample"``, :func:`gating.policy.decide`).
            drop_rate: stochastic depth (Huang et al., ECCV'16), training only: each sample skips each
                gated block with this probability (a float, or one per sample) whatever its gate says.
        """
        mode = mode or ("hard_st" if self.training else "greedy")
        execution = execution or ("masked" if self.training else "skip")
        if execution == "skip" and mode in ("hard_st", "soft", "gumbel") and torch.is_grad_enabled() and self.training:
            raise ValueError(f"mode={mode!r} trains through the block outputs of closed gates: use execution='masked'")
        thr = self.threshold if threshold is None else threshold
        if actions is None and not run_gates:
            raise ValueError("run_gates=False needs actions: without gates there are no decisions")
        drop = _stochastic_depth(drop_rate, x, mode)
        if x.shape[0] == 1 and execution == "skip" and mode == "greedy" and not torch.is_grad_enabled():
            return self._forward_one(x, thr, actions, run_gates)
        x = self.backbone.stem(x)
        batch = x.shape[0]
        state = self.gate.initial_state(batch, x.device)
        x = self._blocks[0](x)
        executed = [x.new_ones(batch)]
        probs, log_probs = [], []
        for i in range(1, self.num_blocks):
            d, state = self._decide(i, x, state, mode, thr, actions, run_gates, i <= open_first, temperature,
                                    prob_bound)
            d = _dropped(d, drop)
            x = self._run_block(self._blocks[i], x, d, execution)
            executed.append(d.action)
            probs.append(d.prob)
            if d.log_prob is not None:
                log_probs.append(d.log_prob)
        logits = self.backbone.forward_head(x)
        return SkipOutput(logits, torch.stack(executed, 1), torch.stack(probs, 1),
                          torch.stack(log_probs, 1) if log_probs else None)

    def _decide(self, i: int, x: torch.Tensor, state, mode: str, threshold: float, actions: torch.Tensor | None,
                run_gates: bool, forced_open: bool = False, temperature: float = 1.0,
                prob_bound: float = 1.0) -> tuple[GateDecision, object]:
        """Block ``i``'s decision for the batch: the gate's (``mode``), or forced ``actions`` / ``forced_open``."""
        if actions is not None and not run_gates:
            a = actions[:, i].to(x.dtype)
            return GateDecision(a, a, a), state
        logit, state = self.gate(x, i - 1, state)
        if actions is not None:
            a = actions[:, i].to(logit.dtype)
            return GateDecision(a, a, torch.sigmoid(logit)), state
        if forced_open:
            one = torch.ones_like(logit)
            log_prob = torch.zeros_like(logit) if mode == "sample" else None
            return GateDecision(one, one, torch.sigmoid(logit), log_prob), state
        return decide(logit, mode, threshold, temperature, prob_bound), state

    @staticmethod
    def _run_block(block: nn.Module, x: torch.Tensor, d: GateDecision, execution: str) -> torch.Tensor:
        if execution == "masked":
            return blend(block(x), shortcut(block, x), d.gate)
        if execution == "skip":
            ds = getattr(block, "downsample", None)
            # In inference the previous block's output is not needed again: update it in place.
            return run_rows(block, identity if ds is None else ds, x, d.action > 0.5,
                            inplace=not torch.is_grad_enabled())
        raise ValueError(f"execution must be 'masked' or 'skip', got {execution!r}")

    def _forward_one(self, x: torch.Tensor, threshold: float, actions: torch.Tensor | None,
                     run_gates: bool) -> SkipOutput:
        """Inference on one input: each decision is a Python bool, so a block costs its own ops only.

        Same decisions and outputs as the batched path (a test checks it); at batch 1 the per-block
        tensor bookkeeping of the batched path would be a visible share of the latency.
        """
        forced = actions[0].tolist() if actions is not None else None
        thr_logit = threshold_logit(threshold)
        x = self.backbone.stem(x)
        state = None  # the gate's first step starts its own state
        x = self._blocks[0](x)
        runs, logits = [1.0], []
        for i in range(1, self.num_blocks):
            if forced is None or run_gates:
                logit, state = self.gate.logit_one(x, i - 1, state)
                logits.append(logit)
            run = forced[i] > 0.5 if forced is not None else logit > thr_logit
            block = self._blocks[i]
            x = block(x) if run else shortcut(block, x)
            runs.append(1.0 if run else 0.0)
        executed = torch.tensor([runs], dtype=x.dtype, device=x.device)
        probs = torch.sigmoid(torch.tensor([logits], dtype=x.dtype, device=x.device)) if logits else executed[:, 1:]
        return SkipOutput(self.backbone.forward_head(x), executed, probs, None)

    @staticmethod
    def saved_flops(table: CostTable) -> torch.Tensor:
        """Per gate ``[N - 1]``: the FLOPs per image that skipping its block saves (block minus shortcut)."""
        return (table.block_flops - table.skip_flops)[1:]

    def batchnorm_eval(self) -> None:
        """Put the backbone's BatchNorm layers in eval mode (running statistics), the rest untouched.

        With it, a block run on a gathered sub-batch (``execution="skip"``) computes for each row what
        masked execution computes, in training mode too; with batch statistics it cannot, since the
        statistics depend on which rows are in the batch. The gates keep their mode: they always see
        the whole batch.
        """
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def cost_table(self, example_input: torch.Tensor) -> CostTable:
        """Per-block FLOPs with the gates' cost separate; per-sample cost is ``table.per_sample(executed)``."""
        all_on = torch.ones(1, self.num_blocks)
        paths = {m: n for n, m in self.named_modules()}
        return build_cost_table(
            self, example_input, blocks=[(paths[b], b) for b in self._blocks], gates=["gate"],
            forward=lambda inp: self(inp, mode="greedy", execution="skip", actions=all_on.to(inp.device)),
        )


class OnDeviceDecisions(nn.Module):
    """A SkipNet's batch-1 inference with every decision left on the device: each block is a
    ``torch.cond`` on its gate's logit, so the pass never asks the host which branch to take.

    Eagerly this is no faster than :meth:`SkipResNet.forward` at batch 1 (``torch.cond`` reads the
    predicate); it is written to be compiled whole, gates and branches in one graph:
    ``torch.compile(OnDeviceDecisions(net), options={"layout_optimization": False})`` (the option:
    Inductor otherwise picks a channels-last layout for one branch's output that the other branch's
    compiled code does not accept, an Inductor bug as of torch 2.14); :func:`compile_on_device` does it.
    A GPU then runs the whole pass without one host synchronisation. On a 2-core CPU it measured slower
    than the eager batch-1 pass (each branch and each small gate kernel costs more compiled than the
    eager pass's NumPy gate step; docs/compression.md). Outputs and decisions are
    :meth:`SkipResNet.forward`'s (a test checks both).

    Args:
        net: the SkipNet; its modules are used as they are (not copied).
        threshold: the gate threshold (default: the net's).

    ``forward(x, actions=None, run_gates=True)``: ``x`` is ``[1, C, H, W]``; ``actions`` ``[1, N]``
    forces the decisions (the gates still run unless ``run_gates=False``), as in :meth:`SkipResNet.forward`.
    """

    def __init__(self, net: SkipResNet, threshold: float | None = None) -> None:
        super().__init__()
        self.net = net
        self.threshold_logit = threshold_logit(net.threshold if threshold is None else threshold)

    def forward(self, x: torch.Tensor, actions: torch.Tensor | None = None, run_gates: bool = True) -> SkipOutput:
        if x.shape[0] != 1:
            raise ValueError(f"OnDeviceDecisions runs one input at a time, got a batch of {x.shape[0]}")
        if actions is None and not run_gates:
            raise ValueError("run_gates=False needs actions: without gates there are no decisions")
        net = self.net
        blocks = net.blocks()
        x = net.backbone.stem(x)
        x = blocks[0](x)
        state = net.gate.initial_state(1, x.device) if run_gates else None
        runs, logits = [torch.ones((), dtype=torch.bool, device=x.device)], []
        for i in range(1, len(blocks)):
            if run_gates:
                logit, state = net.gate(x, i - 1, state)
                logits.append(logit[0])
            run = actions[0, i] > 0.5 if actions is not None else logits[-1] > self.threshold_logit
            block = blocks[i]
            # Both branches return a fresh tensor: torch.cond may not alias its input.
            x = torch.cond(run, lambda t, b=block: b(t), lambda t, b=block: _fresh(shortcut(b, t), t), (x,))
            runs.append(run)
        executed = torch.stack(runs).to(x.dtype).unsqueeze(0)
        probs = torch.sigmoid(torch.stack(logits)).unsqueeze(0) if logits else executed[:, 1:]
        return SkipOutput(net.backbone.forward_head(x), executed, probs, None)


def compile_on_device(net: SkipResNet, threshold: float | None = None, backend: str = "inductor",
                      cpp_wrapper: bool = False) -> nn.Module:
    """``torch.compile`` of :class:`OnDeviceDecisions` for ``net``: its batch-1 pass as one graph, the
    decisions on the device. Compiles on the first call (about 30 s for SkipNet-38 on a 2-core CPU;
    ``cpp_wrapper``, Inductor's C++ wrapper instead of Python between the kernels and branches, about 70 s).
    On the CPU it is slower than the eager batch-1 pass (docs/compression.md): written for a GPU, where the
    eager pass waits on the host at every block."""
    options = {"layout_optimization": False, "cpp_wrapper": cpp_wrapper} if backend == "inductor" else None
    return torch.compile(OnDeviceDecisions(net, threshold), backend=backend, options=options)


def _fresh(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return y.clone() if y is x else y
