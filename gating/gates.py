"""SkipNet's gates (Wang et al., ECCV'18) as pure modules.

A gate sits after residual block ``i`` and decides whether block ``i + 1`` runs. Every gate here has
the same call: ``gate(x, index, state) -> (logit, state)`` where ``x`` is block ``i``'s output,
``index`` the gate position, ``logit`` the log-odds of executing (shape ``[B]``), and ``state`` the
recurrent state (``None`` for feed-forward gates). State is passed in and out, never kept in the module,
so one gate module serves any number of concurrent batches.

``gate.logit_one(x, index, state) -> (float, state)`` is the same decision for a batch of one, as a
Python number (what the batch-1 path branches on); its first state is ``None``.

Layer layouts follow ucbdrive/skipnet:cifar/models.py; the two-way softmax of the feed-forward gates
is written as one logit (``l_execute - l_skip``), which gives the same probability.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode


class HostGateState(NamedTuple):
    """An RNN gate's state on the batch-1 CPU path (:meth:`RNNGate.logit_one`): the LSTM's ``h`` and ``c``
    as NumPy vectors, and the fused step weights of every position, read when the pass started."""

    h: np.ndarray
    c: np.ndarray
    weights: list


GateState = tuple[torch.Tensor, torch.Tensor] | HostGateState | None


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class _FFGateHead(nn.Module):
    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(channels, 2, 1)  # logits of (skip, execute)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        two = self.fc(self.pool(self.body(x))).flatten(1)
        return two[:, 1] - two[:, 0]


class FFGateI(nn.Module):
    """FFGate-I: maxpool 2x2, 3x3 conv s1 + BN + ReLU, 3x3 conv s2 + BN + ReLU, global avgpool, 1x1 conv
    to two logits. About 19% of a block's cost; SkipNet uses it for depths 38 and 74.

    Args:
        channels: the input channels of each gate position (the output channels of block ``i``).
    """

    recurrent = False

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(
            _FFGateHead(nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), _conv_bn_relu(c, c, 1), _conv_bn_relu(c, c, 2)),
                        c) for c in channels)

    def initial_state(self, batch: int, device: torch.device) -> GateState:
        return None

    def forward(self, x: torch.Tensor, index: int, state: GateState = None) -> tuple[torch.Tensor, GateState]:
        return self.heads[index](x), state

    def logit_one(self, x: torch.Tensor, index: int, state: GateState = None) -> tuple[float, GateState]:
        """The logit for a batch of one, as a Python number."""
        return float(self.heads[index](x)), state

    @torch.no_grad()
    def sharpen(self, temperature: float) -> None:
        """Divide every head's output layer by ``temperature``, once (see :meth:`RNNGate.sharpen`)."""
        _check_temperature(temperature)
        for head in self.heads:
            head.fc.weight.div_(temperature)
            head.fc.bias.div_(temperature)


class FFGateII(FFGateI):
    """FFGate-II: 3x3 conv s2 + BN + ReLU, global avgpool, 1x1 conv to two logits. About 12.5% of a block;
    SkipNet uses it for depths above 100."""

    def __init__(self, channels: Sequence[int]) -> None:
        nn.Module.__init__(self)
        self.heads = nn.ModuleList(_FFGateHead(_conv_bn_relu(c, c, 2), c) for c in channels)


class RNNGate(nn.Module):
    """RNNGate: per position, global avgpool and a linear embedding (SkipNet's 1x1 conv) to
    ``embed_dim``; one LSTM cell shared by all positions; a linear projection to one logit.

    About 0.04% of a block's cost. The LSTM state is reset for every input (``initial_state``) and
    threaded through the positions by the caller.

    Args:
        channels: input channels per gate position.
        embed_dim: embedding size (SkipNet: 10).
        hidden_dim: LSTM hidden size (SkipNet: 10).
        temperature: only 1.0. Configs written before the temperature moved to :meth:`sharpen` name it;
            another value is refused rather than silently applied differently.
    """

    recurrent = True

    def __init__(self, channels: Sequence[int], embed_dim: int = 10, hidden_dim: int = 10,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.embed = nn.ModuleList(nn.Linear(c, embed_dim) for c in channels)
        self.lstm = nn.LSTMCell(embed_dim, hidden_dim)
        self.proj = nn.Linear(hidden_dim, 1)
        if temperature != 1.0:
            raise ValueError(f"RNNGate(temperature={temperature}): the gate temperature is applied once, to the "
                             f"projection, when a stage starts (SkipNet's hotter): set model.gate_temperature "
                             f"instead of gate.temperature")
        self.hidden_dim = hidden_dim
        # logit_one's fused weights of every position: a cache derived from the parameters, not state (it
        # holds nothing the parameters do not, and the forward never reads it).
        self._host_views: tuple | None = None

    def initial_state(self, batch: int, device: torch.device) -> GateState:
        z = torch.zeros(batch, self.hidden_dim, device=device)
        return z, z

    def forward(self, x: torch.Tensor, index: int, state: GateState = None) -> tuple[torch.Tensor, GateState]:
        if state is None:
            state = self.initial_state(x.shape[0], x.device)
        e = self.embed[index](x.mean((2, 3)))  # global average pool, one op (it runs before every block)
        h, c = self.lstm(e, state)
        return self.proj(h).squeeze(1), (h, c)

    def logit_one(self, x: torch.Tensor, index: int, state: GateState = None) -> tuple[float, GateState]:
        """The logit for a batch of one, as a Python number, with the state as NumPy arrays on the CPU.

        On the CPU, the step is fused into two small NumPy products: the pooling (a product with a vector
        of ``1/(H*W)`` on a view of the block's output), then one product of ``[embedding folded into the
        LSTM's input weights | hidden weights]`` with ``[pooled; h]``, one ``tanh`` for all four LSTM gates
        (``sigmoid(z) = (1 + tanh(z/2)) / 2``, the halving folded into the weights) and the projection.
        Inside a network at batch 1 the torch ops took about 170 us per gate and the unfused NumPy step
        about 31 us (docs/compression.md). The fused weights of every position are read once, when a pass
        starts (``state`` None or a torch state), and travel with the state (:class:`HostGateState`), as a
        pass reads each weight once: a weight changed during a pass shows from the next pass on. (Checking
        them at every step cost 7 us of the step's 21.) Elsewhere, or with autograd on, it is
        :meth:`forward` and one host synchronisation; so it is while a dispatch mode watches the ops (FLOP
        counting, tracing), which would not see NumPy's.
        """
        if not x.is_cpu or x.dtype != torch.float32 or torch.is_grad_enabled() or is_in_torch_dispatch_mode():
            if state is not None and isinstance(state[0], np.ndarray):
                state = tuple(torch.from_numpy(s).to(x.device).unsqueeze(0) for s in state[:2])
            logit, state = self(x, index, state)
            return float(logit), state
        if isinstance(state, HostGateState):
            h, c, weights = state
        else:
            weights = self._host_weights()
            if state is None:
                h = c = np.zeros(self.hidden_dim, dtype=np.float32)
            else:  # a torch state (the first positions ran elsewhere)
                h, c = (s.detach().cpu().numpy().reshape(-1) for s in state)
        w, b, w_p, b_p = weights[index]
        n = self.hidden_dim
        z = w @ np.concatenate((_pooled(x), h))
        z += b
        t = np.tanh(z, out=z)  # torch's gate order: input, forget, cell, output
        s = t * 0.5
        s += 0.5
        c = s[n:2 * n] * c + s[:n] * t[2 * n:3 * n]
        h = s[3 * n:] * np.tanh(c)
        return float(w_p @ h) + b_p, HostGateState(h, c, weights)

    def _host_weights(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
        """Every position's fused step weights (see :meth:`logit_one`), computed from the parameters and
        kept until one of them changes: an optimizer step, a loaded state dict or :meth:`sharpen` writes in
        place and bumps the tensor's version; ``.to()`` or assigned parameters change its storage or the
        object. All three are part of the key, so a changed weight is never served stale. A cache of
        derived weights, not state."""
        # Parameters read from the modules' dicts (nn.Module attribute access costs several times more).
        lstm, proj = self._modules["lstm"]._parameters, self._modules["proj"]._parameters
        params = [p for m in self.embed._modules.values() for p in (m._parameters["weight"], m._parameters["bias"])]
        params += (lstm["weight_ih"], lstm["weight_hh"], lstm["bias_ih"], lstm["bias_hh"], proj["weight"],
                   proj["bias"])
        key = [(id(p), p.data_ptr(), p._version) for p in params]
        hit = self._host_views
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            w_ih, w_hh, b_ih, b_hh, w_p, b_p = (p.detach().double() for p in params[-6:])
            half = torch.ones(4 * self.hidden_dim, dtype=torch.float64)
            half[:2 * self.hidden_dim] = 0.5  # input and forget gates: sigmoid(z) = (1 + tanh(z / 2)) / 2
            half[3 * self.hidden_dim:] = 0.5  # output gate
            fused = []
            for k in range(len(self.embed)):
                w_e, b_e = (p.detach().double() for p in params[2 * k:2 * k + 2])
                w = torch.cat([w_ih @ w_e, w_hh], 1)
                b = w_ih @ b_e + b_ih + b_hh
                fused.append(((w * half[:, None]).float().numpy(), (b * half).float().numpy(),
                              w_p[0].float().numpy(), float(b_p[0])))
        # The parameters themselves are kept with the key, so no id in it is reused by another tensor.
        self._host_views = (key, fused, params)
        return fused

    @torch.no_grad()
    def sharpen(self, temperature: float) -> None:
        """Divide the projection's weight and bias by ``temperature``, once: SkipNet's ``hotter(t)``, which
        its ImageNet RL stage applies to the SP model when RL starts (t = 0.05 makes every logit 20x
        larger, so gates start near-deterministic). Dividing the logit on every pass instead would also
        scale the projection's gradient by 1/t at every step."""
        _check_temperature(temperature)
        self.proj.weight.div_(temperature)
        self.proj.bias.div_(temperature)


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and 0.0 < temperature < float("inf")):
        raise ValueError(f"gate temperature must be a positive finite number, got {temperature!r}")


@functools.lru_cache(maxsize=64)
def _averaging_vector(n: int) -> np.ndarray:
    v = np.full(n, 1.0 / n, dtype=np.float32)
    v.flags.writeable = False
    return v


def _pooled(x: torch.Tensor) -> np.ndarray:
    """Global average pool of one CPU image ``[1, C, H, W]`` as a NumPy vector ``[C]``: a product with a
    vector of ``1/(H*W)`` on a view of its memory (channels-last or contiguous), about half of what
    ``x.mean((2, 3))`` costs at these sizes; a copy for any other layout."""
    _, c, h, w = x.shape
    a, avg = x.numpy(), _averaging_vector(h * w)
    if x.is_contiguous():
        return a.reshape(c, h * w) @ avg
    return avg @ a.transpose(0, 2, 3, 1).reshape(h * w, c)


def select_state(state: GateState, rows: torch.Tensor) -> GateState:
    """The recurrent state of a subset of rows (for engines that split a batch)."""
    if state is None:
        return None
    return state[0][rows], state[1][rows]
