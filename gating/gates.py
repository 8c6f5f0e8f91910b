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

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

GateState = tuple[torch.Tensor, torch.Tensor] | tuple[np.ndarray, np.ndarray] | None


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
        # NumPy views of the weights for logit_one: a cache of views, not state (it holds nothing the
        # parameters do not, and the forward never reads it).
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

        On the CPU, after the pooling, the step is a few 10-wide NumPy products: inside a network at
        batch 1 the same ops as torch calls (embedding, LSTM cell, projection) took about 170 us per
        gate, 17 gates 2.9 ms against 10.9 ms for SkipNet-38's 18 blocks. Elsewhere, or with autograd on,
        it is :meth:`forward` and one host synchronisation; so it is while a dispatch mode watches the
        ops (FLOP counting, tracing), which would not see NumPy's.
        """
        if not x.is_cpu or x.dtype != torch.float32 or torch.is_grad_enabled() or is_in_torch_dispatch_mode():
            if state is not None and isinstance(state[0], np.ndarray):
                state = tuple(torch.from_numpy(s).to(x.device).unsqueeze(0) for s in state)
            logit, state = self(x, index, state)
            return float(logit), state
        w_e, b_e, w_ih, w_hh, b, w_p, b_p = self._host_weights(index)
        pooled = x.mean((2, 3)).numpy()[0]
        if state is None:
            h = c = np.zeros(self.hidden_dim, dtype=np.float32)
        elif isinstance(state[0], np.ndarray):
            h, c = state
        else:  # a torch state (the first positions ran elsewhere)
            h, c = (s.detach().cpu().numpy().reshape(-1) for s in state)
        z = w_ih @ (w_e @ pooled + b_e) + w_hh @ h + b
        n = self.hidden_dim  # torch's gate order: input, forget, cell, output
        sig = 1.0 / (1.0 + np.exp(-z))
        c = sig[n:2 * n] * c + sig[:n] * np.tanh(z[2 * n:3 * n])
        h = sig[3 * n:] * np.tanh(c)
        return float(w_p @ h + b_p), (h, c)

    def _host_weights(self, index: int) -> tuple[np.ndarray, ...]:
        """NumPy views of position ``index``'s weights. Views, so an optimizer step or a loaded state dict
        (both write in place) shows through; rebuilt when the storage moves (``.to()``, assigned
        parameters), which a view keeps alive, so its address cannot be reused meanwhile."""
        lstm = self.lstm
        key = lstm.weight_ih.data_ptr()
        if self._host_views is None or self._host_views[0] != key:
            view = [p.detach().numpy() for p in (lstm.weight_ih, lstm.weight_hh, lstm.bias_ih, lstm.bias_hh,
                                                  self.proj.weight, self.proj.bias)]
            view[4] = view[4][0]
            embeds = [(e.weight.detach().numpy(), e.bias.detach().numpy()) for e in self.embed]
            self._host_views = key, embeds, view
        _, embeds, (w_ih, w_hh, b_ih, b_hh, w_p, b_p) = self._host_views
        return *embeds[index], w_ih, w_hh, b_ih + b_hh, w_p, float(b_p[0])

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


def select_state(state: GateState, rows: torch.Tensor) -> GateState:
    """The recurrent state of a subset of rows (for engines that split a batch)."""
    if state is None:
        return None
    return state[0][rows], state[1][rows]
